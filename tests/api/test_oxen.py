"""The Oxen.ai dialect against a real server process: shapes, errors, queue, events, files."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest
from PIL import Image

from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes

MODEL = "black-forest-labs-flux-2-klein-4b"
SMALL = {"model": MODEL, "prompt": "a small test", "image_size": {"width": 64, "height": 64}}


def post(server: ServerProcess, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("timeout", 120)
    return httpx.post(server.url + path, json=body, **kwargs)


def wait_terminal(server: ServerProcess, generation_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item: dict[str, Any] = httpx.get(f"{server.url}/api/ai/queue/{generation_id}", timeout=10).json()
        if item["status"] in ("succeeded", "failed", "cancelled"):
            return item
        time.sleep(0.1)
    raise TimeoutError(generation_id)


def assert_oxen_error(response: httpx.Response, status: int, error_type: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and body["status_message"] == error_type
    assert body["error"]["type"] == error_type and body["error"]["title"]
    assert fragment in body["error"]["detail"] and body["error"]["message"] == body["error"]["detail"]


def test_sync_generate_shape_and_image(server: ServerProcess) -> None:
    response = post(server, "/api/ai/images/generate", {**SMALL, "seed": 3, "output_format": "jpg"})
    assert response.status_code == 200
    assert "X-Kleinserve-Demo" not in response.headers  # explicit models are never demo
    body = response.json()
    assert set(body) == {"model", "created", "images"} and body["model"] == MODEL
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 600
    (item,) = body["images"]
    image = Image.open(io.BytesIO(httpx.get(item["url"], timeout=30).content))
    assert image.format == "JPEG" and image.size == (64, 64)


def test_b64_json_and_same_seed_same_pixels(server: ServerProcess) -> None:
    body = {**SMALL, "seed": 11, "response_format": "b64_json"}
    first = post(server, "/api/ai/images/edit", body).json()["images"][0]["b64_json"]
    second = post(server, "/api/ai/images/generate", body).json()["images"][0]["b64_json"]
    assert first == second
    assert Image.open(io.BytesIO(base64.b64decode(first))).size == (64, 64)


def test_edit_with_references_of_every_transport(server: ServerProcess, image_server: ImageServer) -> None:
    url = image_server.add("ref-a.png", png_bytes(96, 64))
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
    response = post(server, "/api/ai/images/edit", {"model": MODEL, "prompt": "edit", "image": [url, data_uri]})
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(httpx.get(response.json()["images"][0]["url"], timeout=30).content))
    assert image.size == (96, 64)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"guidance_scale": 10.5}, "guidance_scale"),
        ({"aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_quality": "ultra"}, "output_quality"),
        ({"prompt": "   "}, "prompt: must not be empty"),
        ({"prompt": None}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"input_image": ["x"] * 5}, "input_image: at most 4 reference images"),
        ({"image_size": {"width": 100, "height": 64}}, "aspect_ratio: width and height must be multiples of 16"),
    ],
)
def test_bad_parameters_are_400_invalid_params(server: ServerProcess, change: dict[str, Any], fragment: str) -> None:
    body = {k: v for k, v in {**SMALL, **change}.items() if v is not None}
    for path in ("/api/ai/images/edit", "/api/ai/queue"):
        assert_oxen_error(post(server, path, body), 400, "invalid_params", fragment)


def test_malformed_json_is_400(server: ServerProcess) -> None:
    response = httpx.post(
        server.url + "/api/ai/images/edit", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_oxen_error(response, 400, "invalid_params", "not valid JSON")


def test_unknown_model_is_404(server: ServerProcess) -> None:
    for path in ("/api/ai/images/generate", "/api/ai/queue"):
        response = post(server, path, {**SMALL, "model": "stability-sdxl"})
        assert_oxen_error(response, 404, "resource_not_found", "unknown model 'stability-sdxl'")


def test_queue_generations_seeds_and_echo(server: ServerProcess) -> None:
    body = {**SMALL, "num_generations": 3, "seed": 40, "output_format": "webp", "output_quality": "high"}
    response = post(server, "/api/ai/queue", body)
    assert response.status_code == 200
    generations = response.json()["generations"]
    assert [g["status"] for g in generations] == ["queued"] * 3
    items = [wait_terminal(server, g["generation_id"]) for g in generations]
    assert [i["seed"] for i in items] == [40, 41, 42]
    for item in items:
        assert item["status"] == "succeeded" and item["error_message"] is None
        assert item["model_name"] == MODEL and item["media_type"] == "image" and item["prompt"] == "a small test"
        assert item["enqueued_at"] <= item["started_at"] <= item["completed_at"]
        assert item["output_format"] == "webp" and item["output_quality"] == "high"
        assert item["progress"] == 1.0 and item["progress_step"] == 4 and item["progress_total"] == 4
        assert Image.open(io.BytesIO(httpx.get(item["result_url"], timeout=30).content)).format == "WEBP"
    assert len({i["result_url"] for i in items}) == 3


def test_unknown_fields_are_accepted_ignored_and_echoed(server: ServerProcess) -> None:
    # Fields a public Oxen queue client sends whenever its caller sets them; klein has no use for them.
    extra = {"safety_tolerance": 2, "resolution": "1K", "quality": "high", "size": "1024x1024", "background": "auto"}
    response = post(server, "/api/ai/queue", {**SMALL, "seed": 5, **extra})
    assert response.status_code == 200, response.text
    item = wait_terminal(server, response.json()["generations"][0]["generation_id"])
    assert item["status"] == "succeeded"
    assert {k: item[k] for k in extra} == extra
    plain = post(server, "/api/ai/queue", {**SMALL, "seed": 5}).json()["generations"][0]["generation_id"]
    # Ignored: the same pixels as without them.
    first, second = (httpx.get(i["result_url"], timeout=30).content for i in (item, wait_terminal(server, plain)))
    assert first == second
    # Known fields are still checked.
    assert_oxen_error(post(server, "/api/ai/queue", {**SMALL, **extra, "seed": -1}), 400, "invalid_params", "seed")


def test_favorites(server: ServerProcess) -> None:
    other = "black-forest-labs-flux-2-klein-base-4b"
    assert httpx.get(f"{server.url}/api/ai/models/favorites").json() == {"object": "list", "data": []}
    for model in (MODEL, other, MODEL):
        response = httpx.post(f"{server.url}/api/ai/models/{model}/favorite")
        assert response.status_code == 200 and response.json()["favorite"] is True
    favorites = httpx.get(f"{server.url}/api/ai/models/favorites").json()["data"]
    assert [m["id"] for m in favorites] == [MODEL, other]
    assert httpx.delete(f"{server.url}/api/ai/models/{MODEL}/favorite").json()["favorite"] is False
    assert [m["id"] for m in httpx.get(f"{server.url}/api/ai/models/favorites").json()["data"]] == [other]
    assert_oxen_error(httpx.post(f"{server.url}/api/ai/models/nope/favorite"), 404, "resource_not_found", "nope")
    httpx.delete(f"{server.url}/api/ai/models/{other}/favorite")


def test_num_generations_bounds(server: ServerProcess) -> None:
    assert_oxen_error(
        post(server, "/api/ai/queue", {**SMALL, "num_generations": 5}), 400, "invalid_params", "num_generations"
    )
    assert_oxen_error(
        post(server, "/api/ai/queue", {**SMALL, "num_generations": 0}), 400, "invalid_params", "num_generations"
    )


def test_failed_generation_reports_its_reason(server: ServerProcess) -> None:
    # URLs are fetched at submission: an unreachable one is a 400 at once.
    unreachable = post(server, "/api/ai/queue", {**SMALL, "input_image": "http://127.0.0.1:1/nothing.png"})
    assert_oxen_error(unreachable, 400, "invalid_params", "input_image: fetching http://127.0.0.1:1/nothing.png failed")
    # A PNG whose header reads but whose pixels are cut short is accepted, and fails in the worker.
    truncated = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)[:-40]).decode()
    response = post(server, "/api/ai/queue", {**SMALL, "input_image": truncated})
    item = wait_terminal(server, response.json()["generations"][0]["generation_id"])
    assert item["status"] == "failed" and item["result_url"] is None
    assert "images[0]: image data is corrupt or truncated" in item["error_message"]


def test_unknown_generation_is_404(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/api/ai/queue/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "resource_not_found" and response.json()["status"] == "error"
    assert httpx.delete(f"{server.url}/api/ai/queue/nope").status_code == 404


def test_cancel_a_running_generation(server: ServerProcess) -> None:
    slow = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}
    generation_id = post(server, "/api/ai/queue", slow).json()["generations"][0]["generation_id"]
    deadline = time.monotonic() + 60
    while (running := httpx.get(f"{server.url}/api/ai/queue/{generation_id}").json())["progress_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Oxen's clients parse progress as a number: here a fraction of the 50 steps.
    assert isinstance(running["progress"], float) and 0 < running["progress"] < 1 and running["progress_total"] == 50
    response = httpx.delete(f"{server.url}/api/ai/queue/{generation_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "success" and response.json()["generation_id"] == generation_id
    item = wait_terminal(server, generation_id)
    assert item["status"] == "cancelled" and item["progress_step"] < 50 and item["result_url"] is None
    # Cancelling a finished generation changes nothing.
    again = httpx.delete(f"{server.url}/api/ai/queue/{generation_id}").json()
    assert again["generation_status"] == "cancelled"


def test_list_defaults_to_active_and_filters(server: ServerProcess) -> None:
    generation_id = post(server, "/api/ai/queue", SMALL).json()["generations"][0]["generation_id"]
    wait_terminal(server, generation_id)
    done = httpx.get(f"{server.url}/api/ai/queue", params={"status": "succeeded"}).json()
    assert done["count"] == len(done["generations"]) and generation_id in [
        g["generation_id"] for g in done["generations"]
    ]
    active = httpx.get(f"{server.url}/api/ai/queue").json()
    assert all(g["status"] in ("queued", "processing") for g in active["generations"])
    other = httpx.get(
        f"{server.url}/api/ai/queue", params={"status": "succeeded", "model": "flux2-klein-base-4b"}
    ).json()
    assert generation_id not in [g["generation_id"] for g in other["generations"]]
    assert httpx.get(f"{server.url}/api/ai/queue", params={"status": "bogus"}).status_code == 400


def read_events(
    server: ServerProcess, headers: dict[str, str], until: str, timeout: float = 60, path: str = "/api/events"
) -> list[dict[str, str]]:
    """Raw SSE frames until one whose data contains ``until``."""
    frames: list[dict[str, str]] = []
    current: dict[str, str] = {}
    with httpx.stream("GET", f"{server.url}{path}", headers=headers, timeout=timeout) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "":
                if current:
                    frames.append(current)
                    if until in current.get("data", ""):
                        return frames
                current = {}
                continue
            field, _, value = line.partition(": ") if not line.startswith(":") else ("comment", "", line[1:].strip())
            current[field] = value
    raise AssertionError("stream ended")


def test_events_stream_completion_progress_and_resume(server: ServerProcess) -> None:
    generation_id = post(server, "/api/ai/queue", SMALL).json()["generations"][0]["generation_id"]
    frames = read_events(server, {}, f'"generation_id":"{generation_id}","status":"succeeded"')
    mine = [f for f in frames if generation_id in f.get("data", "")]
    names = [f["event"] for f in mine]
    assert names[0] == "kleinserve.generation.queued" and names[1] == "kleinserve.generation.started"
    assert names.count("kleinserve.generation.progress") == 4 and names[-1] == "media_generation_completed"
    completed = json.loads(mine[-1]["data"])
    assert set(completed) == {"generation_id", "status", "media_type", "model", "url"}
    assert completed["model"] == MODEL and completed["media_type"] == "image"
    assert " " not in mine[-1]["data"]  # compact: the seed's awk client matches "generation_id":"<id>"
    ids = [int(f["id"]) for f in frames if "id" in f]
    assert ids == sorted(ids)
    # Resume: everything after the first progress event, and nothing before it.
    first_progress = next(f for f in mine if f["event"] == "kleinserve.generation.progress")
    resumed = read_events(
        server, {"Last-Event-ID": first_progress["id"]}, f'"generation_id":"{generation_id}","status":"succeeded"'
    )
    resumed_mine = [f["event"] for f in resumed if generation_id in f.get("data", "")]
    assert resumed_mine == names[names.index("kleinserve.generation.progress") + 1 :]


def test_events_keep_alive_comment(server: ServerProcess) -> None:
    with httpx.stream(
        "GET", f"{server.url}/api/events", headers={"Last-Event-ID": "999999999"}, timeout=10
    ) as response:
        for line in response.iter_lines():
            if line.startswith(":"):
                assert line == ": keep-alive"
                break


def test_failed_generation_event(server: ServerProcess) -> None:
    truncated = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)[:-40]).decode()  # fails to decode
    generation_id = post(server, "/api/ai/queue", {**SMALL, "input_image": truncated}).json()["generations"][0][
        "generation_id"
    ]
    frames = read_events(server, {}, f'"generation_id":"{generation_id}","status":"failed"')
    completed = [f for f in frames if f.get("event") == "media_generation_completed" and generation_id in f["data"]]
    payload = json.loads(completed[0]["data"])
    assert payload["status"] == "failed" and "images[0]" in payload["error"] and "url" not in payload


def test_models_list_get_and_schema(server: ServerProcess) -> None:
    listed = httpx.get(f"{server.url}/api/ai/models").json()
    assert listed["object"] == "list"
    ids = [m["id"] for m in listed["data"]]
    assert ids == [
        MODEL,
        "black-forest-labs-flux-2-klein-9b",
        "black-forest-labs-flux-2-klein-base-4b",
        "black-forest-labs-flux-2-klein-base-9b",
    ]
    for alias in (MODEL, "flux2-klein-4b", "black-forest-labs/flux-2-klein-4b"):
        model = httpx.get(f"{server.url}/api/ai/models/{alias}").json()
        assert model["id"] == MODEL and model["object"] == "model" and model["demo"] is False
    assert model["json_request_schema"] == model["request_schema"]
    schema = model["json_request_schema"]
    jsonschema.validate({"model": MODEL, "prompt": "x", "aspect_ratio": "16:9", "output_format": "jpg"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": MODEL, "prompt": "x", "num_inference_steps": 51}, schema)
    missing = httpx.get(f"{server.url}/api/ai/models/black-forest-labs-flux-1-dev")
    assert missing.status_code == 404 and "Model not found" in missing.json()["error"]["message"]
    found = httpx.get(f"{server.url}/api/ai/models/search", params={"search": "base"}).json()
    assert [m["id"] for m in found["data"]] == [
        "black-forest-labs-flux-2-klein-base-4b",
        "black-forest-labs-flux-2-klein-base-9b",
    ]


def test_signed_file_urls(server: ServerProcess) -> None:
    url = post(server, "/api/ai/images/edit", SMALL).json()["images"][0]["url"]
    assert httpx.get(url).status_code == 200
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    response = httpx.get(tampered)
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert httpx.get(url.split("?")[0]).status_code == 403
    for attempt in ("/files/../jobs.sqlite3", "/files/%2e%2e/secret.key", "/files/..%2fsecret.key"):
        assert httpx.get(server.url + attempt + "?expires=1&sig=00").status_code in (403, 404)


def test_twenty_concurrent_sync_requests(server: ServerProcess) -> None:
    # The timeout is a hang guard, not a speed claim: the 20 jobs share one worker, and on a loaded
    # 2-core machine the last one waited over 120 s.
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(
            pool.map(lambda i: post(server, "/api/ai/images/generate", {**SMALL, "seed": i}, timeout=600), range(20))
        )
    assert [r.status_code for r in responses] == [200] * 20
    urls = {r.json()["images"][0]["url"] for r in responses}
    assert len(urls) == 20


def test_sync_client_disconnect_cancels_its_job(server: ServerProcess) -> None:
    # Keep the worker busy so the sync job is still waiting when its client goes away.
    blocker = post(
        server, "/api/ai/queue", {**SMALL, "image_size": {"width": 1024, "height": 1024}, "num_inference_steps": 50}
    )
    blocker_id = blocker.json()["generations"][0]["generation_id"]
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/api/ai/images/generate", json={**SMALL, "prompt": "disconnect me"}, timeout=1.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = httpx.get(f"{server.url}/api/ai/queue", params={"status": "cancelled"}).json()["generations"]
            if any(j["prompt"] == "disconnect me" for j in jobs):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the disconnected client's job was not cancelled")
    finally:
        httpx.delete(f"{server.url}/api/ai/queue/{blocker_id}")


def test_readyz_and_healthz(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["demo"] is False and ready["device"] == "cpu"
    assert ready["models"] == ["flux-2-klein-4b", "flux-2-klein-9b", "flux-2-klein-base-4b", "flux-2-klein-base-9b"]


def test_openapi_documents_the_routes(server: ServerProcess) -> None:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/api/ai/images/generate", "/api/ai/images/edit", "/api/ai/queue", "/api/events", "/api/ai/models"):
        assert path in paths


def test_unknown_route_is_404_in_oxen_shape(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/api/ai/nothing-here")
    assert response.status_code == 404 and response.json()["status_message"] == "resource_not_found"


def test_preview_events_are_opt_in(server: ServerProcess) -> None:
    body = {**SMALL, "num_inference_steps": 3, "previews": 2}
    generation_id = post(server, "/api/ai/queue", body).json()["generations"][0]["generation_id"]
    until = f'"generation_id":"{generation_id}","status":"succeeded"'
    plain = read_events(server, {}, until)
    assert not [f for f in plain if f.get("event") == "kleinserve.generation.preview"]
    # The same events again, replayed from before this generation's first one, now with its previews.
    first = min(int(f["id"]) for f in plain if generation_id in f.get("data", "") and "id" in f)
    frames = read_events(server, {"Last-Event-ID": str(first - 1)}, until, path="/api/events?previews=true")
    previews = [json.loads(f["data"]) for f in frames if f.get("event") == "kleinserve.generation.preview"]
    assert [(p["index"], p["step"], p["total"]) for p in previews] == [(0, 1, 3), (1, 2, 3)]
    for preview in previews:
        assert preview["generation_id"] == generation_id and preview["status"] == "preview"
        assert preview["key"] == f"{generation_id}/preview-{preview['index']}.jpg"
        assert preview["media_type"] == "image/jpeg"
        image = Image.open(io.BytesIO(httpx.get(preview["url"], timeout=30).content))
        assert (image.format, image.size) == ("JPEG", (64, 64))
