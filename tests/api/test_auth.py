"""API keys, limits, credits and isolation against a real server that has keys."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kleinserve.keys import KeyStore
from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes

MODEL = "black-forest-labs-flux-2-klein-4b"
SMALL = {"model": MODEL, "prompt": "keyed", "image_size": {"width": 64, "height": 64}}
SLOW = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 40}


class Keys:
    """The secrets of the keys this module's server knows."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.secret: dict[str, str] = {}

    def create(self, name: str, **limits: Any) -> str:
        _, secret = self.store.create(name, **limits)
        self.secret[name] = secret
        return secret


@pytest.fixture(scope="module")
def keyed(tiny_distilled: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Keys]]:
    data_dir = tmp_path_factory.mktemp("keyed")
    keys = Keys(KeyStore(data_dir / "jobs.sqlite3"))
    keys.create("alice")
    keys.create("bob")
    keys.create("revoked")
    keys.create("slow-rate", requests_per_minute=3)
    keys.create("few-images", images_per_minute=2)
    keys.create("single", concurrency=1)
    keys.create("thrifty", credits=0.1)  # 2 images at the default 0.04
    server = ServerProcess(
        data_dir,
        [f"flux-2-klein-4b={tiny_distilled}"],
        "--dtype",
        "float32",
        "--fetch-allow",  # the flag form of KLEINSERVE_FETCH_ALLOW
        "127.0.0.1",
        env={"KLEINSERVE_MAX_BODY_BYTES": "65536"},
    ).start()
    yield server, keys
    server.stop()


def auth(keys: Keys, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.secret[name]}"}


def queue(server: ServerProcess, headers: dict[str, str], body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/api/ai/queue", json=body or SMALL, headers=headers, timeout=60)


def wait_done(server: ServerProcess, headers: dict[str, str], generation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        item: dict[str, Any] = httpx.get(f"{server.url}/api/ai/queue/{generation_id}", headers=headers).json()
        if item["status"] in ("succeeded", "failed", "cancelled"):
            return item
        time.sleep(0.1)
    raise TimeoutError(generation_id)


def test_no_key_is_401_in_every_dialect(keyed: tuple[ServerProcess, Keys]) -> None:
    server, _ = keyed
    oxen = httpx.post(f"{server.url}/api/ai/images/generate", json=SMALL)
    assert oxen.status_code == 401 and oxen.json()["error"]["type"] == "unauthenticated"
    assert oxen.headers["WWW-Authenticate"].startswith("Bearer")
    openai = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"})
    assert openai.status_code == 401 and openai.json()["error"]["type"] == "authentication_error"
    onemin = httpx.post(
        f"{server.url}/api/features", json={"type": "IMAGE_GENERATOR", "model": "x", "promptObject": {}}
    )
    assert onemin.status_code == 401 and onemin.json()["statusCode"] == 401
    verda = httpx.post(f"{server.url}/flux2-klein-4b/generate", json={"prompt": "x"})
    assert verda.status_code == 401 and "API key" in verda.json()["detail"]
    assert httpx.get(f"{server.url}/api/ai/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer ks-wrong"}).status_code == 401
    # Health, readiness and the docs stay open.
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200


@pytest.mark.parametrize("header", ["Authorization", "API-KEY", "X-API-Key"])
def test_every_provider_header_works(keyed: tuple[ServerProcess, Keys], header: str) -> None:
    server, keys = keyed
    secret = keys.secret["alice"]
    value = f"Bearer {secret}" if header == "Authorization" else secret
    response = httpx.post(f"{server.url}/api/ai/images/generate", json=SMALL, headers={header: value}, timeout=60)
    assert response.status_code == 200, response.text


def test_revoked_key_stops_working_at_once(keyed: tuple[ServerProcess, Keys]) -> None:
    server, keys = keyed
    assert httpx.get(f"{server.url}/v1/models", headers=auth(keys, "revoked")).status_code == 200
    keys.store.revoke("revoked")
    response = httpx.get(f"{server.url}/v1/models", headers=auth(keys, "revoked"))
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]


