"""Attacks from the security probe (issue 10), each performed against a real server process.

One module server, started open on loopback, is tightened by the first test (a key is created
while it runs), so every test here runs against a server that requires keys and whose key table
the tests change; the shared session server is used where an open server is the point.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kleinserve.jobs.job import Job
from kleinserve.jobs.store.sqlite import SQLiteJobStore
from kleinserve.keys import KeyStore
from tests.api.conftest import ServerProcess

MODEL = "black-forest-labs-flux-2-klein-4b"
SMALL = {"model": MODEL, "prompt": "guarded", "image_size": {"width": 64, "height": 64}}
SLOW = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}


class Guarded:
    """The module's server and a handle on its key table and job store."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.keys = KeyStore(server.data_dir / "jobs.sqlite3")
        self.secrets: dict[str, str] = {}

    @property
    def url(self) -> str:
        return self.server.url

    def create(self, name: str, **limits: Any) -> dict[str, str]:
        _, secret = self.keys.create(name, **limits)
        self.secrets[name] = secret
        return self.auth(name)

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[name]}"}

    def job(self, job_id: str) -> Job:
        store = SQLiteJobStore(self.server.data_dir / "jobs.sqlite3")
        try:
            job = store.get(job_id)
            assert job is not None
            return job
        finally:
            store.close()

    def job_status(self, job_id: str) -> str:
        return self.job(job_id).status.value

    def uploads(self) -> list[Path]:
        return sorted(p for p in self.server.data_dir.rglob("*") if p.is_file() and "uploads" in p.parts)


