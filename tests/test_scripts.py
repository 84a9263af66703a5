"""The README's two commands: ./scripts/serve starts a working server (demo mode with no weights)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from PIL import Image

from tests.api.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_serve_starts_generates_and_stops(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "serve"), "--port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a fresh machine installs first
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        assert ready.json()["demo"] is True
        assert ready.json()["models"] == [
            "flux-2-klein-4b",
            "flux-2-klein-9b",
            "flux-2-klein-base-4b",
            "flux-2-klein-base-9b",
            "flux-2-klein-9b-kv",
        ]
        response = httpx.post(
            f"{url}/api/ai/images/generate",
            json={"model": "black-forest-labs-flux-2-klein-4b", "prompt": "a fox", "aspect_ratio": "1:1"},
            timeout=120,
        )
        assert response.status_code == 200 and response.headers["X-Kleinserve-Demo"] == "true"
        image = Image.open(io.BytesIO(httpx.get(response.json()["images"][0]["url"], timeout=30).content))
        assert image.size == (1024, 1024)
        model = httpx.get(f"{url}/api/ai/models/black-forest-labs-flux-2-klein-base-9b").json()
        assert model["demo"] is True
        printed = (tmp_path / "serve.log").read_text()
        assert "DEMO MODE" in printed and f"http://127.0.0.1:{port}/docs" in printed
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
