"""`kleinserve serve` with its results in S3 (SeaweedFS on loopback): links are presigned S3 URLs that
download the image, uploads land in the bucket and feed edits, and nothing is written to local disk."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from tests.api.conftest import ServerProcess
from tests.conftest import png_bytes
from tests.services.seaweed import S3Server

SMALL = {"model": "black-forest-labs-flux-2-klein-4b", "prompt": "s3", "image_size": {"width": 64, "height": 64}}


@pytest.fixture(scope="module")
def s3_serve(
    seaweed: S3Server, tiny_distilled: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    prefix = f"serve-{uuid.uuid4().hex}/"
    process = ServerProcess(
        tmp_path_factory.mktemp("s3-serve"),
        [f"flux-2-klein-4b={tiny_distilled}"],
        "--dtype",
        "float32",
        "--device",
        "cpu",
        env=seaweed.env(prefix),
    ).start()
    yield process, prefix
    process.stop()


def test_results_are_presigned_s3_urls(s3_serve: tuple[ServerProcess, str], seaweed: S3Server) -> None:
    server, prefix = s3_serve
    response = httpx.post(f"{server.url}/api/ai/images/generate", json=SMALL, timeout=180)
    assert response.status_code == 200, response.text
    url = response.json()["images"][0]["url"]
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == seaweed.endpoint_url
    assert parts.path.startswith(f"/{seaweed.bucket}/{prefix}") and parts.path.endswith("/0.png")
    assert "X-Amz-Signature=" in parts.query and "X-Amz-Expires=3600" in parts.query
    download = httpx.get(url, timeout=30)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (64, 64)
    # Tampered with, the link is refused by the store itself.
    assert httpx.get(url.replace("/0.png", "/1.png"), timeout=30).status_code == 403

    # b64_json reads the object back through the server.
    body = httpx.post(
        f"{server.url}/api/ai/images/generate", json={**SMALL, "response_format": "b64_json"}, timeout=180
    ).json()
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64_json"]))).size == (64, 64)

    # No /files route serves anything, and no result file was written to local disk.
    key = parts.path.removeprefix(f"/{seaweed.bucket}/{prefix}")
    assert httpx.get(f"{server.url}/files/{key}?expires=9999999999&sig={'0' * 64}").status_code == 404
    assert not (server.data_dir / "files").exists()


def test_uploads_live_in_s3_and_feed_edits(s3_serve: tuple[ServerProcess, str], seaweed: S3Server) -> None:
    server, prefix = s3_serve
    files = {"asset": ("cat.png", png_bytes(96, 64), "image/png")}
    upload = httpx.post(f"{server.url}/api/assets", files=files, timeout=60)
    assert upload.status_code == 200, upload.text
    asset = upload.json()["asset"]
    assert asset["location"].startswith(f"{seaweed.endpoint_url}/{seaweed.bucket}/{prefix}uploads/")
    assert Image.open(io.BytesIO(httpx.get(asset["location"], timeout=30).content)).size == (96, 64)
    seaweed.client().head_object(Bucket=seaweed.bucket, Key=prefix + asset["key"])

    edit = {**SMALL, "input_image": "asset:" + asset["key"], "prompt": "make it blue"}
    response = httpx.post(f"{server.url}/api/ai/images/edit", json=edit, timeout=180)
    assert response.status_code == 200, response.text
    assert httpx.get(response.json()["images"][0]["url"], timeout=30).status_code == 200