@pytest.fixture(scope="module")
def guarded(tiny_distilled: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    server = ServerProcess(
        tmp_path_factory.mktemp("guarded"),
        [f"flux-2-klein-4b={tiny_distilled}"],
        "--dtype",
        "float32",
        env={
            "KLEINSERVE_REVOCATION_INTERVAL": "0.2",
            "KLEINSERVE_KEEPALIVE_INTERVAL": "0.5",
            "KLEINSERVE_REQUEST_HEAD_TIMEOUT": "1",
            "KLEINSERVE_BODY_TIMEOUT": "2",
            "KLEINSERVE_MAX_IMAGE_BYTES": "65536",
            "KLEINSERVE_MAX_REQUEST_IMAGE_BYTES": "100000",
            "KLEINSERVE_MAX_DECODE_BYTES": "1048576",
            "KLEINSERVE_FETCH_DEADLINE": "2",
            "KLEINSERVE_FETCH_ALLOW": "127.0.0.2",  # the slow host below; localhost stays refused
        },
    ).start()
    yield Guarded(server)
    server.stop()


class Stream:
    """An SSE stream read in a thread; ``ended`` is set when the server closes it."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.status = 0
        self.opened = threading.Event()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url, headers or {}), daemon=True)
        self.thread.start()
        assert self.opened.wait(30), "the stream did not open"

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", f"{url}/api/events", headers=headers, timeout=30) as response:
                self.status = response.status_code
                self.opened.set()
                for line in response.iter_lines():
                    self.lines.append(line)
        except httpx.HTTPError as err:  # the server went away (module teardown), not a clean end
            self.lines.append(f"error: {err!r}")
        finally:
            self.opened.set()
            self.ended.set()


def until(predicate: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_open_server_tightens_and_revoking_the_last_key_never_reopens_it(guarded: Guarded) -> None:
    anonymous = httpx.get(f"{guarded.url}/api/ai/queue", params={"status": "succeeded"})
    assert anonymous.status_code == 200  # started open: loopback, no keys
    stream = Stream(guarded.url)
    assert stream.status == 200

    headers = guarded.create("first")  # created while the server runs: keys are required from now on
    assert httpx.get(f"{guarded.url}/api/ai/queue").status_code == 401
    assert stream.ended.wait(30), "an anonymous event stream outlived the server's switch to keys"

    done = httpx.post(f"{guarded.url}/api/ai/images/generate", json=SMALL, headers=headers, timeout=60)
    assert done.status_code == 200
    guarded.keys.revoke("first")  # the last (only) active key
    time.sleep(1)  # several revocation checks
    for path in ("/api/ai/queue?status=succeeded", "/v1/models", "/api/ai/models"):
        response = httpx.get(guarded.url + path)
        assert response.status_code == 401, (path, response.text)
    assert httpx.get(f"{guarded.url}/api/ai/queue", headers=headers).status_code == 401


def test_revoking_a_key_cancels_its_jobs_and_ends_its_streams(guarded: Guarded) -> None:
    doomed = guarded.create("doomed")
    bystander = guarded.create("bystander")
    running = httpx.post(f"{guarded.url}/api/ai/queue", json=SLOW, headers=doomed, timeout=60)
    waiting = httpx.post(f"{guarded.url}/api/ai/queue", json=SLOW, headers=doomed, timeout=60)
    assert running.status_code == 200 and waiting.status_code == 200
    ids = [r.json()["generations"][0]["generation_id"] for r in (running, waiting)]
    stream = Stream(guarded.url, doomed)
    assert stream.status == 200
    other = Stream(guarded.url, bystander)

    guarded.keys.revoke("doomed")
    assert until(lambda: all(guarded.job_status(i) == "cancelled" for i in ids)), [guarded.job_status(i) for i in ids]
    assert stream.ended.wait(30), "a revoked key's event stream stayed open"
    assert not other.ended.is_set()  # other keys' streams are untouched
    assert httpx.get(f"{guarded.url}/api/ai/queue", headers=doomed).status_code == 401


def raw_exchange(server: ServerProcess, head: bytes, body: bytes = b"", wait: float = 30) -> bytes:
    """Send ``head`` (and ``body``) on a raw connection; what the server answers before closing."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(head + body)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received


def test_no_body_is_read_before_the_key_is_checked(guarded: Guarded) -> None:
    guarded.create("reader")  # the server requires keys from here on, whatever ran before
    invalid = httpx.post(
        f"{guarded.url}/api/ai/queue", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert invalid.status_code == 401 and invalid.json()["error"]["type"] == "unauthenticated"
    # A 100 MiB body is announced but never sent: the 401 comes from the head alone.
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    answer = raw_exchange(guarded.server, head, b"{", wait=10)
    assert answer.startswith(b"HTTP/1.1 401") and b"authentication_error" in answer


def test_slow_headers_and_slow_bodies_are_cut_off(guarded: Guarded) -> None:
    headers = guarded.create("dripper")
    started = time.monotonic()
    # Headers that never end: the connection is closed after KLEINSERVE_REQUEST_HEAD_TIMEOUT (1 s).
    with socket.create_connection(("127.0.0.1", guarded.server.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        for _ in range(20):  # one header byte every 0.5 s would otherwise keep it open for ever
            try:
                sock.sendall(b"X")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.5)
    assert closed, "a connection dripping its headers stayed open"
    # A body that stops arriving: 408 after KLEINSERVE_BODY_TIMEOUT (2 s).
    head = (
        b"POST /api/ai/queue HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + headers["Authorization"].split()[1].encode() + b"\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    answer = raw_exchange(guarded.server, head, b'{"prompt": ', wait=30)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert time.monotonic() - started < 60


def test_data_files_are_owner_only(guarded: Guarded) -> None:
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal"):
        mode = stat.S_IMODE((guarded.server.data_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    results = [p for p in guarded.server.data_dir.rglob("*.png")]
    assert results and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in results)


# -- against the open session server: what a web page could make a visitor's browser do ----------


def test_browser_cross_site_writes_are_refused(server: ServerProcess) -> None:
    url = f"{server.url}/api/ai/queue"
    body = json.dumps(SMALL).encode()
    # A form-like "simple" request from another site needs no CORS preflight: it must still fail.
    for headers in (
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
        {"Content-Type": "application/json", "Origin": "https://evil.example"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"},
        {"Content-Type": "application/json", "Origin": "null"},
    ):
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == 403 and response.json()["error"]["type"] == "forbidden", headers
    files = {"image": ("a.png", b"x", "image/png")}
    form = httpx.post(f"{server.url}/v1/images/edits", files=files, headers={"Origin": "https://evil.example"})
    assert form.status_code == 403 and form.json()["error"]["type"] == "permission_error"
    # The server's own pages (the Workbench) and non-browser clients are fine.
    own = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert httpx.post(url, json=SMALL, headers=own).status_code == 200
    assert httpx.post(url, json=SMALL).status_code == 200


def test_json_routes_need_application_json(server: ServerProcess) -> None:
    body = json.dumps(SMALL).encode()
    plain = httpx.post(f"{server.url}/api/ai/queue", content=body, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["type"] == "unsupported_media_type"
    untyped = httpx.post(f"{server.url}/v1/images/edits", content=json.dumps({"prompt": "x"}).encode())
    assert untyped.status_code == 415 and untyped.json()["error"]["type"] == "invalid_request_error"
    files = {"promptObject": (None, "{}")}
    onemin = httpx.post(f"{server.url}/api/features", files=files)
    assert onemin.status_code == 415 and onemin.json()["statusCode"] == 415
    verda = httpx.post(f"{server.url}/flux2-klein-4b/generate", content=b'{"prompt": "x"}')
    assert verda.status_code == 415 and "application/json" in verda.json()["detail"]


def test_foreign_host_names_are_refused(server: ServerProcess) -> None:
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
    rebound = httpx.get(f"{server.url}/api/ai/queue", headers={"Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 400 and "evil.example" in rebound.json()["error"]["detail"]
    assert httpx.get(f"{server.url}/api/ai/models", headers={"Host": f"localhost:{server.port}"}).status_code == 200


def test_pages_and_files_cannot_be_framed_and_files_cache_no_longer_than_their_link(server: ServerProcess) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    done = httpx.post(f"{server.url}/api/ai/images/generate", json=SMALL, timeout=60).json()
    link = done["images"][0]["url"]
    image = httpx.get(link)
    assert image.status_code == 200 and image.headers["X-Frame-Options"] == "DENY"
    assert image.headers["Referrer-Policy"] == "no-referrer"
    # The signed link's secret part never reaches the server's (access) log.
    signature = httpx.URL(link).params["sig"]
    assert until(lambda: "/files/" in server.log(), timeout=10) and signature not in server.log()
    expires = int(httpx.URL(link).params["expires"])
    max_age = int(image.headers["Cache-Control"].split("max-age=")[1])
    assert 0 <= max_age <= expires - time.time() + 1


# -- inputs: sizes, decoding cost, slow URLs and ownership (against the keyed module server) -------


def noise_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A PNG that does not compress: about width x height x 3 bytes."""
    if mode == "I;16":
        image = Image.new("I;16", (width, height), 1000)  # compresses to almost nothing
    else:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def oxen_error(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    return str(response.json()["error"]["detail"])


def test_image_byte_caps_hold_at_submission_and_job_rows_keep_references(guarded: Guarded) -> None:
    headers = guarded.create("sizes")
    before = guarded.uploads()
    too_big = noise_png(160, 160)  # ~77 KB, over KLEINSERVE_MAX_IMAGE_BYTES=65536
    assert len(too_big) > 65536
    refused = httpx.post(
        f"{guarded.url}/api/ai/queue", json={**SMALL, "input_image": data_uri(too_big)}, headers=headers
    )
    assert "over the limit of 65536 bytes" in oxen_error(refused)
    pair = [data_uri(noise_png(140, 140)), data_uri(noise_png(140, 140))]  # ~59 KB each, 118 KB in all
    in_all = httpx.post(f"{guarded.url}/api/ai/queue", json={**SMALL, "input_image": pair}, headers=headers)
    assert "over the limit of 100000 bytes in all" in oxen_error(in_all)
    assert guarded.uploads() == before  # nothing was stored for either
    assert httpx.get(f"{guarded.url}/api/ai/queue", headers=headers).json()["count"] == 0

    ok = httpx.post(
        f"{guarded.url}/api/ai/queue",
        json={**SMALL, "input_image": data_uri(noise_png(64, 64)), "num_generations": 2},
        headers=headers,
    )
    assert ok.status_code == 200, ok.text
    jobs = [guarded.job(g["generation_id"]) for g in ok.json()["generations"]]
    key_id = guarded.keys.get("sizes").id
    # The job rows hold a short reference to a stored file of this key, once for both generations.
    assert {tuple(job.request.images) for job in jobs} == {(jobs[0].request.images[0],)}
    assert jobs[0].request.images[0].startswith(f"asset:uploads/{key_id}-")
    for job in jobs:
        assert until(lambda job=job: guarded.job_status(job.id) == "succeeded")

    # OpenAI multipart uploads obey the same cap.
    files = {"image": ("big.png", too_big, "image/png")}
    upload = httpx.post(f"{guarded.url}/v1/images/edits", files=files, data={"prompt": "x"}, headers=headers)
    assert upload.status_code == 400 and "over the limit of 65536 bytes" in upload.json()["error"]["message"]


def test_absurd_size_digits_are_a_400(server: ServerProcess) -> None:
    body = {"prompt": "x", "size": "9" * 5000 + "x64"}
    response = httpx.post(f"{server.url}/v1/images/generations", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"
    digits = {"prompt": "x", "size": "9" * 20 + "x64"}
    response = httpx.post(f"{server.url}/v1/images/generations", json=digits)
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"
    with httpx.stream("GET", f"{server.url}/api/events", headers={"Last-Event-ID": "9" * 5000}) as events:
        assert events.status_code == 200  # a stream, never a 500


def test_limits_are_checked_before_uploads_are_decoded(guarded: Guarded) -> None:
    broke = guarded.create("broke", credits=0)
    before = guarded.uploads()
    picture = {"asset": ("p.png", noise_png(32, 32), "image/png")}
    asset = httpx.post(f"{guarded.url}/api/assets", files=picture, headers=broke)
    assert asset.status_code == 402 and asset.json()["statusCode"] == 402
    edit = httpx.post(
        f"{guarded.url}/v1/images/edits", files={"image": picture["asset"]}, data={"prompt": "x"}, headers=broke
    )
    assert edit.status_code == 402 and edit.json()["error"]["type"] == "insufficient_credits"
    assert guarded.uploads() == before  # refused before anything was decoded or stored

    rich = guarded.create("decoder")
    # 400 x 400 16-bit greyscale: a few hundred bytes of PNG, 2.5 MB to decode (mode-aware bound 1 MiB).
    wide = httpx.post(
        f"{guarded.url}/api/assets", files={"asset": ("w.png", noise_png(400, 400, "I;16"), "image/png")}, headers=rich
    )
    assert wide.status_code == 400 and "MiB" in wide.json()["message"]
    small = httpx.post(f"{guarded.url}/api/assets", files=picture, headers=rich)
    assert small.status_code == 200


class SlowImage(http.server.BaseHTTPRequestHandler):
    """Sends a PNG one byte every half second: each read is quick, the whole is endless."""

    def do_GET(self) -> None:
        data = noise_png(64, 64)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for byte in data:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)

    def log_message(self, *args: object) -> None:
        pass


def test_a_slow_image_url_has_a_deadline_and_never_holds_the_worker(guarded: Guarded) -> None:
    headers = guarded.create("slowpoke")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.2", 0), SlowImage)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.2:{httpd.server_address[1]}/slow.png"
        result: dict[str, httpx.Response] = {}

        def submit() -> None:
            body = {**SMALL, "input_image": url}
            result["slow"] = httpx.post(f"{guarded.url}/api/ai/queue", json=body, headers=headers, timeout=60)

        slow = threading.Thread(target=submit)
        slow.start()
        time.sleep(0.5)
        # Meanwhile the GPU worker is free: another job runs to the end.
        done = httpx.post(f"{guarded.url}/api/ai/images/generate", json=SMALL, headers=headers, timeout=60)
        assert done.status_code == 200
        slow.join(60)
        assert "took longer than 2s in all" in oxen_error(result["slow"])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_refused_urls_do_not_tell_dns_answers(guarded: Guarded) -> None:
    headers = guarded.create("prober")
    body = {**SMALL, "input_image": "http://localhost:9/x.png"}
    message = oxen_error(httpx.post(f"{guarded.url}/api/ai/queue", json=body, headers=headers))
    assert "localhost is not a public address" in message
    assert "127.0.0.1" not in message and "::1" not in message


def test_assets_are_their_owners(guarded: Guarded) -> None:
    alice, mallory = guarded.create("asset-alice"), guarded.create("asset-mallory")
    upload = httpx.post(
        f"{guarded.url}/api/assets", files={"asset": ("a.png", noise_png(64, 64), "image/png")}, headers=alice
    )
    assert upload.status_code == 200
    uploaded = upload.json()["asset"]["key"]
    made = httpx.post(f"{guarded.url}/api/ai/queue", json=SMALL, headers=alice).json()["generations"][0]
    assert until(lambda: guarded.job_status(made["generation_id"]) == "succeeded")
    result = f"{made['generation_id']}/0.png"
    missing_upload = uploaded.replace(uploaded.split("/")[1], uploaded.split("/")[1][:-4] + "0000")
    missing_result = "0" * 32 + "/0.png"

    def onemin(key: str, headers: dict[str, str]) -> str:
        prompt = {"prompt": "p", "imageUrl": key}
        body = {"type": "IMAGE_EDITOR", "model": "black-forest-labs/flux-2-klein-4b", "promptObject": prompt}
        response = httpx.post(f"{guarded.url}/api/features", json=body, headers=headers, timeout=60)
        assert response.status_code == 400, response.text
        return str(response.json()["message"]).replace(key, "<key>")

    def oxen(key: str, headers: dict[str, str]) -> str:
        body = {**SMALL, "input_image": f"asset:{key}"}
        return oxen_error(httpx.post(f"{guarded.url}/api/ai/queue", json=body, headers=headers)).replace(key, "<key>")

    def openai(key: str, headers: dict[str, str]) -> str:
        body = {"prompt": "p", "image_url": f"asset:{key}", "size": "64x64"}
        response = httpx.post(f"{guarded.url}/v1/images/edits", json=body, headers=headers, timeout=60)
        assert response.status_code == 400, response.text
        return str(response.json()["error"]["message"]).replace(key, "<key>")

    for attempt in (onemin, oxen, openai):
        # Another key's upload and result get exactly the answer a missing asset gets.
        assert attempt(uploaded, mallory) == attempt(missing_upload, mallory)
        assert attempt(result, mallory) == attempt(missing_result, mallory)
        assert "no such asset" in attempt(uploaded, mallory)
    # Their owner may use both.
    for key in (uploaded, result):
        own = httpx.post(
            f"{guarded.url}/api/ai/images/edit",
            json={**SMALL, "input_image": f"asset:{key}"},
            headers=alice,
            timeout=60,
        )
        assert own.status_code == 200, own.text
