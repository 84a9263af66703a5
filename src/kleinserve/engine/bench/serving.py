"""The bench's HTTP side: the real server in this process, on the engines being timed, and its client.

``kleinserve bench --http`` adds a third side to the cases: the same workload sent as sync requests
to the server's native (Oxen) ``POST /api/ai/images/generate`` with ``response_format: b64_json``,
each timed by its client from the request's first byte to the decoded response. What it adds over
the in-process run (HTTP, JSON and base64, admission, the job store, the worker's claim, storage of
the PNGs, the event that wakes the waiting request) is the serving overhead the issue bounds at 5%.

Decisions:
- The app is ``create_app`` as ``kleinserve serve`` builds it, served by uvicorn in a thread on a
  free loopback port. Its runtime gets the bench's loaded engines (``Runtime.preloaded``), so the
  server computes on the very modules the in-process and diffusers sides use; there is no second
  copy of the weights and nothing differs but the serving path.
- Requests of a case with ``requests > 1`` are sent at once from client threads, as real clients
  would; the server's worker batches up to 4 of them, as the in-process ``queue4`` worker does.
- References travel as PNG data URIs, encoded once per case outside the clock (a client has its
  files encoded already); the server's decoding of them is inside it.
"""

from __future__ import annotations

import base64
import io
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from PIL import Image

from kleinserve.engine.bench.cases import Case, Setup, StageAdd, prompts_for, request_body
from kleinserve.engine.engine import Engine

GENERATE_PATH = "/api/ai/images/generate"
READY_TIMEOUT_SECONDS = 600.0
MAX_BATCH = 4  # the most requests any case sends at once


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class BenchServer:
    """``kleinserve serve``'s app on ``engines`` (shared modules), on 127.0.0.1 while in the block."""

    def __init__(self, engines: Sequence[Engine], directory: Path) -> None:
        self.engines = {engine.variant.id: engine for engine in engines}
        self.directory = directory
        self.url = ""
        self._references: tuple[Sequence[Image.Image] | None, list[str]] = (None, [])
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._data_dir: tempfile.TemporaryDirectory[str] | None = None
        self._client: httpx.Client | None = None

    def __enter__(self) -> BenchServer:
        import uvicorn

        from kleinserve.api.app import create_app
        from kleinserve.api.server import protocol_for
        from kleinserve.engine.catalog import ServedModel
        from kleinserve.engine.device import dtype_name
        from kleinserve.settings import Settings

        first = next(iter(self.engines.values()))
        self._data_dir = tempfile.TemporaryDirectory(prefix="kleinserve-bench-")
        port = free_port()
        settings = Settings(
            data_dir=Path(self._data_dir.name),
            host="127.0.0.1",
            port=port,
            device=str(first.device),
            dtype=dtype_name(first.dtype),
            max_steps=100,
            # The weights are in memory already: the start-up memory plan must not count them again.
            device_memory=1e6,
            prompt_cache_bytes=first.prompt_cache.max_bytes if first.prompt_cache is not None else 0,
            # As the in-process queue4 case runs its Worker (cases.run_queued): batching up to 4 jobs
            # (the server's own default on the CPU is 1), so both sides run the same work.
            max_batch=MAX_BATCH,
        )
        served = [ServedModel(engine.variant, self.directory) for engine in self.engines.values()]
        app = create_app(settings, served)
        app.state.runtime.preloaded = self.engines
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            log_config=None,
            access_log=False,
            http=protocol_for(settings),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="bench-server", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{port}"
        self._client = httpx.Client(base_url=self.url, timeout=None)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._client is not None and self._thread is not None
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline and self._thread.is_alive():
            try:
                response = self._client.get("/readyz")
                if response.status_code == 200:
                    return
                body = response.json()
                if body.get("error"):
                    raise RuntimeError(f"the bench server did not start: {body['error']}")
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the bench server did not become ready")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            self._client.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=120)
        if self._data_dir is not None:
            self._data_dir.cleanup()

    def serves(self, case: Case) -> bool:
        """Whether this server can run ``case`` (the 9B-KV twin is built per case, never served)."""
        return not case.kv and not case.step_caches

    def _reference_uris(self, references: Sequence[Image.Image]) -> list[str]:
        # Held, so the identity check cannot meet a later case's list at a reused address.
        if self._references[0] is not references:
            self._references = (references, [data_uri(image) for image in references])
        return self._references[1]

    def run(
        self,
        setup: Setup,
        case: Case,
        run: int,
        seed: int,
        references: Sequence[Image.Image],
        clock_add: StageAdd,
        tag: str = "",
    ) -> list[Image.Image]:
        """One run of ``case`` as sync HTTP requests (at once when the case has several)."""
        assert self._client is not None
        client = self._client
        uris = self._reference_uris(references)
        bodies = []
        for prompt in prompts_for(case, run, tag):
            canonical = request_body(setup, case, prompt, seed, len(references))
            body: dict[str, Any] = {
                "model": f"black-forest-labs-{canonical['model']}",
                "prompt": prompt,
                "image_size": {"width": setup.size, "height": setup.size},
                "num_inference_steps": canonical["steps"],
                "guidance_scale": canonical["guidance"],
                "seed": seed,
                "num_generations": case.num_images,
                "response_format": "b64_json",
                "output_format": "png",
            }
            if uris:
                body["input_image"] = uris
            if "cache" in canonical:
                body["cache"] = canonical["cache"]
            bodies.append(body)

        def send(body: dict[str, Any]) -> list[Image.Image]:
            response = client.post(GENERATE_PATH, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"bench request failed: {response.status_code} {response.text[:300]}")
            images = response.json()["images"]
            return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in images]

        if len(bodies) == 1:
            return send(bodies[0])
        with ThreadPoolExecutor(len(bodies)) as pool:
            return [image for images in pool.map(send, bodies) for image in images]
