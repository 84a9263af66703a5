"""The Workbench in a real browser: Debian's Chromium, driven by Playwright, against a real server.

No browser is downloaded: Playwright launches the system Chromium by its path (``apt-get install
chromium``; ``KLEINSERVE_CHROMIUM`` names another). The server runs in demo mode, as a fresh install
without weights does, on the session's tiny checkpoints copied to where demo mode keeps its own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("KLEINSERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def workbench_server(
    request: pytest.FixtureRequest,
    tiny_distilled: Path,
    tiny_base: Path,
    tiny_kv: Path,
    tiny_lora: Path,
    classifiers: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """Every variant in demo mode; the session's checkpoints are copied, not built again. A safety checker
    that passes every image runs, so the page shows its verdict; one LoRA adapter is offered."""
    data_dir = tmp_path_factory.mktemp("workbench-server")
    shutil.copytree(tiny_distilled, data_dir / "demo" / "tiny-distilled")
    shutil.copytree(tiny_base, data_dir / "demo" / "tiny-base")
    shutil.copytree(tiny_kv, data_dir / "demo" / "tiny-kv")
    server = ServerProcess(
        data_dir,
        ["auto"],
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--safety-checker",
        str(classifiers["normal"]),
        "--lora",
        f"style={tiny_lora}",
        env={"HF_HOME": str(data_dir / "hf"), "KLEINSERVE_KEEPALIVE_INTERVAL": "1"},
    ).launch()
    try:
        request.getfixturevalue("browser")  # Chromium starts while the server does
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Chromium context with a fresh profile, allowed to use the clipboard."""
    if not CHROMIUM.is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run 'apt-get install -y chromium' or set KLEINSERVE_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport=DESKTOP,
        )
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        yield context
        context.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
