"""The Workbench page, used as a person would: generate, edit, compare, copy and run the API calls.

One browser page serves the whole module (a session in the Workbench is one page's life); each test
starts from the settings it needs. Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect

import kleinserve.api.workbench
from kleinserve.api.workbench import MODULES
from kleinserve.keys import KeyStore
from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes
from tests.workbench.conftest import PHONE

# Every status text a result card shows, in order, whatever the timing: progress can be quick.
RECORD_STATUSES = """
window.statusLog = [];
new MutationObserver(() => {
  for (const node of document.querySelectorAll('#gallery .status')) {
    const text = node.textContent;
    if (text && window.statusLog[window.statusLog.length - 1] !== text) window.statusLog.push(text);
  }
  for (const node of document.querySelectorAll('#gallery .preview')) {
    if (!window.previewLog.includes(node.src)) window.previewLog.push(node.src);
  }
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
window.previewLog = [];
"""


@pytest.fixture(scope="module")
def page(workbench_server: ServerProcess, browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    page.add_init_script(RECORD_STATUSES)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Console errors too (a module that fails to load or import says so only there), but for the
    # HTTP errors the tests provoke on purpose (a 401 without a key, a refused reference).
    page.on(
        "console",
        lambda message: (
            message.type == "error"
            and not message.text.startswith("Failed to load resource")
            and errors.append(message.text)
        ),
    )
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url))
    page.goto(workbench_server.url + "/")
    expect(page.locator("#model option")).to_have_count(5)  # demo mode: klein 4B, 9B, Base 4B, Base 9B, 9B-KV
    yield page
    assert not errors, errors  # no uncaught script error in the whole session
    # Works offline: everything the page loaded came from this machine (no CDN, no fonts).
    assert {urlsplit(url).hostname for url in fetched if not url.startswith(("data:", "blob:"))} == {"127.0.0.1"}
    page.close()


def settings(
    page: Any,
    *,
    model: str = "flux-2-klein-4b",
    size: tuple[int, int] = (64, 64),
    seed: int | None = None,
    count: int = 1,
    prompt: str = "a red fox in snow",
) -> None:
    """Set the controls from scratch, as a keyboard user would."""
    page.get_by_label("Model").select_option(model)
    page.get_by_role("textbox", name="Prompt").fill(prompt)
    page.get_by_label("By width × height").check()
    page.get_by_label("Width", exact=True).fill(str(size[0]))
    page.get_by_label("Height", exact=True).fill(str(size[1]))
    page.get_by_label("Lock seed").set_checked(seed is not None)
    if seed is not None:
        page.get_by_label("Seed", exact=True).fill(str(seed))
    page.get_by_label("Images").fill(str(count))
    while page.get_by_role("button", name=re.compile("^Remove reference")).count():
        page.get_by_role("button", name=re.compile("^Remove reference")).first.click()


def generate(page: Any, count: int = 1) -> list[Any]:
    """Press Enter in the prompt; wait for ``count`` new results; return their cards, oldest first."""
    cards = page.locator("#gallery > li")
    before = cards.count()
    page.get_by_role("textbox", name="Prompt").press("Enter")
    expect(cards).to_have_count(before + count, timeout=30_000)
    new = [cards.nth(i) for i in reversed(range(count))]
    for card in new:
        expect(card.locator("a > img")).to_be_visible(timeout=60_000)
    return new


def pixels_of(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def card_image(card: Any) -> bytes:
    return httpx.get(card.locator("a > img").get_attribute("src"), timeout=30).content


def test_page_is_served_with_its_config_and_demo_banner(page: Any, workbench_server: ServerProcess) -> None:
    assert httpx.get(workbench_server.url + "/workbench/nothing-here.js").status_code == 404
    # Native ES modules, each served as JavaScript (a module with another type does not run), and
    # every module file in the package is in the served table.
    package = Path(kleinserve.api.workbench.__file__).parent
    assert {path.name for path in package.glob("*.js")} == set(MODULES)
    html = httpx.get(workbench_server.url + "/").text
    assert '<script type="module" src="/workbench/main.js">' in html
    for name in MODULES:
        response = httpx.get(f"{workbench_server.url}/workbench/{name}")
        assert response.headers["content-type"] == "text/javascript; charset=utf-8", name
    loaded = page.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
    assert {f"{workbench_server.url}/workbench/{name}" for name in MODULES} <= set(loaded)
    config = httpx.get(workbench_server.url + "/workbench/config").json()
    assert config["demo"] is True and config["limits"]["max_references"] == 4
    assert config["sizes"]["16:9"]["1"] == [1360, 768]
    expect(page.get_by_text("Demo mode:")).to_be_visible()
    # Distilled variants show their fixed steps and guidance; Base variants let them be set.
    expect(page.get_by_label("Steps")).to_be_disabled()
    page.get_by_label("Model").select_option("flux-2-klein-base-4b")
    expect(page.get_by_label("Steps")).to_be_enabled()
    expect(page.get_by_label("Steps")).to_have_value("50")
    # Aspect ratio and megapixels: Oxen's own aspect_ratio at 1 MP, the size the table gives otherwise.
    page.get_by_role("tab", name="API").click()
    page.get_by_label("By aspect ratio").check()
    page.get_by_label("Aspect ratio", exact=True).select_option("16:9")
    expect(page.locator("#snippet")).to_contain_text('"aspect_ratio": "16:9"')
    page.get_by_label("Megapixels").select_option("0.25")
    expect(page.locator("#size-note")).to_have_text("688 × 384 pixels")
    expect(page.locator("#snippet")).to_contain_text('"width": 688')
    page.get_by_role("tab", name="Results").click()
    # Every control has a name a screen reader can say.
    unnamed = page.evaluate(
        """[...document.querySelectorAll('input, select, textarea, button')].filter((e) =>
             !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()
           ).map((e) => e.outerHTML)"""
    )
    assert unnamed == []


def test_generate_shows_progress_then_the_image(page: Any) -> None:
    settings(page)
    (card,) = generate(page)
    log = page.evaluate("window.statusLog")
    assert any(re.fullmatch(r"Step [1-4] of 4", status) for status in log), log
    assert re.fullmatch(r"waited \d+\.\d s, ran \d+\.\d s", log[-1]), log
    expect(card.locator(".params")).to_contain_text("64×64")
    expect(card.locator(".params")).to_contain_text(re.compile(r"Safety\s*passed, nsfw score 0\.000"))
    assert Image.open(io.BytesIO(card_image(card))).size == (64, 64)


def test_queue_position_and_cancel(page: Any, workbench_server: ServerProcess) -> None:
    # Another client's long job holds the worker, so the Workbench's job waits in line.
    slow = {"model": "flux-2-klein-base-4b", "prompt": "slow", "image_size": {"width": 256, "height": 256}}
    queued = httpx.post(workbench_server.url + "/api/ai/queue", json={**slow, "num_inference_steps": 50}).json()
    blocker = queued["generations"][0]["generation_id"]
    try:
        settings(page)
        cards = page.locator("#gallery > li")
        before = cards.count()
        page.get_by_role("button", name="Generate").click()
        expect(cards).to_have_count(before + 1)
        card = cards.first
        expect(card.locator(".status")).to_have_text(re.compile(r"Queued, (next in line|1 ahead)"))
        card.get_by_role("button", name="Cancel").click()
        expect(card.locator(".status")).to_have_text("Cancelled")
        card.get_by_role("button", name="Dismiss").click()
        expect(cards).to_have_count(before)
    finally:
        httpx.delete(f"{workbench_server.url}/api/ai/queue/{blocker}")


def add_reference_file(
    page: Any, tmp_path: Path, name: str, size: tuple[int, int], color: tuple[int, int, int]
) -> None:
    path = tmp_path / name
    path.write_bytes(png_bytes(*size, color))
    page.locator("#ref-file").set_input_files(str(path))


DROP_FILE = """([name, b64]) => {
  const data = new DataTransfer();
  data.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, { type: 'image/png' }));
  document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true }));
}"""


def test_references_by_file_drop_and_url_reorder_remove_and_edit(
    page: Any, tmp_path: Path, image_server: ImageServer
) -> None:
    settings(page, seed=11)
    add_reference_file(page, tmp_path, "red.png", (96, 64), (200, 30, 30))
    page.evaluate(DROP_FILE, ["blue.png", base64.b64encode(png_bytes(64, 96, (30, 30, 200))).decode()])
    thumbs = page.locator("#ref-list img")
    expect(thumbs).to_have_count(2)
    expect(page.locator("#ref-count")).to_have_text("(2 of 4)")
    page.get_by_role("button", name="Move reference 2 earlier").click()
    expect(thumbs.first).to_have_attribute("alt", "Reference 1: blue.png")
    expect(page.get_by_role("button", name="Move reference 1 later")).to_be_focused()  # focus follows
    page.get_by_role("button", name="Remove reference 1").click()
    expect(thumbs).to_have_count(1)
    expect(thumbs.first).to_have_attribute("alt", "Reference 1: red.png")
    expect(page.locator("#ref-list")).to_contain_text("@Image1 96×64")
    # A URL is sent as it is, for the server to fetch; this one is on a loopback address, which the
    # server refuses to fetch from, and the page says so in words.
    page.get_by_label("Image URL").fill(image_server.add("green.png", png_bytes(80, 48, (30, 200, 30))))
    page.get_by_label("Image URL").press("Enter")
    expect(page.locator("#ref-list")).to_contain_text("@Image2 80×48")
    cards = page.locator("#gallery > li")
    before = cards.count()
    page.get_by_role("button", name="Generate").click()
    # References are checked at submission: the page shows the refusal and adds no card.
    expect(page.locator("#error-text")).to_have_text(re.compile(r"^Reference 2: .*127\.0\.0\.1"))
    expect(cards).to_have_count(before)
    page.get_by_role("button", name="Remove reference 2").click()
    (card,) = generate(page)
    expect(card.locator(".params")).to_contain_text(re.compile(r"References\s*1"))
    # "Edit this image" makes the result the next reference.
    card.get_by_role("button", name="Edit this image").click()
    expect(thumbs).to_have_count(2)
    expect(page.locator("#ref-list")).to_contain_text("@Image2 64×64")


def test_compare_two_results_highlights_what_differs(page: Any) -> None:
    settings(page, seed=100, count=2)
    first, second = generate(page, count=2)
    first.get_by_label("Compare").check()
    second.get_by_label("Compare").check()
    with page.expect_download() as download:
        first.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == "kleinserve-100.png"
    page.get_by_role("button", name="Compare selected").click()
    table = page.get_by_role("region", name="Comparison")
    expect(table.locator("thead img")).to_have_count(2)
    expect(table.locator("tr.differs")).to_have_count(1)
    expect(table.locator("tr.differs th")).to_have_text("≠ Seed")
    expect(table.locator("tr.differs td")).to_have_text(["100", "101"])
    # "Reuse this seed" locks the seed control to a result's seed.
    second.get_by_role("button", name="Reuse seed").click()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("101")
    page.get_by_role("button", name="Close comparison").click()


def copy_snippet(page: Any, dialect: str) -> str:
    page.get_by_label("Request as").select_option(label=dialect)
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    code: str = page.evaluate("navigator.clipboard.readText()")
    return code


def run_curl(code: str, cwd: Path, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KLEINSERVE_API_KEY"}
    if key is not None:
        env["KLEINSERVE_API_KEY"] = key
    done = subprocess.run(["bash", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def run_python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KLEINSERVE_API_KEY"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


DIALECT_LABELS = ["Oxen.ai", "OpenAI", "1min.ai", "BFL API", "Replicate", "fal queue", "Verda"]


def test_api_tab_offers_every_dialect_in_curl_and_python(page: Any) -> None:
    settings(page, model="flux-2-klein-4b", seed=5)
    page.get_by_role("tab", name="API").click()
    options = page.get_by_label("Request as").locator("option")
    expect(options).to_have_count(2 * len(DIALECT_LABELS))
    labels = options.all_inner_texts()
    assert labels == [f"{name} {language}" for name in DIALECT_LABELS for language in ("cURL", "Python")]
    # The three newer dialects, as the server writes them: BFL's x-key, fal's Key scheme, Replicate's input.
    code = copy_snippet(page, "BFL API cURL")
    assert "/v1/flux-2-klein-4b" in code and '"x-key: $KLEINSERVE_API_KEY"' in code and '"seed": 5' in code
    code = copy_snippet(page, "fal queue Python")
    assert '"/fal-ai/flux-2/klein/4b"' in code and 'f"Key {API_KEY}"' in code
    code = copy_snippet(page, "Replicate cURL")
    assert "'Prefer: wait'" in code and '"input": {' in code
    page.get_by_role("tab", name="Results").click()


@pytest.mark.parametrize("editing", [False, True], ids=["text-to-image", "edit"])
def test_every_api_snippet_runs_and_gives_the_same_image(page: Any, tmp_path: Path, editing: bool) -> None:
    settings(page, seed=7, prompt="a lighthouse at dusk, 'quoted' and \"double\"")
    if editing:
        add_reference_file(page, tmp_path, "ref.png", (96, 64), (20, 160, 60))
    (card,) = generate(page)
    expected = pixels_of(card_image(card))
    page.get_by_role("tab", name="API").click()

    done = run_curl(copy_snippet(page, "Oxen.ai cURL"), tmp_path)
    assert "images" in json.loads(done.stdout), done.stdout
    assert pixels_of(httpx.get(json.loads(done.stdout)["images"][0]["url"]).content) == expected

    answer = json.loads(run_python(copy_snippet(page, "Oxen.ai Python"), tmp_path))
    assert pixels_of(httpx.get(answer["images"][0]["url"]).content) == expected

    answer = json.loads(run_python(copy_snippet(page, "OpenAI Python"), tmp_path))
    assert pixels_of(httpx.get(answer["data"][0]["url"]).content) == expected

    run_curl(copy_snippet(page, "Verda cURL"), tmp_path)
    assert pixels_of((tmp_path / "verda.png").read_bytes()) == expected

    record = json.loads(run_curl(copy_snippet(page, "1min.ai cURL"), tmp_path).stdout)["aiRecord"]
    assert record["type"] == ("IMAGE_EDITOR" if editing else "IMAGE_GENERATOR")
    assert pixels_of(httpx.get(record["temporaryUrl"]).content) == expected
    page.get_by_role("tab", name="Results").click()


def test_lora_picker_sends_the_adapters_with_their_scales(page: Any) -> None:
    settings(page, seed=9)
    panel = page.get_by_role("group", name=re.compile("LoRA adapters"))
    expect(panel).to_be_visible()
    scale = page.get_by_label("Scale of style")
    expect(scale).to_be_disabled()
    page.get_by_role("checkbox", name="style").check()
    scale.fill("0.5")
    with page.expect_request(lambda r: r.url.endswith("/api/ai/queue") and r.method == "POST") as queued:
        (card,) = generate(page)
    assert queued.value.post_data_json["loras"] == [{"name": "style", "scale": 0.5}]
    expect(card.locator(".params")).to_contain_text(re.compile(r"LoRA\s*style 0\.50"))
    page.get_by_role("checkbox", name="style").uncheck()


PAINT = """async () => {
  const { maskDataUri } = await import('/workbench/mask.js');
  return maskDataUri();
}"""


def test_mask_painting_makes_an_openai_mask_of_the_first_reference(
    page: Any, tmp_path: Path, workbench_server: ServerProcess, artifacts: Path
) -> None:
    settings(page, seed=13)
    add_reference_file(page, tmp_path, "photo.png", (96, 64), (120, 120, 120))
    page.get_by_role("button", name="Paint a mask on reference 1").click()
    canvas = page.get_by_label("Mask: paint with the pointer")
    expect(canvas).to_be_visible()
    assert page.evaluate(PAINT) is None  # nothing painted yet: no mask
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    expect(page.get_by_role("button", name="Paint a mask on reference 1")).to_have_text("Mask ✓")
    page.get_by_role("region", name="Mask editor").screenshot(path=artifacts / "workbench-mask.png")
    uri = page.evaluate(PAINT)
    assert uri.startswith("data:image/png;base64,")
    mask = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert mask.mode == "RGBA" and mask.size == (96, 64)  # the reference's own size
    alpha = mask.getchannel("A")
    assert alpha.getpixel((29, 32)) == 0  # painted: transparent, the area to edit
    assert alpha.getpixel((90, 5)) == 255 and alpha.getpixel((5, 5)) == 255  # the rest is kept
    # Erasing gives the pixels back: a wide eraser over the stroke leaves no mask at all.
    page.get_by_label("Erase").check()
    page.get_by_label("Brush").fill("40")
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    assert page.evaluate(PAINT) is None
    expect(page.get_by_role("button", name="Paint a mask on reference 1")).to_have_text("Mask")
    page.get_by_label("Paint", exact=True).check()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    assert page.evaluate(PAINT) is not None
    page.get_by_role("button", name="Clear mask").click()
    assert page.evaluate(PAINT) is None
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    # The request carries it as `mask`, and no size: the result keeps the reference's.
    assert httpx.get(workbench_server.url + "/workbench/config").json()["features"]["mask"] is True
    expect(page.locator("#size-note")).to_have_text("With a mask, the result keeps the size of @Image1.")
    with page.expect_request(lambda r: r.url.endswith("/api/ai/queue") and r.method == "POST") as queued:
        (card,) = generate(page)
    sent = queued.value.post_data_json
    assert sent["mask"] == page.evaluate(PAINT) and sent["input_image"][0].startswith("data:image/png")
    assert "image_size" not in sent and "aspect_ratio" not in sent
    assert Image.open(io.BytesIO(card_image(card))).size == (96, 64)
    expect(card.locator(".params")).to_contain_text(re.compile(r"Mask\s*painted on @Image1"))
    page.get_by_role("button", name="Done").click()
    expect(canvas).to_be_hidden()


def test_live_preview_shows_previews_in_the_running_card(page: Any, workbench_server: ServerProcess) -> None:
    if not httpx.get(workbench_server.url + "/workbench/config").json()["features"]["previews"]:
        pytest.skip("this server's request model has no previews field yet")
    settings(page, model="flux-2-klein-base-4b", size=(128, 128), seed=21)
    page.get_by_label("Steps").fill("12")
    page.evaluate("window.previewLog = []")
    page.get_by_label("Live preview").check()
    try:
        with page.expect_request(lambda r: r.url.endswith("/api/ai/queue") and r.method == "POST") as queued:
            (card,) = generate(page)
        assert queued.value.post_data_json["previews"] == 12  # one per step
        assert len(page.evaluate("window.previewLog")) >= 1  # the card showed the latest preview while running
        expect(card.locator(".preview")).to_have_count(0)  # gone once the image is there
    finally:
        page.get_by_label("Live preview").uncheck()


def test_phone_and_desktop_screenshots(page: Any, artifacts: Path) -> None:
    page.screenshot(path=artifacts / "workbench-desktop.png", full_page=True)
    page.get_by_role("tab", name="API").click()
    page.screenshot(path=artifacts / "workbench-desktop-api.png")
    page.get_by_role("tab", name="Results").click()
    page.set_viewport_size(PHONE)
    try:
        # Nothing wider than the phone: no sideways scrolling of the page itself.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        expect(page.get_by_role("button", name="Generate")).to_be_visible()
        page.screenshot(path=artifacts / "workbench-phone.png", full_page=True)
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_api_key_asked_for_kept_in_the_browser_and_hidden_in_snippets(
    page: Any, workbench_server: ServerProcess, tmp_path: Path
) -> None:
    keys = KeyStore(workbench_server.data_dir / "jobs.sqlite3")
    _, secret = keys.create("workbench-test")
    try:
        page.reload()
        expect(page.locator("#key-status")).to_have_text("This server needs an API key.")
        expect(page.get_by_label("API key")).to_be_focused()
        settings(page)
        page.get_by_role("button", name="Generate").click()
        error = page.get_by_role("alert")
        expect(error).to_contain_text("This server needs an API key")
        assert "{" not in error.inner_text()  # a sentence, not the JSON error body
        page.get_by_label("API key").fill(secret)
        page.get_by_role("button", name="Save key").click()
        assert page.evaluate("localStorage.getItem('kleinserve.apiKey')") == secret
        expect(error).to_be_hidden()
        generate(page)
        page.get_by_role("tab", name="API").click()
        code = copy_snippet(page, "Verda cURL")
        assert '"Authorization: Bearer $KLEINSERVE_API_KEY"' in code and secret not in code
        run_curl(code, tmp_path, key=secret)  # the placeholder works once the variable is set
        assert Image.open(io.BytesIO((tmp_path / "verda.png").read_bytes())).size == (64, 64)
        page.get_by_label("Show my key in the code").check()
        expect(page.locator("#snippet")).to_contain_text(f"'Authorization: Bearer {secret}'")
    finally:
        keys.revoke("workbench-test")
        page.evaluate("localStorage.clear()")
