"""The Oxen.ai example code from ../shared/seeds/, run unchanged but for the base URL.

Seed 001 (klein 4B) carries every example as cURL and Python: sync, async with polling, async with
SSE, each minimal, basic and with all parameters. They run as written against a real server; the
only edits are the base URL and, since this machine has no internet, the one hosted example image
(Oxen's bloxy asset), which a loopback server provides at the same size. Seed 000 (klein 9B) is a
text extraction whose shell lines are mangled, so its request bodies are sent as-is instead.

The seeds are the project's spec folder, beside the repository (``../shared``); a clone on its own
has no such folder, and then these tests are skipped with that reason.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes

# The repository is checked out with shared/ beside it (as CI does).
SEEDS = Path(__file__).resolve().parents[3] / "shared" / "seeds"
OXEN_HOST = "https://hub.oxen.ai"
BLOXY = "https://hub.oxen.ai/api/repos/elau/assets/file/main/bloxy/bloxy_cropped_512x512.png"
TABS = ("Sync", "Async", "Async with SSE")
LEVELS = ("Minimal", "Basic parameters", "All parameters")
HAVE_SEEDS = SEEDS.is_dir()
pytestmark = pytest.mark.skipif(
    not HAVE_SEEDS, reason=f"Oxen's example seeds are not beside this checkout ({SEEDS} is absent)"
)


def seed_text(prefix: str) -> str:
    (path,) = SEEDS.glob(f"{prefix}_*.txt")
    return path.read_text()


def seed_examples() -> list[tuple[str, str, str]]:
    """(id, language, code) of every example in seed 001, in document order (none without seeds)."""
    if not HAVE_SEEDS:
        return []
    blocks = re.findall(r"```(python|bash) (?:Python|cURL) theme=\{null\}\n(.*?)```", seed_text("001"), re.S)
    assert len(blocks) == 18, f"expected 18 examples in seed 001, found {len(blocks)}"
    examples = []
    for index, (language, code) in enumerate(blocks):
        tab, level = TABS[index // 6], LEVELS[(index % 6) // 2]
        examples.append(
            (f"{tab}/{level}/{'python' if language == 'python' else 'curl'}", language, textwrap.dedent(code))
        )
    return examples


EXAMPLES = seed_examples()


def run_example(language: str, code: str, server: ServerProcess, asset_url: str) -> subprocess.CompletedProcess[str]:
    code = code.replace(BLOXY, asset_url).replace(OXEN_HOST, server.url)
    env = {**os.environ, "OXEN_API_KEY": "test-key"}
    argv = [sys.executable, "-c", code] if language == "python" else ["bash", "-c", code]
    # A hang guard, not a timing claim: all 18 examples share one worker, so the last one waits for
    # the others; on a loaded 2-core machine that took over 120 s.
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def results(server: ServerProcess, image_server: ImageServer) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every example run once, concurrently (the async ones sleep 5 s between polls, as written)."""
    asset = image_server.add("bloxy_cropped_512x512.png", png_bytes(512, 512))
    with ThreadPoolExecutor(max_workers=len(EXAMPLES)) as pool:
        futures = {name: pool.submit(run_example, lang, code, server, asset) for name, lang, code in EXAMPLES}
        return {name: future.result() for name, future in futures.items()}


def result_url(name: str, stdout: str) -> str:
    """The image URL an example printed, whatever its form (dict repr, JSON, or 'Result: URL')."""
    text = stdout.strip()
    if name.startswith("Async/") and name.endswith("python"):
        match = re.search(r"^Result: (\S+)$", text, re.M)
        assert match, text
        return match.group(1)
    if name.startswith("Async/"):  # cURL polling: status lines, then the final generation object
        body = json.loads(text[text.index("{") :])
        assert body["status"] == "succeeded"
        return str(body["result_url"])
    payload: dict[str, Any] = ast.literal_eval(text) if name.endswith("python") else json.loads(text)
    if name.startswith("Sync/"):
        return str(payload["images"][0]["url"])
    assert payload["status"] == "succeeded" and payload["generation_id"]
    return str(payload["url"])


@pytest.mark.parametrize("name", [name for name, _, _ in EXAMPLES])
def test_seed_001_example_yields_an_image(name: str, results: dict[str, subprocess.CompletedProcess[str]]) -> None:
    done = results[name]
    assert done.returncode == 0, done.stderr
    url = result_url(name, done.stdout)
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG"  # every example asks for png or leaves the default
    level = name.split("/")[1]
    # All parameters: aspect_ratio 16:9 -> 1360x768; basic: the 512x512 input's size; minimal: 16:9 default.
    expected = {"Minimal": (1360, 768), "Basic parameters": (512, 512), "All parameters": (1360, 768)}[level]
    assert image.size == expected


def seed_000_bodies() -> list[tuple[str, dict[str, Any]]]:
    """The JSON bodies of seed 000's cURL examples (sync edit and queue), decoded as sent."""
    if not HAVE_SEEDS:
        return []
    text = seed_text("000")
    found = []
    for match in re.finditer(
        r"curl (?:-s )?-X POST https://hub\.oxen\.ai(/api/ai/[a-z/]+) \\.*?-d '(\{.*?\})'", text, re.S
    ):
        found.append((match.group(1), json.loads(match.group(2))))
    assert len(found) >= 9
    return found


@pytest.mark.parametrize(("path", "body"), seed_000_bodies())
def test_seed_000_request_bodies(
    path: str, body: dict[str, Any], server: ServerProcess, image_server: ImageServer
) -> None:
    asset = image_server.add("bloxy_cropped_512x512.png", png_bytes(512, 512))
    body = json.loads(json.dumps(body).replace(BLOXY, asset))
    assert body["model"] == "black-forest-labs-flux-2-klein-9b"
    response = httpx.post(server.url + path, json=body, headers={"Authorization": "Bearer k"}, timeout=120)
    assert response.status_code == 200, response.text
    if path.endswith("/edit"):
        url = response.json()["images"][0]["url"]
    else:
        generation_id = response.json()["generations"][0]["generation_id"]
        url = wait_for_result(server, generation_id)
    image = Image.open(io.BytesIO(httpx.get(url, timeout=30).content))
    expected = (
        (1024, 1024) if body.get("aspect_ratio") == "1:1" else ((512, 512) if "input_image" in body else (1360, 768))
    )
    assert image.size == expected


def wait_for_result(server: ServerProcess, generation_id: str, timeout: float = 300) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = httpx.get(f"{server.url}/api/ai/queue/{generation_id}", timeout=10).json()
        if item["status"] == "succeeded":
            return str(item["result_url"])
        assert item["status"] in ("queued", "processing"), item
        time.sleep(0.2)
    raise TimeoutError(generation_id)
