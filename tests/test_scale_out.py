"""Scale-out end to end: 2 ``kleinserve api`` + 2 ``kleinserve worker`` processes, PostgreSQL and S3.

Every process is real and shares state only through PostgreSQL (jobs, events, keys, rate buckets,
heartbeats) and the S3 bucket (results), as processes on separate hosts behind a load balancer
would. Leases are short here and the reaper runs often, so a killed worker's job moves on within
seconds. One cluster serves every test of the module (starting it is most of the runtime); the
tests that change it (a killed worker, a sweeping api) come last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from kleinserve.postgres.keys import PgKeyStore
from tests.api.conftest import free_port
from tests.services.postgres import PostgresServer
from tests.services.seaweed import S3Server

MODEL = "black-forest-labs-flux-2-klein-4b"
SMALL = {"model": MODEL, "prompt": "scale out", "image_size": {"width": 64, "height": 64}}
MAX_QUEUE = 8
URL_EXPIRY = 5  # seconds
LEASE = 3  # seconds


class Proc:
    """One ``kleinserve`` subcommand in a subprocess, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kleinserve", *args], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Cluster:
    pg_url: str
    prefix: str
    env: dict[str, str]
    log_dir: Path
    checkpoint: Path
    procs: list[Proc] = field(default_factory=list)
    apis: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    def start_api(self, name: str, **env: str) -> str:
        """Start an api process; returns its URL (see :meth:`wait_serving`)."""
        port = free_port()
        args = ["api", "--port", str(port), "--data-dir", str(self.log_dir / name)]
        self.procs.append(Proc(name, args, {**self.env, **env}, self.log_dir))
        return f"http://127.0.0.1:{port}"

    def wait_serving(self, url: str) -> None:
        """Until the api at ``url`` advertises the model (a live worker's heartbeat says it serves it)."""
        self.wait_until(f"{url} to serve {MODEL}", lambda: _serves_model(url, self.headers()), 180)

    def start_worker(self, name: str) -> Proc:
        args = ["worker", "--model", f"flux-2-klein-4b={self.checkpoint}", "--device", "cpu", "--dtype", "float32",
                "--data-dir", str(self.log_dir / name)]  # fmt: skip
        proc = Proc(name, args, self.env, self.log_dir)
        self.procs.append(proc)
        return proc

    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith("worker")]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in self.procs)

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.logs()}"
            time.sleep(0.1)

    def headers(self, key: str = "bulk") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def submit(self, api: int, body: dict[str, Any], key: str = "bulk") -> httpx.Response:
        return httpx.post(f"{self.apis[api]}/api/ai/queue", json=body, headers=self.headers(key), timeout=60)

    def generation(self, api: int, generation_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.apis[api]}/api/ai/queue/{generation_id}", headers=self.headers(), timeout=30)
        assert response.status_code == 200, response.text
        item: dict[str, Any] = response.json()
        return item

    def wait_terminal(self, api: int, generation_id: str, timeout: float = 90) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def done() -> bool:
            found.update(self.generation(api, generation_id))
            return found["status"] in ("succeeded", "failed", "cancelled")

        self.wait_until(f"generation {generation_id} to finish", done, timeout)
        return found

    def active(self) -> int:
        return int(self.sql("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'processing')")[0][0])


def _serves_model(url: str, headers: dict[str, str]) -> bool:
    try:
        response = httpx.get(f"{url}/api/ai/models", headers=headers, timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and any(m["id"] == MODEL for m in response.json()["data"])


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer, seaweed: S3Server, tiny_distilled: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    pg_url = postgres_server.create_database()
    log_dir = tmp_path_factory.mktemp("scale-out")
    prefix = f"scale-out-{uuid.uuid4().hex[:8]}/"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        **seaweed.env(prefix),
        "KLEINSERVE_DATABASE_URL": pg_url,
        "KLEINSERVE_LEASE_SECONDS": str(LEASE),
        "KLEINSERVE_HEARTBEAT_SECONDS": "0.5",
        "KLEINSERVE_REAP_INTERVAL": "0.5",
        "KLEINSERVE_MAX_QUEUE": str(MAX_QUEUE),
        "KLEINSERVE_MAX_QUEUE_PER_KEY": str(MAX_QUEUE),
        "KLEINSERVE_URL_EXPIRY": str(URL_EXPIRY),
        "KLEINSERVE_KEEPALIVE_INTERVAL": "1",
    }
    cluster = Cluster(pg_url, prefix, env, log_dir, tiny_distilled)
    # Keys first, in PostgreSQL (tests/test_keys.py drives `kleinserve keys` against it): the api
    # processes then require them from their start.
    keys = PgKeyStore(pg_url)
    try:
        cluster.keys["bulk"] = keys.create("bulk")[1]
        cluster.keys["limited"] = keys.create("limited", requests_per_minute=2)[1]  # a burst of 2, then 1 every 30 s
    finally:
        keys.close()
    try:
        cluster.start_worker("worker1")
        cluster.start_worker("worker2")
        cluster.apis = [cluster.start_api("api1"), cluster.start_api("api2")]
        for url in cluster.apis:
            cluster.wait_serving(url)
        yield cluster
    finally:
        for proc in cluster.procs:
            proc.stop()
        postgres_server.drop_database(pg_url)


