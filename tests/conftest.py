"""Session fixtures: tiny random-weight checkpoints built once, and a loopback image server."""

from __future__ import annotations

import contextlib
import http.server
import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from kleinserve.engine.engine import Engine
from kleinserve.engine.tiny import make_tiny
from kleinserve.engine.variants import find_variant
from kleinserve.engine.weights import load_pipeline

# Services the backend tests run against (real servers on 127.0.0.1). Append; do not replace.
pytest_plugins = [
    "tests.services.postgres",
    "tests.services.seaweed",
]


@pytest.fixture(scope="session", autouse=True)
def one_ssl_context_per_setting() -> Iterator[None]:
    """``httpx.get`` and friends build a client, and with it an SSL context that loads the CA bundle
    (~30 ms of CPU), on every call; the tests poll servers with them many times a second while those
    servers work. Contexts are built once per setting instead (every URL here is plain HTTP anyway).
    Left alone if a later httpx moves the function."""
    from httpx._transports import default

    build = getattr(default, "create_ssl_context", None)
    if build is None:
        yield
        return
    cache: dict[tuple[object, ...], Any] = {}

    def cached(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if not isinstance(verify, bool) or cert is not None:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        key = (verify, trust_env)
        if key not in cache:
            cache[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(default, "create_ssl_context", cached)
        yield


@pytest.fixture(scope="session")
def tiny_distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny distilled checkpoint (like klein 4B/9B)."""
    return make_tiny(tmp_path_factory.mktemp("tiny-distilled"), "distilled", seed=0)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny undistilled checkpoint (like Base 4B/9B)."""
    return make_tiny(tmp_path_factory.mktemp("tiny-base"), "base", seed=1)


@pytest.fixture(scope="session")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny safety-checker classifiers that always say nsfw (written through the CLI) or normal."""
    from kleinserve.engine.tiny_classifier import make_tiny_classifier

    nsfw = tmp_path_factory.mktemp("classifier-nsfw")
    done = subprocess.run(
        [sys.executable, "-m", "kleinserve", "make-tiny", str(nsfw), "--classifier", "nsfw"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return {"nsfw": nsfw, "normal": make_tiny_classifier(tmp_path_factory.mktemp("classifier-normal"), "normal")}


@pytest.fixture(scope="session")
def tiny_lora(tiny_distilled: Path) -> Path:
    """A random LoRA (rank 4, attention projections) for the tiny transformers."""
    from kleinserve.engine.tiny import make_tiny_lora

    return make_tiny_lora(tiny_distilled, tiny_distilled.parent / "tiny-lora" / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny autoencoder for the previews, fitting the tiny checkpoints' latents (a few kB)."""
    from kleinserve.engine.tiny import make_tiny_autoencoder

    return make_tiny_autoencoder(tmp_path_factory.mktemp("tiny-autoencoder"))


@pytest.fixture(scope="session")
def tiny_small_decoder(tiny_distilled: Path) -> Path:
    """A random small decoder (the tiny checkpoint's encoder, a narrower decoder), BFL's layout."""
    from kleinserve.engine.decoder import make_tiny_small_decoder

    return make_tiny_small_decoder(tiny_distilled, tiny_distilled.parent / "tiny-small-decoder")


@pytest.fixture(scope="session")
def distilled_engine(tiny_distilled: Path) -> Engine:
    pipeline = load_pipeline(tiny_distilled, torch.device("cpu"), torch.float32)
    return Engine(pipeline, find_variant("flux-2-klein-4b"))


@pytest.fixture(scope="session")
def base_engine(tiny_base: Path) -> Engine:
    pipeline = load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    return Engine(pipeline, find_variant("flux-2-klein-base-4b"))


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small solid-colour PNG with a gradient stripe, so crops and resizes are visible."""
    image = Image.new("RGB", (width, height), color)
    for x in range(width):
        image.putpixel((x, height // 2), (x * 255 // max(1, width - 1), 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer:
    """Files served over HTTP on 127.0.0.1: ``server.add(name, data)`` returns the URL."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.base_url}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def loopback_server(handler: type[http.server.BaseHTTPRequestHandler], release: threading.Event) -> Iterator[int]:
    """Serve ``handler`` on 127.0.0.1 with proxies unset (so httpx connects directly); yield the port.

    ``release`` is set before shutdown, so handlers blocked on it (slow responses) let go.
    """
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            mp.delenv(name, raising=False)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield int(httpd.server_address[1])
        finally:
            release.set()
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_kv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny klein 9B-KV checkpoint (saved as Flux2KleinKVPipeline)."""
    return make_tiny(tmp_path_factory.mktemp("tiny-kv"), "kv", seed=2)
