"""Prometheus metrics scraped from real servers with prometheus_client's parser, before and after
real requests: the counters must move by exactly what the requests did."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import ADMIN_TOKEN, OpsServer, ServerProcess
from tests.conftest import png_bytes

MODEL = "flux-2-klein-4b"
SMALL = {"model": MODEL, "prompt": "metrics", "image_size": {"width": 64, "height": 64}}
SLOW = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str, **kwargs: Any) -> Samples:
    response = httpx.get(url, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_terminal(server: ServerProcess, generation_id: str) -> tuple[str, int]:
    """The generation's final status, and how many GETs it took."""
    polls = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        polls += 1
        status = httpx.get(f"{server.url}/api/ai/queue/{generation_id}").json()["status"]
        if status in ("succeeded", "failed", "cancelled"):
            return status, polls
        time.sleep(0.05)
    raise TimeoutError(generation_id)


def wait_until(read: Callable[[], Samples], done: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``done`` (a worker counts a job's end just after storing it), or fail."""
    deadline = time.monotonic() + 60
    while True:
        samples = read()
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def queue(server: ServerProcess, body: dict[str, Any]) -> str:
    response = httpx.post(f"{server.url}/api/ai/queue", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["generations"][0]["generation_id"])


def test_counters_move_by_what_the_requests_did(server: ServerProcess) -> None:
    def read() -> Samples:
        return scrape(f"{server.url}/metrics")

    before = read()

    # Two successes (one sync OpenAI request for 2 images, one queued Oxen job), one failure, two cancellations.
    openai = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": MODEL, "prompt": "m", "n": 2, "size": "64x64"},
        timeout=120,
    )
    assert openai.status_code == 200, openai.text
    done = queue(server, SMALL)
    truncated = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)[:-40]).decode()
    failed = queue(server, {**SMALL, "input_image": truncated})  # accepted, then fails to decode
    statuses = {"succeeded": 0, "failed": 0}
    polls = 0
    for generation_id in (done, failed):
        status, n = wait_terminal(server, generation_id)
        statuses[status] += 1
        polls += n
    assert statuses == {"succeeded": 1, "failed": 1}
    slow, waiting = queue(server, SLOW), queue(server, SMALL)
    for generation_id in (waiting, slow):  # the second waits behind the slow one; both end cancelled
        assert httpx.delete(f"{server.url}/api/ai/queue/{generation_id}").status_code == 200
    for generation_id in (waiting, slow):
        status, n = wait_terminal(server, generation_id)
        assert status == "cancelled"
        polls += n
    missing = httpx.get(f"{server.url}/api/ai/queue/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert httpx.get(f"{server.url}/no/such/{uuid.uuid4()}").status_code == 404

    def finished(samples: Samples, outcome: str, dialect: str = "oxen") -> float:
        return value(samples, "kleinserve_jobs_finished_total", model=MODEL, dialect=dialect, outcome=outcome) - value(
            before, "kleinserve_jobs_finished_total", model=MODEL, dialect=dialect, outcome=outcome
        )

    after = wait_until(read, lambda s: finished(s, "cancelled") == 2)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kleinserve_jobs_submitted_total", model=MODEL, dialect="openai") == 1
    assert delta("kleinserve_jobs_submitted_total", model=MODEL, dialect="oxen") == 4
    assert finished(after, "succeeded", "openai") == 1
    assert (finished(after, "succeeded"), finished(after, "failed"), finished(after, "cancelled")) == (1, 1, 2)
    # Stage latencies: every engine stage once per successful run; the queue wait once per run started.
    for stage in ("encode_prompt", "denoise", "decode", "encode_image", "total"):
        assert delta("kleinserve_stage_seconds_count", model=MODEL, stage=stage) == 2, stage
    started = delta("kleinserve_jobs_started_total", model=MODEL)
    assert started >= 3  # both successes and the failure; the cancelled ones may or may not have started
    assert delta("kleinserve_stage_seconds_count", model=MODEL, stage="queue_wait") == started
    assert delta("kleinserve_stage_seconds_bucket", model=MODEL, stage="denoise", le="600.0") == 2
    assert delta("kleinserve_denoise_steps_per_second_count", model=MODEL) == 2
    assert delta("kleinserve_batch_images_sum", model=MODEL) == 3  # 2 images + 1 image
    # Every job that reached the engine looked its prompt up once: both successes, and the slow
    # cancelled one if it started before its cancellation.
    lookups = delta("kleinserve_prompt_cache_hits_total", device="cpu") + delta(
        "kleinserve_prompt_cache_misses_total", device="cpu"
    )
    assert 2 <= lookups <= started - 1  # the failed job never reached the engine
    # HTTP requests by route template and status; never a raw path with an id in it.
    poll_route = "/api/ai/queue/{generation_id}"
    assert delta("kleinserve_http_requests_total", method="GET", route=poll_route, status="200") == polls
    assert delta("kleinserve_http_requests_total", method="GET", route=poll_route, status="404") == 1
    assert delta("kleinserve_http_requests_total", method="DELETE", route=poll_route, status="200") == 2
    assert delta("kleinserve_http_requests_total", method="POST", route="/api/ai/queue", status="200") == 4
    assert delta("kleinserve_http_requests_total", method="POST", route="/v1/images/generations", status="200") == 1
    assert delta("kleinserve_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert delta("kleinserve_http_request_duration_seconds_count", method="POST", route="/api/ai/queue") == 4
    labels = {v for (_, label_set) in after for _, v in label_set}
    assert not any(generation_id in v for v in labels for generation_id in (done, failed, slow, waiting))
    # Gauges read at scrape time.
    assert value(after, "kleinserve_queue_depth") == 0 and value(after, "kleinserve_jobs_running") == 0
    assert value(after, "kleinserve_queue_oldest_age_seconds") == 0
    assert value(after, "process_resident_memory_bytes") > 0


def test_admin_metrics_need_the_token_and_the_port_needs_none(ops_server: OpsServer) -> None:
    server = ops_server.server
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    key = {"Authorization": f"Bearer {ops_server.secret}"}  # an API key is not the admin token
    assert httpx.get(f"{server.url}/metrics", headers=key).status_code == 401
    before = scrape(f"{server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    response = httpx.post(f"{server.url}/api/ai/images/generate", json=SMALL, headers=key, timeout=120)
    assert response.status_code == 200, response.text
    # The metrics port serves the same registry, without auth.
    after = scrape(f"http://127.0.0.1:{ops_server.metrics_port}/metrics")
    route = "/api/ai/images/generate"
    grew = value(after, "kleinserve_http_requests_total", method="POST", route=route, status="200") - value(
        before, "kleinserve_http_requests_total", method="POST", route=route, status="200"
    )
    assert grew == 1
    assert value(after, "kleinserve_jobs_finished_total", model=MODEL, dialect="oxen", outcome="succeeded") >= 1


def test_readyz_shows_running_job_ids_only_with_the_admin_token(ops_server: OpsServer) -> None:
    """/readyz is public for orchestrators (ready, models, each device's state); which job a worker
    runs is the operator's to see: with the admin token, never to an anonymous probe or an API key."""
    server = ops_server.server
    key = {"Authorization": f"Bearer {ops_server.secret}"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    slow = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}
    response = httpx.post(f"{server.url}/api/ai/queue", json=slow, headers=key, timeout=60)
    assert response.status_code == 200, response.text
    job_id = response.json()["generations"][0]["generation_id"]
    try:
        deadline = time.monotonic() + 60
        while True:  # until the worker runs it
            operator = httpx.get(f"{server.url}/readyz", headers=admin, timeout=10).json()
            if operator["devices"][0]["job"] == job_id or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert operator["devices"][0]["job"] == job_id, operator
        for headers in ({}, key):
            public = httpx.get(f"{server.url}/readyz", headers=headers, timeout=10)
            assert public.status_code == 200 and public.json()["status"] == "ready"
            (device,) = public.json()["devices"]
            assert device["state"] == "ready" and device["worker"] and "job" not in device
            assert job_id not in public.text
    finally:
        httpx.delete(f"{server.url}/api/ai/queue/{job_id}", headers=key, timeout=30)


def test_metrics_off_is_404(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from kleinserve.api.app import create_app
    from kleinserve.settings import Settings

    client = TestClient(
        create_app(Settings(data_dir=tmp_path), served=[]), base_url="http://localhost"
    )  # no lifespan: nothing loads
    response = client.get("/metrics")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert response.headers["x-request-id"]