def test_jobs_through_both_apis_all_succeed_with_results_in_s3(cluster: Cluster, seaweed: S3Server) -> None:
    submitted = []
    for api in (0, 1, 0, 1):
        response = cluster.submit(api, {**SMALL, "num_generations": 2})
        assert response.status_code == 200, response.text
        submitted += [(api, g["generation_id"]) for g in response.json()["generations"]]
    for api, generation_id in submitted:
        item = cluster.wait_terminal(1 - api, generation_id)  # read through the other API
        assert item["status"] == "succeeded", item
        assert item["result_url"].startswith(f"{seaweed.endpoint_url}/{seaweed.bucket}/{cluster.prefix}")
        result = httpx.get(item["result_url"], timeout=30)
        assert result.status_code == 200 and result.content[:4] == b"\x89PNG"  # straight from S3
    holders = {row[0] for row in cluster.sql("SELECT worker_id FROM jobs WHERE status='succeeded'")}
    live = {row[0] for row in cluster.sql("SELECT id FROM workers")}
    assert holders and holders <= live  # done by the registered workers (which ones took what may vary)


def test_presigned_url_works_then_fails_tampered_or_expired(cluster: Cluster) -> None:
    generation_id = cluster.submit(0, SMALL).json()["generations"][0]["generation_id"]
    cluster.wait_terminal(1, generation_id)
    url = cluster.generation(1, generation_id)["result_url"]  # signed now, valid URL_EXPIRY seconds
    signed_at = time.monotonic()
    assert httpx.get(url, timeout=30).status_code == 200
    assert httpx.get(url.replace("/0.png", "/1.png"), timeout=30).status_code == 403  # another object
    signature = url.rsplit("X-Amz-Signature=", 1)[1][:64]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert httpx.get(url.replace(signature, flipped), timeout=30).status_code == 403
    time.sleep(max(0.0, signed_at + URL_EXPIRY + 1.5 - time.monotonic()))
    assert httpx.get(url, timeout=30).status_code == 403  # expired


