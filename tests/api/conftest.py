"""A real kleinserve server process on 127.0.0.1, serving tiny checkpoints."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``kleinserve serve`` in a subprocess, with its log in the data dir."""

    def __init__(self, data_dir: Path, models: list[str], *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.models = models
        self.extra = extra
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    def start(self, timeout: float = 120) -> ServerProcess:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it to be ready (see :func:`start_together`)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "kleinserve", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        for model in self.models:
            args += ["--model", model]
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([*args, *self.extra], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:  # one client: no new SSL context per look
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextmanager
def running_together(servers: Iterable[ServerProcess], stop: int = signal.SIGTERM) -> Iterator[None]:
    """Start ``servers`` at once, wait until each is ready, and stop (with ``stop``) every one still
    running on exit, also when a start failed: a start is mostly one core importing torch and the
    model libraries, so two starting side by side take little longer than one."""
    servers = list(servers)
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready(120)
        yield
    finally:
        for server in servers:
            if server.process is not None:
                server.stop(stop)


def main_server(
    tiny_distilled: Path, tiny_base: Path, tiny_lora: Path, tiny_autoencoder: Path, data_dir: Path
) -> ServerProcess:
    """klein 4B and 9B on tiny distilled weights, Base 4B and 9B on tiny base; one LoRA adapter,
    ``tiny``, offered; previews decoded by the tiny autoencoder."""
    return ServerProcess(
        data_dir,
        [
            f"flux-2-klein-4b={tiny_distilled}",
            f"flux-2-klein-9b={tiny_distilled}",
            f"flux-2-klein-base-4b={tiny_base}",
            f"flux-2-klein-base-9b={tiny_base}",
        ],
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--preview-decoder",
        str(tiny_autoencoder),
        # The tests' reference images come from the loopback image server, refused unless allowed.
        env={
            "KLEINSERVE_KEEPALIVE_INTERVAL": "1",
            "KLEINSERVE_FETCH_ALLOW": "127.0.0.1",
            "KLEINSERVE_METRICS": "open",
            "KLEINSERVE_LORAS": f"tiny={tiny_lora}",
        },
    )


ADMIN_TOKEN = "admin-token-for-tests"


@dataclass
class OpsServer:
    """The operations server: JSON logs with prompts, one API key, metrics behind the admin token
    and on a port of their own, and a safety checker that flags every image (policy flag)."""

    server: ServerProcess
    secret: str
    metrics_port: int


def operations_server(tiny_distilled: Path, nsfw_classifier: Path, data_dir: Path) -> OpsServer:
    from kleinserve.keys import KeyStore

    keys = KeyStore(data_dir / "jobs.sqlite3")
    try:
        _, secret = keys.create("logger")
    finally:
        keys.close()
    metrics_port = free_port()
    server = ServerProcess(
        data_dir,
        [f"flux-2-klein-4b={tiny_distilled}"],
        "--dtype",
        "float32",
        "--log-format",
        "json",
        "--log-prompts",
        "--metrics",
        "admin",
        "--metrics-port",
        str(metrics_port),
        "--safety-checker",
        str(nsfw_classifier),
        "--safety-policy",
        "flag",
        env={
            "KLEINSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
            # Webhook tests: the receiver is on loopback, and retries come quickly.
            "KLEINSERVE_FETCH_ALLOW": "127.0.0.1",
            "KLEINSERVE_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2",
        },
    )
    return OpsServer(server, secret, metrics_port)


@pytest.fixture(scope="session")
def session_servers(
    request: pytest.FixtureRequest,
    tiny_distilled: Path,
    tiny_base: Path,
    tiny_lora: Path,
    tiny_autoencoder: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, OpsServer]]:
    """The session's two shared servers, started side by side when a test first needs either: the
    main one boots while the operations server's classifier is written (a CLI subprocess), then both
    are waited for. Most of a start is one core importing torch and the model libraries."""
    main = main_server(tiny_distilled, tiny_base, tiny_lora, tiny_autoencoder, tmp_path_factory.mktemp("server"))
    main.launch()
    ops: OpsServer | None = None
    try:
        classifiers: dict[str, Path] = request.getfixturevalue("classifiers")
        ops = operations_server(tiny_distilled, classifiers["nsfw"], tmp_path_factory.mktemp("ops"))
        ops.server.launch()
        main.wait_ready(120)
        ops.server.wait_ready(120)
        yield main, ops
    finally:
        for process in (main, ops.server if ops else None):
            if process is not None and process.process is not None:
                process.stop()


@pytest.fixture(scope="session")
def server(session_servers: tuple[ServerProcess, OpsServer]) -> ServerProcess:
    """One server for the session (see :func:`main_server`)."""
    return session_servers[0]


@pytest.fixture(scope="session")
def ops_server(session_servers: tuple[ServerProcess, OpsServer]) -> OpsServer:
    return session_servers[1]
