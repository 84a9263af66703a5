#!/usr/bin/env python3
"""Measure kleinserve's serving overhead: request latency beyond the engine's own run.

Starts ``kleinserve serve`` on a tiny random-weight checkpoint (or uses ``--url`` of a running
server that shares ``--data-dir``), sends sync Oxen requests for 64x64 images one at a time
(concurrency 1), and for each subtracts the engine's timings (prompt encoding, denoising, decoding,
image encoding, as the job records them) from the client's wall-clock latency. Prints p50/p90 of
both. Target (issue 9): overhead p50 < 10 ms.

    .venv/bin/python scripts/measure_overhead.py            # 50 requests after 5 warm-ups
    .venv/bin/python scripts/measure_overhead.py -n 200 --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kleinserve.jobs.job import JobStatus
from kleinserve.jobs.store.sqlite import SQLiteJobStore

MODEL = "flux-2-klein-4b"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    tiny = data_dir / "tiny"
    if not tiny.exists():
        subprocess.run([sys.executable, "-m", "kleinserve", "make-tiny", str(tiny)], check=True, capture_output=True)
    port = _free_port()
    log = (data_dir / "server.log").open("ab")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "kleinserve", "serve", "--port", str(port), "--data-dir", str(data_dir)),
            *("--model", f"{MODEL}={tiny}", "--device", "cpu", "--dtype", "float32", "--log-level", "warning"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited; see {data_dir / 'server.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready in 180 s")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(url: str, store: SQLiteJobStore, count: int, warmup: int) -> dict[str, float]:
    body = {"model": MODEL, "prompt": "overhead probe", "image_size": {"width": 64, "height": 64}}
    totals: list[float] = []
    engines: list[float] = []
    with httpx.Client(timeout=120) as client:
        for i in range(warmup + count):
            started = time.perf_counter()
            response = client.post(f"{url}/api/ai/images/generate", json={**body, "seed": i})
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            [job] = store.list(statuses=[JobStatus.SUCCEEDED], limit=1)  # the newest: this request's
            assert job.result is not None
            if i >= warmup:
                totals.append(elapsed)
                engines.append(sum(job.result.timings.values()))
    overheads = [t - e for t, e in zip(totals, engines, strict=True)]
    return {
        "requests": count,
        "latency_p50_ms": 1000 * statistics.median(totals),
        "engine_p50_ms": 1000 * statistics.median(engines),
        "overhead_p50_ms": 1000 * statistics.median(overheads),
        "overhead_p90_ms": 1000 * _percentile(overheads, 0.9),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--url", help="a running server (then --data-dir must be its data dir)")
    parser.add_argument("--data-dir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="kleinserve-overhead-"))
    process = None
    url = args.url
    if url is None:
        process, url = _start_server(data_dir)
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    try:
        result = measure(url, store, args.requests, args.warmup)
    finally:
        store.close()
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['requests']} sync 64x64 requests at concurrency 1 ({url})")
        print(f"  latency  p50 {result['latency_p50_ms']:.1f} ms")
        print(f"  engine   p50 {result['engine_p50_ms']:.1f} ms")
        print(f"  overhead p50 {result['overhead_p50_ms']:.1f} ms, p90 {result['overhead_p90_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
