"""Result links against the real server: built from the bind address (never the Host header), and
cacheable only as long as they stay valid (issue 10)."""

from __future__ import annotations

import httpx

from tests.api.conftest import ServerProcess

SMALL = {"model": "black-forest-labs-flux-2-klein-4b", "prompt": "links", "image_size": {"width": 64, "height": 64}}


def test_links_ignore_the_host_header_and_cache_only_while_valid(server: ServerProcess) -> None:
    # A foreign Host is refused outright (api/guard.py); an accepted one other than the bind address
    # still does not make the links.
    foreign = httpx.post(f"{server.url}/api/ai/images/generate", json=SMALL, headers={"Host": "evil.example.com"})
    assert foreign.status_code == 400 and "evil.example.com" in foreign.json()["error"]["detail"]
    response = httpx.post(
        f"{server.url}/api/ai/images/generate", json=SMALL, headers={"Host": f"localhost:{server.port}"}, timeout=120
    )
    assert response.status_code == 200, response.text
    url = response.json()["images"][0]["url"]
    assert url.startswith(f"{server.url}/files/"), url
    download = httpx.get(url, timeout=30)
    assert download.status_code == 200 and download.content.startswith(b"\x89PNG")
    directive, max_age = download.headers["cache-control"].split(", max-age=")
    assert directive == "private"
    assert 0 < int(max_age) <= 3600  # the server's default link validity, counted down