def test_request_rate_limit_is_429_with_retry_after(keyed: tuple[ServerProcess, Keys]) -> None:
    server, keys = keyed
    codes = [httpx.get(f"{server.url}/v1/models", headers=auth(keys, "slow-rate")).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    limited = httpx.get(f"{server.url}/v1/models", headers=auth(keys, "slow-rate"))
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    oxen = httpx.get(f"{server.url}/api/ai/models", headers=auth(keys, "slow-rate"))
    assert oxen.status_code == 429 and oxen.json()["error"]["type"] == "rate_limited"


def test_image_rate_counts_images(keyed: tuple[ServerProcess, Keys]) -> None:
    server, keys = keyed
    three = queue(server, auth(keys, "few-images"), {**SMALL, "num_generations": 3})
    assert three.status_code == 429 and "images per minute" in three.json()["error"]["detail"]
    two = queue(server, auth(keys, "few-images"), {**SMALL, "num_generations": 2})
    assert two.status_code == 200
    assert queue(server, auth(keys, "few-images")).status_code == 429


def test_concurrency_limit(keyed: tuple[ServerProcess, Keys]) -> None:
    server, keys = keyed
    first = queue(server, auth(keys, "single"), SLOW)
    assert first.status_code == 200
    second = queue(server, auth(keys, "single"))
    assert second.status_code == 429 and "at once" in second.json()["error"]["detail"]
    generation_id = first.json()["generations"][0]["generation_id"]
    httpx.delete(f"{server.url}/api/ai/queue/{generation_id}", headers=auth(keys, "single"))
    wait_done(server, auth(keys, "single"), generation_id)
    assert queue(server, auth(keys, "single")).status_code == 200


def test_credits_are_charged_only_for_success(keyed: tuple[ServerProcess, Keys], tmp_path: Path) -> None:
    server, keys = keyed
    headers = auth(keys, "thrifty")
    # A PNG whose header reads but whose pixels are cut short: accepted at submission, fails to decode.
    truncated = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)[:-40]).decode()
    failed = queue(server, headers, {**SMALL, "input_image": truncated})
    assert wait_done(server, headers, failed.json()["generations"][0]["generation_id"])["status"] == "failed"
    usage = httpx.get(f"{server.url}/v1/usage", headers=headers).json()
    assert usage["spent"] == 0 and usage["remaining"] == pytest.approx(0.1)
    ok = queue(server, headers, {**SMALL, "num_generations": 2})
    assert ok.status_code == 200
    for generation in ok.json()["generations"]:
        assert wait_done(server, headers, generation["generation_id"])["status"] == "succeeded"
    broke = queue(server, headers)
    assert broke.status_code == 402 and broke.json()["error"]["type"] == "insufficient_credits"
    openai = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers=headers)
    assert openai.status_code == 402 and openai.json()["error"]["type"] == "insufficient_credits"
    usage = httpx.get(f"{server.url}/v1/usage", headers=headers).json()
    assert usage["images"] == 2 and usage["spent"] == pytest.approx(0.08) and usage["remaining"] == pytest.approx(0.02)
    assert usage["by_model"]["flux-2-klein-4b"]["images"] == 2
    done = subprocess.run(
        [sys.executable, "-m", "kleinserve", "keys", "usage", "thrifty", "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "2 images" in done.stdout and "spent 0.08" in done.stdout


def test_keys_see_only_their_own_jobs(keyed: tuple[ServerProcess, Keys]) -> None:
    server, keys = keyed
    mine = queue(server, auth(keys, "alice")).json()["generations"][0]["generation_id"]
    wait_done(server, auth(keys, "alice"), mine)
    assert httpx.get(f"{server.url}/api/ai/queue/{mine}", headers=auth(keys, "bob")).status_code == 404
    assert httpx.delete(f"{server.url}/api/ai/queue/{mine}", headers=auth(keys, "bob")).status_code == 404
    theirs = httpx.get(f"{server.url}/api/ai/queue", params={"status": "succeeded"}, headers=auth(keys, "bob")).json()
    assert mine not in [g["generation_id"] for g in theirs["generations"]]
    own = httpx.get(f"{server.url}/api/ai/queue", params={"status": "succeeded"}, headers=auth(keys, "alice")).json()
    assert mine in [g["generation_id"] for g in own["generations"]]


def test_events_stream_only_the_callers_jobs(keyed: tuple[ServerProcess, Keys]) -> None:
    server, keys = keyed
    alices = queue(server, auth(keys, "alice")).json()["generations"][0]["generation_id"]
    bobs = queue(server, auth(keys, "bob")).json()["generations"][0]["generation_id"]
    wait_done(server, auth(keys, "bob"), bobs)
    seen = ""
    with httpx.stream("GET", f"{server.url}/api/events", headers=auth(keys, "bob"), timeout=30) as response:
        for line in response.iter_lines():
            seen += line + "\n"
            if f'"generation_id":"{bobs}","status":"succeeded"' in line:
                break
    assert bobs in seen and alices not in seen


def test_body_size_cap_is_413(keyed: tuple[ServerProcess, Keys]) -> None:
    server, keys = keyed
    big = {**SMALL, "prompt": "x" * 70_000}
    response = httpx.post(f"{server.url}/api/ai/images/generate", json=big, headers=auth(keys, "alice"))
    assert response.status_code == 413 and response.json()["status_message"] == "payload_too_large"
    openai = httpx.post(f"{server.url}/v1/images/generations", json=big, headers=auth(keys, "alice"))
    assert openai.status_code == 413 and openai.json()["error"]["type"] == "request_too_large"


def test_fetch_allow_flag_admits_loopback_images(keyed: tuple[ServerProcess, Keys], image_server: ImageServer) -> None:
    server, keys = keyed
    url = image_server.add("allowed.png", png_bytes(64, 64))
    response = httpx.post(
        f"{server.url}/api/ai/images/edit", json={**SMALL, "input_image": url}, headers=auth(keys, "alice"), timeout=60
    )
    assert response.status_code == 200, response.text


def test_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kleinserve", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "without API keys" in done.stderr and "--insecure-no-auth" in done.stderr
