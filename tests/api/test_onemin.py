"""The 1min.ai dialect against a real server process: the seed request, shapes, sizes, assets, errors."""

from __future__ import annotations

import base64
import io
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import requests
from PIL import Image

from kleinserve.request import size_for_aspect_ratio
from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes

MODEL = "black-forest-labs/flux-2-klein-4b"
HEADERS = {"API-KEY": "test-key"}
SMALL = {"prompt": "a small test", "megapixels": "0.25", "num_inference_steps": 1}
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def feature(
    server: ServerProcess, prompt_object: dict[str, Any], kind: str = "IMAGE_GENERATOR", **extra: Any
) -> httpx.Response:
    """POST /api/features; ``extra`` overrides or adds top-level fields (e.g. ``model``)."""
    body = {"type": kind, "model": MODEL, "promptObject": prompt_object, **extra}
    return httpx.post(f"{server.url}/api/features", json=body, headers=HEADERS, timeout=120)


def record(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["aiRecord"]
    return result


def download(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def assert_error(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"message", "code", "statusCode"}
    assert body["statusCode"] == status and body["code"] == code
    assert fragment in body["message"], body["message"]


def upload(server: ServerProcess, data: bytes, name: str = "cat.png", mime: str = "image/png") -> httpx.Response:
    files = {"asset": (name, data, mime)}
    return httpx.post(f"{server.url}/api/assets", files=files, headers=HEADERS, timeout=30)


def test_seed_example_request_unchanged(server: ServerProcess) -> None:
    # The seed's Python example, verbatim but for the base URL.
    url = "https://api.1min.ai/api/features"
    headers = {"Content-Type": "application/json", "API-KEY": "YOUR_API_KEY"}
    data = {
        "type": "IMAGE_GENERATOR",
        "model": "black-forest-labs/flux-2-klein-9b",
        "promptObject": {
            "prompt": "A sleek electric sports car on an empty highway at night, cinematic lighting",
            "aspect_ratio": "16:9",
            "num_inference_steps": 4,
            "go_fast": True,
            "megapixels": "1",
            "output_format": "webp",
            "output_quality": 80,
        },
    }
    response = requests.post(url.replace("https://api.1min.ai", server.url), headers=headers, json=data, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    (top,) = response.json()
    assert top == "aiRecord"
    rec = response.json()["aiRecord"]
    assert list(rec)[:7] == ["uuid", "model", "type", "status", "createdAt", "aiRecordDetail", "temporaryUrl"]
    assert str(uuid.UUID(rec["uuid"])) == rec["uuid"]
    assert rec["model"] == data["model"] and rec["type"] == "IMAGE_GENERATOR" and rec["status"] == "SUCCESS"
    assert ISO_MS_Z.match(rec["createdAt"]), rec["createdAt"]
    created = datetime.fromisoformat(rec["createdAt"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - created).total_seconds()) < 600
    detail = rec["aiRecordDetail"]
    assert set(detail) == {"promptObject", "resultObject"}
    # Everything sent comes back as sent; the one default left out is filled in.
    assert detail["promptObject"] == {**data["promptObject"], "disable_safety_checker": False}
    (path,) = detail["resultObject"]
    assert isinstance(path, str) and path == f"{rec['uuid']}/0.webp" and "://" not in path
    assert rec["temporaryUrl"].startswith(server.url + "/") and "sig=" in rec["temporaryUrl"]
    image = download(rec["temporaryUrl"])
    assert image.format == "WEBP" and image.size == (1360, 768)
    assert rec["kleinserve"] == {"seed": rec["kleinserve"]["seed"], "width": 1360, "height": 768}
    assert isinstance(rec["kleinserve"]["seed"], int)


def test_defaults_are_filled_in_and_echoed(server: ServerProcess) -> None:
    rec = record(feature(server, {"prompt": "defaults", "megapixels": "0.25"}))
    assert rec["aiRecordDetail"]["promptObject"] == {
        "prompt": "defaults",
        "aspect_ratio": "1:1",
        "output_format": "webp",
        "output_quality": 80,
        "num_inference_steps": 4,  # the variant's own default
        "go_fast": True,
        "megapixels": "0.25",
        "disable_safety_checker": False,
    }
    assert download(rec["temporaryUrl"]).size == (512, 512)


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "9:16", "3:2", "2:3", "4:5", "5:4"])
def test_aspect_ratio_at_quarter_megapixel_gives_the_published_size(server: ServerProcess, ratio: str) -> None:
    rec = record(feature(server, {**SMALL, "aspect_ratio": ratio}))
    width, height = size_for_aspect_ratio(ratio, 0.25)
    assert download(rec["temporaryUrl"]).size == (width, height)
    assert (rec["kleinserve"]["width"], rec["kleinserve"]["height"]) == (width, height)


@pytest.mark.parametrize(
    ("fmt", "pil", "suffix"), [("jpg", "JPEG", "jpg"), ("jpeg", "JPEG", "jpg"), ("png", "PNG", "png")]
)
def test_output_formats(server: ServerProcess, fmt: str, pil: str, suffix: str) -> None:
    rec = record(feature(server, {**SMALL, "output_format": fmt, "output_quality": 0}))
    assert rec["aiRecordDetail"]["promptObject"]["output_format"] == fmt
    assert rec["aiRecordDetail"]["resultObject"][0].endswith("." + suffix)
    assert download(rec["temporaryUrl"]).format == pil


def test_same_seed_gives_identical_bytes(server: ServerProcess) -> None:
    first, second = (record(feature(server, {**SMALL, "seed": 1234})) for _ in range(2))
    assert first["uuid"] != second["uuid"]
    assert first["kleinserve"]["seed"] == second["kleinserve"]["seed"] == 1234
    assert first["aiRecordDetail"]["promptObject"]["seed"] == 1234
    assert httpx.get(first["temporaryUrl"]).content == httpx.get(second["temporaryUrl"]).content


def test_go_fast_and_safety_flags_are_echoed_and_change_nothing(server: ServerProcess) -> None:
    plain = record(feature(server, {**SMALL, "seed": 7}))
    flagged = record(feature(server, {**SMALL, "seed": 7, "go_fast": False, "disable_safety_checker": True}))
    echoed = flagged["aiRecordDetail"]["promptObject"]
    assert echoed["go_fast"] is False and echoed["disable_safety_checker"] is True
    assert httpx.get(plain["temporaryUrl"]).content == httpx.get(flagged["temporaryUrl"]).content


def test_megapixels_as_a_number_and_base_variant_steps(server: ServerProcess) -> None:
    # Base variants are 50-step models: the generator's 1-4 range is for the distilled ones.
    base = "black-forest-labs/flux-2-klein-base-4b"
    rec = record(feature(server, {**SMALL, "megapixels": 0.25, "num_inference_steps": 6}, model=base))
    assert rec["model"] == base
    assert rec["aiRecordDetail"]["promptObject"]["megapixels"] == "0.25"
    assert rec["aiRecordDetail"]["promptObject"]["num_inference_steps"] == 6
    assert download(rec["temporaryUrl"]).size == (512, 512)


@pytest.mark.parametrize(
    ("kind", "change", "fragment"),
    [
        ("IMAGE_GENERATOR", {"num_inference_steps": 5}, "promptObject.num_inference_steps"),
        ("IMAGE_GENERATOR", {"num_inference_steps": 0}, "promptObject.num_inference_steps"),
        ("IMAGE_EDITOR", {"imageUrl": "x", "num_inference_steps": 51}, "promptObject.num_inference_steps"),
        ("IMAGE_GENERATOR", {"prompt": None}, "promptObject.prompt: is required"),
        ("IMAGE_GENERATOR", {"prompt": "  "}, "promptObject.prompt: must not be empty"),
        ("IMAGE_GENERATOR", {"num_inference_step": 4}, "promptObject.num_inference_step: is not a known parameter"),
        ("IMAGE_GENERATOR", {"aspect_ratio": "4:3"}, "promptObject.aspect_ratio"),
        ("IMAGE_GENERATOR", {"aspect_ratio": "match_input_image"}, "promptObject.aspect_ratio"),
        ("IMAGE_GENERATOR", {"megapixels": "2"}, "promptObject.megapixels"),
        ("IMAGE_GENERATOR", {"output_format": "gif"}, "promptObject.output_format"),
        ("IMAGE_GENERATOR", {"output_quality": 101}, "promptObject.output_quality"),
        ("IMAGE_GENERATOR", {"seed": -1}, "promptObject.seed"),
        ("IMAGE_GENERATOR", {"imageUrl": "x"}, "promptObject.imageUrl: is not a known parameter"),
        ("IMAGE_EDITOR", {}, "promptObject.imageUrl: is required"),
        ("IMAGE_EDITOR", {"imageUrl": "development/images/cat.png"}, "promptObject.imageUrl: no such asset"),
        ("IMAGE_VARIATOR", {}, "type"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    server: ServerProcess, kind: str, change: dict[str, Any], fragment: str
) -> None:
    prompt_object = {k: v for k, v in {**SMALL, **change}.items() if v is not None}
    code = "invalid_image" if "no such asset" in fragment else "invalid_parameter"  # checked as an input image
    assert_error(feature(server, prompt_object, kind), 400, code, fragment)


def test_malformed_bodies_are_400(server: ServerProcess) -> None:
    assert_error(feature(server, SMALL, colour="red"), 400, "invalid_parameter", "colour: is not a known parameter")
    response = httpx.post(f"{server.url}/api/features", json={"type": "IMAGE_GENERATOR", "model": MODEL})
    assert_error(response, 400, "invalid_parameter", "promptObject: is required")
    response = httpx.post(f"{server.url}/api/features", content=b"{nope", headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_parameter", "not valid JSON")


def test_unknown_model_is_404(server: ServerProcess) -> None:
    response = feature(server, SMALL, model="black-forest-labs/flux-1.1-pro")
    assert_error(response, 404, "unknown_model", "unknown model 'black-forest-labs/flux-1.1-pro'")


def test_asset_upload_then_edit_keeps_the_input_size(server: ServerProcess) -> None:
    data = png_bytes(96, 64)
    response = upload(server, data)
    assert response.status_code == 200, response.text
    body = response.json()
    asset, content = body["asset"], body["fileContent"]
    assert asset["fieldname"] == "asset" and asset["originalname"] == "cat.png"
    assert asset["mimetype"] == "image/png" and asset["size"] == len(data) and asset["bucket"] == "kleinserve"
    key = asset["key"]
    assert content["path"] == key and content["type"] == "png" and key.endswith("/" + content["name"])
    assert str(uuid.UUID(content["uuid"])) == content["uuid"]
    assert download(asset["location"]).size == (96, 64)

    rec = record(feature(server, {**SMALL, "imageUrl": key, "prompt": "make it blue"}, "IMAGE_EDITOR"))
    assert rec["type"] == "IMAGE_EDITOR"
    echoed = rec["aiRecordDetail"]["promptObject"]
    assert echoed["imageUrl"] == key and echoed["aspect_ratio"] == "match_input_image" and echoed["go_fast"] is False
    assert download(rec["temporaryUrl"]).size == (96, 64)


def test_edit_a_previous_result_by_its_result_path(server: ServerProcess) -> None:
    first = record(feature(server, {**SMALL, "aspect_ratio": "16:9"}))
    path = first["aiRecordDetail"]["resultObject"][0]
    rec = record(feature(server, {**SMALL, "imageUrl": path, "aspect_ratio": "1:1"}, "IMAGE_EDITOR"))
    assert download(rec["temporaryUrl"]).size == (512, 512)
    rec = record(feature(server, {**SMALL, "imageUrl": path}, "IMAGE_EDITOR"))
    assert download(rec["temporaryUrl"]).size == (688, 384)


def test_edit_from_http_url_and_data_uri(server: ServerProcess, image_server: ImageServer) -> None:
    url = image_server.add("onemin-ref.png", png_bytes(80, 48))
    rec = record(feature(server, {**SMALL, "imageUrl": url}, "IMAGE_EDITOR"))
    assert download(rec["temporaryUrl"]).size == (80, 48)
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(64, 96)).decode()
    rec = record(feature(server, {**SMALL, "imageUrl": data_uri}, "IMAGE_EDITOR"))
    assert download(rec["temporaryUrl"]).size == (64, 96)


def test_unreachable_image_url_is_400_naming_image_url(server: ServerProcess) -> None:
    response = feature(server, {**SMALL, "imageUrl": "http://127.0.0.1:1/nothing.png"}, "IMAGE_EDITOR")
    assert_error(response, 400, "invalid_image", "promptObject.imageUrl: fetching http://127.0.0.1:1/nothing.png")


def test_bad_upload_is_400(server: ServerProcess) -> None:
    assert_error(upload(server, b"not an image at all", "notes.txt", "text/plain"), 400, "invalid_image", "asset: ")
    response = httpx.post(f"{server.url}/api/assets", files={"file": ("a.png", png_bytes(8, 8), "image/png")})
    assert_error(response, 400, "invalid_parameter", "asset: is required")


def test_relay_prompt_keys_and_record_fields(server: ServerProcess) -> None:
    # Keys 1min's own docs and relay projects send: n / num_outputs, size (negativePrompt: see above).
    sent = {**SMALL, "n": 2, "size": "96x64", "seed": 11, "output_format": "png"}
    rec = record(feature(server, sent))
    detail = rec["aiRecordDetail"]
    assert detail["promptObject"]["n"] == 2
    assert detail["promptObject"]["size"] == "96x64"
    assert detail["resultObject"] == [f"{rec['uuid']}/0.png", f"{rec['uuid']}/1.png"]
    assert len(rec["temporaryUrls"]) == 2 and rec["temporaryUrls"][0] == rec["temporaryUrl"]
    images = [download(url) for url in rec["temporaryUrls"]]
    assert [i.size for i in images] == [(96, 64), (96, 64)]
    for name in ("userId", "teamId", "metadata", "rating", "feedback", "conversationId", "additionalData"):
        assert name in rec
    # num_outputs means the same as n.
    same = record(feature(server, {**SMALL, "num_outputs": 2, "size": "96x64", "seed": 11, "output_format": "png"}))
    assert [httpx.get(u).content for u in same["temporaryUrls"]] == [httpx.get(u).content for u in rec["temporaryUrls"]]
    # size 'auto' is ignored (the aspect ratio decides); bad sizes and contradictions name their key.
    auto = record(feature(server, {**SMALL, "size": "auto", "aspect_ratio": "1:1"}))
    assert download(auto["temporaryUrl"]).size == size_for_aspect_ratio("1:1", 0.25)
    assert_error(feature(server, {**SMALL, "size": "100x64"}), 400, "invalid_parameter", "promptObject.size")
    assert_error(feature(server, {**SMALL, "size": "big"}), 400, "invalid_parameter", "promptObject.size")
    assert_error(feature(server, {**SMALL, "n": 2, "num_outputs": 3}), 400, "invalid_parameter", "num_outputs")
    assert_error(feature(server, {**SMALL, "n": 99}), 400, "invalid_parameter", "promptObject.n")
