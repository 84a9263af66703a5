"""Structured logs and request ids, read back from real servers' log files."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kleinserve.jobs.store.sqlite import SQLiteJobStore
from kleinserve.keys import KeyStore
from tests.api.conftest import OpsServer, ServerProcess

MODEL = "black-forest-labs-flux-2-klein-4b"


def small(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "image_size": {"width": 64, "height": 64}}


# Lines torch and diffusers write with their own handlers while being imported (before kleinserve
# can route their loggers through its own; see logs.adopt_library_loggers).
LIBRARY_LINE = re.compile(r"^[WIE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*torch/|^Unable to import `torchao`")


def json_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line of the log: each is one JSON object, but for the libraries' import-time lines."""
    lines = [line for line in server.log().splitlines() if line.strip() and not LIBRARY_LINE.search(line)]
    return [json.loads(line) for line in lines]


def wait_for(read: Callable[[], list[Any]], found: Callable[[Any], bool], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for item in read():
            if found(item):
                return item
        time.sleep(0.1)
    raise AssertionError("log line never appeared")


def test_json_lines_carry_request_job_and_key_ids(ops_server: OpsServer) -> None:
    server, secret = ops_server.server, ops_server.secret
    request_id = f"client-{uuid.uuid4().hex[:8]}"
    prompt = f"a lighthouse {uuid.uuid4().hex}"
    response = httpx.post(
        f"{server.url}/api/ai/queue",
        json=small(prompt),
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": request_id},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    job_id = response.json()["generations"][0]["generation_id"]

    done = wait_for(lambda: json_lines(server), lambda e: e["message"] == "job succeeded" and e.get("job_id") == job_id)
    key_id = KeyStore(server.data_dir / "jobs.sqlite3").get("logger").id
    assert done["request_id"] == request_id and done["key_id"] == key_id and done["logger"] == "kleinserve.jobs.worker"
    assert set(done["timings"]) >= {"denoise", "decode"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", done["time"]) and done["level"] == "info"

    lines = json_lines(server)
    access = next(e for e in lines if e["logger"] == "kleinserve.access" and e.get("request_id") == request_id)
    assert access["method"] == "POST" and access["route"] == "/api/ai/queue" and access["status"] == 200
    assert access["job_id"] == job_id and access["key_id"] == key_id and access["duration_ms"] > 0
    started = next(e for e in lines if e["message"] == "job started" and e.get("job_id") == job_id)
    assert started["prompt"] == prompt  # --log-prompts
    assert all(secret not in json.dumps(e) for e in lines)  # the key's secret never, anywhere

    stored = SQLiteJobStore(server.data_dir / "jobs.sqlite3")
    try:
        job = stored.get(job_id)
        assert job is not None and job.request_id == request_id
    finally:
        stored.close()


def test_json_access_lines_use_route_templates_and_redact_signed_urls(ops_server: OpsServer) -> None:
    server, secret = ops_server.server, ops_server.secret
    headers = {"Authorization": f"Bearer {secret}"}
    result = httpx.post(f"{server.url}/api/ai/images/generate", json=small("signed"), headers=headers, timeout=120)
    assert result.status_code == 200, result.text
    url = result.json()["images"][0]["url"]
    signature = httpx.URL(url).params["sig"]
    fetched = httpx.get(url)
    assert fetched.status_code == 200
    missing = httpx.get(f"{server.url}/api/ai/queue/{uuid.uuid4()}", headers=headers)
    assert missing.status_code == 404 and re.fullmatch(r"[0-9a-f]{32}", missing.headers["x-request-id"])

    def access_for(request_id: str) -> dict[str, Any]:
        return wait_for(
            lambda: json_lines(server), lambda e: e["logger"] == "kleinserve.access" and e["request_id"] == request_id
        )

    file_line = access_for(fetched.headers["x-request-id"])
    assert file_line["route"] == "/files/{key}" and "sig=REDACTED" in file_line["path"]
    assert signature not in server.log()
    missing_line = access_for(missing.headers["x-request-id"])
    assert missing_line["route"] == "/api/ai/queue/{generation_id}" and missing_line["status"] == 404


def test_text_logs_keep_prompts_out_and_ids_in(server: ServerProcess) -> None:
    prompt = f"a secret garden {uuid.uuid4().hex}"
    response = httpx.post(
        f"{server.url}/api/ai/images/generate", json=small(prompt), headers={"X-Request-ID": "bad id; {}"}, timeout=120
    )
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)  # an implausible client id is replaced
    wait_for(lambda: server.log().splitlines(), lambda line: "kleinserve.access" in line and request_id in line)
    worker_line = wait_for(
        lambda: server.log().splitlines(), lambda line: "job succeeded" in line and f"request={request_id}" in line
    )
    assert "job=" in worker_line
    assert prompt not in server.log()


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/no/such/route", "/v1/models"])
def test_every_response_carries_a_request_id(server: ServerProcess, path: str) -> None:
    response = httpx.get(server.url + path, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
