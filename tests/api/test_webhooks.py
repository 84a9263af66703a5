"""Webhooks against real servers: a loopback receiver verifies every delivery with the
``standardwebhooks`` package, answers 500 to see retries, and outlives a server restart."""

from __future__ import annotations

import base64
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from kleinserve.webhooks.signing import encode_secret
from tests.api.conftest import OpsServer, ServerProcess
from tests.conftest import loopback_server, png_bytes

SMALL = {"model": "flux-2-klein-4b", "prompt": "hooked", "image_size": {"width": 64, "height": 64}}


@dataclass
class Receiver:
    """Collects POSTs; answers each with the next status of ``statuses`` (then 200)."""

    port: int = 0
    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def wait(self, count: int, timeout: float = 120) -> list[tuple[dict[str, str], bytes, int]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.received)} of {count} deliveries arrived")

    def wait_for_status(self, status: int, timeout: float = 120) -> list[tuple[dict[str, str], bytes, int]]:
        """Every delivery up to the first one answered with ``status``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for index, (_, _, answered) in enumerate(self.received):
                    if answered == status:
                        return self.received[: index + 1]
            time.sleep(0.05)
        raise AssertionError(f"no delivery answered {status}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with box.lock:
                status = box.statuses.pop(0) if box.statuses else box.default_status
                box.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with loopback_server(Handler, threading.Event()) as port:
        box.port = port
        yield box


def verified(secret: str, delivery: tuple[dict[str, str], bytes, int]) -> dict[str, Any]:
    headers, body, _ = delivery
    payload: dict[str, Any] = Webhook(secret).verify(body, headers)  # raises unless signed right
    return payload


def secret_of(server: ServerProcess, headers: dict[str, str]) -> str:
    response = httpx.get(f"{server.url}/api/webhooks/secret", headers=headers)
    assert response.status_code == 200, response.text
    secret: str = response.json()["secret"]
    return secret


def test_queued_job_is_signed_and_retried_after_500s(ops_server: OpsServer, receiver: Receiver) -> None:
    server, key = ops_server.server, {"Authorization": f"Bearer {ops_server.secret}"}
    receiver.statuses = [500, 500]
    response = httpx.post(f"{server.url}/api/ai/queue", json={**SMALL, "webhook_url": receiver.url}, headers=key)
    assert response.status_code == 200, response.text
    job_id = response.json()["generations"][0]["generation_id"]
    deliveries = receiver.wait(3)
    secret = secret_of(server, key)
    payloads = [verified(secret, d) for d in deliveries]
    assert [status for _, _, status in deliveries] == [500, 500, 200]
    assert len({headers["webhook-id"] for headers, _, _ in deliveries}) == 1  # one message, retried
    assert payloads[0] == payloads[2]
    assert payloads[0]["type"] == "job.succeeded"
    data = payloads[0]["data"]
    assert data["id"] == job_id and data["status"] == "succeeded" and data["dialect"] == "oxen"
    assert data["safety"]["flagged"] == [True]  # the operations server flags everything
    image = httpx.get(data["outputs"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    other = encode_secret(b"another key's secret, 32 bytes!!")
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(deliveries[2][1], deliveries[2][0])  # a delivery verifies only with its secret
    log = httpx.get(f"{server.url}/api/webhooks/{job_id}", headers=key).json()["deliveries"]
    assert len(log) == 1 and log[0]["status"] == "delivered" and log[0]["attempts"] == 3
    assert [a["status_code"] for a in log[0]["attempts_log"]] == [500, 500, 200]
    assert httpx.get(f"{server.url}/api/webhooks/{job_id}").status_code == 401  # another caller


def test_the_header_works_in_every_other_dialect(ops_server: OpsServer, receiver: Receiver) -> None:
    server, key = ops_server.server, {"Authorization": f"Bearer {ops_server.secret}"}
    hook = {**key, "X-Kleinserve-Webhook": receiver.url}
    openai = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": "flux-2-klein-4b", "prompt": "o", "size": "64x64"},
        headers=hook,
        timeout=120,
    )
    verda = httpx.post(f"{server.url}/flux2-klein-4b/generate", json={"prompt": "v", "width": 64, "height": 64},
                       headers=hook, timeout=120)  # fmt: skip
    onemin = httpx.post(
        f"{server.url}/api/features",
        json={"type": "IMAGE_GENERATOR", "model": "black-forest-labs/flux-2-klein-4b",
              "promptObject": {"prompt": "m", "megapixels": "0.25", "num_inference_steps": 1}},
        headers={"API-KEY": ops_server.secret, "X-Kleinserve-Webhook": receiver.url},
        timeout=120,
    )  # fmt: skip
    failing = httpx.post(
        f"{server.url}/api/ai/queue",
        # Header fine, pixels cut short: accepted at submission, fails in the worker.
        json={**SMALL, "input_image": "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)[:-40]).decode()},
        headers=hook,
    )
    assert all(r.status_code == 200 for r in (openai, verda, onemin, failing)), [openai.text, onemin.text]
    secret = secret_of(server, key)
    payloads = [verified(secret, d) for d in receiver.wait(4)]
    by_dialect = {p["data"]["dialect"]: p for p in payloads}
    assert set(by_dialect) == {"openai", "verda", "onemin", "oxen"}
    assert by_dialect["oxen"]["type"] == "job.failed" and by_dialect["oxen"]["data"]["error"]["code"]
    assert all(by_dialect[d]["type"] == "job.succeeded" for d in ("openai", "verda", "onemin"))


def test_unsafe_webhook_urls_are_refused_in_the_dialects_shape(server: ServerProcess) -> None:
    metadata = "http://169.254.169.254/latest"  # link-local: refused unless KLEINSERVE_FETCH_ALLOW
    oxen = httpx.post(f"{server.url}/api/ai/queue", json={**SMALL, "webhook_url": metadata})
    assert oxen.status_code == 400 and "webhook_url" in oxen.text and "cloud metadata address" in oxen.text
    openai = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": "flux-2-klein-4b", "prompt": "o", "size": "64x64"},
        headers={"X-Kleinserve-Webhook": "ftp://example.com/x"},
    )
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "X-Kleinserve-Webhook"


def test_a_delivery_outlives_a_server_restart(tiny_distilled: Path, tmp_path: Path, receiver: Receiver) -> None:
    def start() -> ServerProcess:
        return ServerProcess(
            tmp_path,
            [f"flux-2-klein-4b={tiny_distilled}"],
            "--dtype",
            "float32",
            env={"KLEINSERVE_FETCH_ALLOW": "127.0.0.1", "KLEINSERVE_WEBHOOK_RETRY_SCHEDULE": ",".join(["1"] * 30)},
        ).start()

    receiver.default_status = 503  # down for as long as the first server runs
    server = start()
    try:
        response = httpx.post(f"{server.url}/api/ai/queue", json={**SMALL, "webhook_url": receiver.url})
        job_id = response.json()["generations"][0]["generation_id"]
        receiver.wait(1)
    finally:
        server.stop()
    receiver.default_status = 200  # back up, but only after the server has gone
    restarted = start()
    try:
        deliveries = receiver.wait_for_status(200)
        assert {d[2] for d in deliveries[:-1]} == {503} and deliveries[-1][2] == 200
        assert len({d[0]["webhook-id"] for d in deliveries}) == 1  # the same stored message
        secret = secret_of(restarted, {})  # the server secret survived with the data dir
        payloads = [verified(secret, d) for d in deliveries]
        assert payloads[-1]["data"]["id"] == job_id and payloads[-1]["type"] == "job.succeeded"
        log = httpx.get(f"{restarted.url}/api/webhooks/{job_id}").json()["deliveries"][0]
        assert log["status"] == "delivered" and log["attempts"] == len(deliveries)
        assert [a["status_code"] for a in log["attempts_log"]] == [d[2] for d in deliveries]
    finally:
        restarted.stop()