def read_frames(url: str, headers: dict[str, str], stop: Callable[[dict[str, str]], bool]) -> list[dict[str, str]]:
    """SSE frames (with data) from ``url``'s /api/events until ``stop`` says so; then disconnect."""
    frames: list[dict[str, str]] = []
    current: dict[str, str] = {}
    with httpx.stream("GET", f"{url}/api/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "":
                if "data" in current:
                    frames.append(current)
                    if stop(current):
                        return frames
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = value
    raise AssertionError("stream ended")


def test_sse_on_one_api_follows_a_job_from_the_other_and_resumes_without_a_gap(cluster: Cluster) -> None:
    steps = 12
    body = {**SMALL, "image_size": {"width": 128, "height": 128}, "num_inference_steps": steps}
    generation_id = cluster.submit(0, body).json()["generations"][0]["generation_id"]

    def mine(frame: dict[str, str]) -> bool:
        return f'"generation_id":"{generation_id}"' in frame["data"]

    def step(frame: dict[str, str]) -> int:
        return int(json.loads(frame["data"])["step"]) if frame.get("event", "").endswith(".progress") else 0

    first = read_frames(cluster.apis[1], cluster.headers(), lambda f: mine(f) and step(f) >= 3)
    resume_at = first[-1]["id"]
    rest = read_frames(cluster.apis[1], {**cluster.headers(), "Last-Event-ID": resume_at},
                       lambda f: mine(f) and f.get("event") == "media_generation_completed")  # fmt: skip
    assert all(int(f["id"]) > int(resume_at) for f in rest)
    ours = [f for f in first + rest if mine(f)]
    names = [f["event"] for f in ours]
    assert names[:2] == ["kleinserve.generation.queued", "kleinserve.generation.started"]
    assert [step(f) for f in ours if step(f)] == list(range(1, steps + 1))  # no gap, no repeat
    assert names[-1] == "media_generation_completed" and json.loads(ours[-1]["data"])["status"] == "succeeded"
    ids = [int(f["id"]) for f in first + rest]
    assert ids == sorted(ids)


def test_rate_limit_and_queue_bound_hold_across_both_apis(cluster: Cluster) -> None:
    # "limited" may make 2 requests a minute (a burst of 2, then one every 30 s), whichever API each reaches.
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: cluster.submit(i % 2, SMALL, "limited").status_code, range(8)))
    assert sorted(statuses) == [200] * 2 + [429] * 6, statuses
    cluster.wait_until("the limited jobs to finish", lambda: cluster.active() == 0)
    # The queue bound: slow jobs, so none finishes during the burst; exactly MAX_QUEUE get in.
    slow = {**SMALL, "image_size": {"width": 1024, "height": 1024}, "num_inference_steps": 50}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: cluster.submit(i % 2, slow), range(2 * MAX_QUEUE)))
    accepted = [r.json()["generations"][0]["generation_id"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(accepted) == MAX_QUEUE, [r.text for r in refused]
    assert all(r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable" for r in refused)
    for i, generation_id in enumerate(accepted):  # cancel through either API
        response = httpx.delete(f"{cluster.apis[i % 2]}/api/ai/queue/{generation_id}", headers=cluster.headers())
        assert response.status_code == 200
    for generation_id in accepted:
        assert cluster.wait_terminal(0, generation_id)["status"] == "cancelled"


def test_a_killed_worker_s_job_finishes_on_the_other_worker(cluster: Cluster) -> None:
    body = {**SMALL, "image_size": {"width": 256, "height": 256}, "num_inference_steps": 24}
    generation_id = cluster.submit(1, body).json()["generations"][0]["generation_id"]

    def running() -> bool:
        rows = cluster.sql("SELECT (body::jsonb->>'progress_step')::int FROM jobs WHERE id=%s", generation_id)
        return bool(rows and rows[0][0] >= 2)

    cluster.wait_until("the job to run", running)
    ((holder,),) = cluster.sql("SELECT worker_id FROM jobs WHERE id=%s", generation_id)
    ((pid,),) = cluster.sql("SELECT (info->>'pid')::int FROM workers WHERE id=%s", holder)
    (victim,) = [w for w in cluster.workers() if w.process.pid == pid]
    victim.stop(signal.SIGKILL)
    item = cluster.wait_terminal(0, generation_id, timeout=120)
    assert item["status"] == "succeeded", item
    ((body_json,),) = cluster.sql("SELECT body FROM jobs WHERE id=%s", generation_id)
    job = json.loads(body_json)
    assert job["attempts"] == 2 and job["worker_id"] != holder  # the second attempt, on the other worker
    assert httpx.get(item["result_url"], timeout=30).status_code == 200


def test_retention_removes_finished_jobs_and_their_objects_from_s3(cluster: Cluster, seaweed: S3Server) -> None:
    generation_id = cluster.submit(0, SMALL).json()["generations"][0]["generation_id"]
    assert cluster.wait_terminal(0, generation_id)["status"] == "succeeded"
    s3 = seaweed.client()

    def objects() -> list[str]:
        listed = s3.list_objects_v2(Bucket=seaweed.bucket, Prefix=f"{cluster.prefix}{generation_id}/")
        return [o["Key"] for o in listed.get("Contents", [])]

    assert objects()
    # An api process that keeps finished jobs for one second and sweeps every second.
    cluster.wait_serving(
        cluster.start_api("sweeper", KLEINSERVE_RETENTION_SECONDS="1", KLEINSERVE_CLEANUP_INTERVAL="1")
    )
    cluster.wait_until("the sweep", lambda: not objects(), 60)
    response = httpx.get(f"{cluster.apis[1]}/api/ai/queue/{generation_id}", headers=cluster.headers(), timeout=30)
    assert response.status_code == 404
