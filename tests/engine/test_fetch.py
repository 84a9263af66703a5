"""Tests for fetching reference image URLs safely (kleinserve.engine.fetch.fetch_url).

Real sockets only ever go to 127.0.0.1: a guard fails any connection elsewhere (it is raised
before a socket is opened), and names under ``.test`` resolve through a fake resolver. Refusals
of private, metadata and IPv6 addresses are tested with literal URLs: the check runs before any
connection is attempted, and the guard proves it.
"""

from __future__ import annotations

import io
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pydantic
import pytest
from PIL import Image

from kleinserve.engine import fetch
from kleinserve.engine.fetch import embedded_ipv4, fetch_url, non_public_kind, parse_fetch_allow
from kleinserve.engine.images import InputPolicy, load_reference
from kleinserve.errors import InvalidImageError
from kleinserve.settings import Settings
from tests.conftest import loopback_server

SLOW_DELAY = 5.0  # far longer than the short fetch timeouts; released at teardown
BIG = b"\x00" * 5000


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 120, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


# --------------------------------------------------------------------------------------------------
# Where connections go, and what names resolve to


@dataclass
class Network:
    """The fake resolver's answers, what it was asked, and every connection attempted."""

    names: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)
    # Answers given after the first lookup of a name (a DNS-rebinding attacker's second answer).
    rebind: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture(autouse=True)
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    """Names ending in ``.test`` resolve as told; only 127.0.0.1 may be connected to."""
    net = Network()
    real_getaddrinfo = socket.getaddrinfo
    real_create_connection = socket.create_connection

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if not name.endswith(".test"):
            return real_getaddrinfo(host, port, *args, **kwargs)
        net.lookups.append(name)
        answers = net.rebind[name] if name in net.rebind and net.lookups.count(name) > 1 else net.names.get(name)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (ip, int(port or 0)),
            )
            for ip in answers
        ]

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        net.connects.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test guard: no connections to {address[0]}")
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return net


class _Handler(BaseHTTPRequestHandler):
    release: threading.Event
    seen: list[tuple[str, str]]  # (path, Host header) of every request

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _redirect(self, location: str | None, status: int = 302) -> None:
        self.send_response(status)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, body: bytes, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Host", "")))
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        try:
            if path.endswith("/image.png"):
                self._send(PNG, len(PNG))
            elif path == "/to":  # /to?url=...&status=...
                self._redirect(query["url"][0], int(query.get("status", ["302"])[0]))
            elif path == "/chain/0":
                self._send(PNG, len(PNG))
            elif path.startswith("/chain/"):  # /chain/N redirects N times, then serves the image
                self._redirect(f"/chain/{int(path.rsplit('/', 1)[1]) - 1}")
            elif path == "/loop":
                self._redirect("/loop")
            elif path.endswith("/rel"):
                self._redirect(query["to"][0])
            elif path == "/no-location":
                self._redirect(None)
            elif path == "/big-unsized":  # no Content-Length: the body ends when the connection closes
                self._send(BIG)
            elif path == "/big-declared":  # claims a huge body, never sends it
                self._send(b"", 10**9)
            elif path == "/exact":
                self._send(PNG, len(PNG))
            elif path == "/slow":
                self.release.wait(SLOW_DELAY)
                self._send(PNG, len(PNG))
            else:
                self.send_error(404)
        except OSError:  # the client gave up (timeouts, byte caps)
            pass


@dataclass
class Server:
    port: int
    seen: list[tuple[str, str]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def at(self, host: str) -> str:
        return f"http://{host}:{self.port}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A real HTTP server on 127.0.0.1 (proxies from the environment removed)."""
    release = threading.Event()
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (_Handler,), {"release": release, "seen": seen})
    with loopback_server(handler, release) as port:
        yield Server(port, seen)


def allowing(*entries: str, **changes: Any) -> InputPolicy:
    hosts, networks = parse_fetch_allow(entries)
    return replace(InputPolicy(allow_hosts=hosts, allow_networks=networks), **changes)


LOOPBACK = allowing("127.0.0.1")


def fetch_error(url: str, policy: InputPolicy, index: int = 0) -> str:
    with pytest.raises(InvalidImageError) as info:
        fetch_url(url, index, policy)
    assert info.value.message.startswith(f"{policy.field}[{index}]: ")
    assert info.value.index == index
    return info.value.message


# --------------------------------------------------------------------------------------------------
# Refused before any connection


@pytest.mark.parametrize(
    ("url", "shown", "kind"),
    [
        ("http://127.0.0.1/x.png", "127.0.0.1 is", "a loopback address"),
        ("http://127.8.9.10:8080/x.png", "127.8.9.10 is", "a loopback address"),
        ("http://10.0.0.1/x.png", "10.0.0.1 is", "a private address"),
        ("http://172.16.5.4/x.png", "172.16.5.4 is", "a private address"),
        ("http://192.168.1.1/x.png", "192.168.1.1 is", "a private address"),
        ("http://100.64.0.1/x.png", "100.64.0.1 is", "a non-public address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is", "the cloud metadata address"),
        ("http://169.254.1.1/x", "169.254.1.1 is", "a link-local address"),
        ("http://224.0.0.1/", "224.0.0.1 is", "a multicast address"),
        ("http://0.0.0.0/", "0.0.0.0 is", "an unspecified address"),
        ("http://240.0.0.1/", "240.0.0.1 is", "address"),
        ("http://255.255.255.255/", "255.255.255.255 is", "address"),
        ("https://[::1]/x", "::1 is", "a loopback address"),
        ("http://[::]/x", ":: is", "an unspecified address"),
        ("http://[fc00::1]/x", "fc00::1 is", "a private address"),
        ("http://[fd12:3456::1]/x", "fd12:3456::1 is", "a private address"),
        ("http://[fe80::1]/x", "fe80::1 is", "a link-local address"),
        ("http://[ff02::1]/x", "ff02::1 is", "a multicast address"),
        ("http://[fd00:ec2::254]/latest", "fd00:ec2::254 is", "the cloud metadata address"),
        ("http://[::ffff:127.0.0.1]/x", "is a loopback address (IPv4 127.0.0.1 inside IPv6)", ""),
        ("http://[::ffff:10.1.2.3]/x", "is a private address (IPv4 10.1.2.3 inside IPv6)", ""),
        ("http://[::ffff:169.254.169.254]/x", "is the cloud metadata address (IPv4 169.254.169.254", ""),
        ("http://[2002:7f00:1::]/x", "is a loopback address (IPv4 127.0.0.1 inside IPv6)", ""),  # 6to4
        ("http://[64:ff9b::a00:1]/x", "is a private address (IPv4 10.0.0.1 inside IPv6)", ""),  # NAT64
        # Teredo: the client address is stored inverted (~127.0.0.1 = 128.255.255.254).
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/x", "IPv4 127.0.0.1 inside IPv6", ""),
    ],
)
def test_non_public_literal_is_refused_before_connecting(url: str, shown: str, kind: str, network: Network) -> None:
    message = fetch_error(url, InputPolicy())
    assert message.startswith(f"images[0]: refusing to fetch {url}: ")
    assert shown in message
    assert kind in message
    assert message.endswith("allow it with KLEINSERVE_FETCH_ALLOW")
    assert network.connects == []


@pytest.mark.parametrize("host", ["localhost", "127.1", "2130706433", "0x7f.0.0.1"])
def test_name_resolving_to_loopback_is_refused(host: str, network: Network) -> None:
    message = fetch_error(f"http://{host}:9/x.png", InputPolicy())
    assert f"{host} is not a public address" in message and "127.0.0.1" not in message  # no DNS answer told
    assert network.connects == []


def test_any_bad_address_of_a_name_refuses_it(network: Network) -> None:
    # 127.0.0.1 is allowed, but the name also resolves to a private address.
    network.names["mixed.test"] = ["127.0.0.1", "10.0.0.7"]
    message = fetch_error("http://mixed.test/x.png", LOOPBACK)
    assert "mixed.test is not a public address" in message and "10.0.0.7" not in message
    assert network.connects == []


def test_unresolvable_name(network: Network) -> None:
    message = fetch_error("http://nowhere.test/x.png", InputPolicy())
    assert "cannot resolve nowhere.test" in message
    assert network.connects == []


def test_index_and_field_are_named() -> None:
    with pytest.raises(InvalidImageError) as info:
        load_reference("http://10.0.0.1/x.png", 2, InputPolicy(field="image_urls"))
    assert info.value.message.startswith("image_urls[2]: refusing to fetch http://10.0.0.1/x.png: ")


# --------------------------------------------------------------------------------------------------
# The allow-list


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "127.0.0.1/32", "::ffff:127.0.0.0/104"])
def test_allowed_network_admits_the_server(server: Server, entry: str) -> None:
    assert fetch_url(f"{server.url}/image.png", 0, allowing(entry)) == PNG


def test_other_network_does_not_admit_the_server(server: Server, network: Network) -> None:
    message = fetch_error(f"{server.url}/image.png", allowing("10.0.0.0/8", "fd00::/8", "images.test"))
    assert "127.0.0.1 is a loopback address" in message
    assert network.connects == []


def test_allowed_name_admits_the_server(server: Server, network: Network) -> None:
    network.names["images.test"] = ["127.0.0.1"]
    policy = allowing("Images.Test.")  # case and a trailing dot do not matter
    assert fetch_url(f"{server.at('images.test')}/image.png", 0, policy) == PNG
    assert server.seen[-1] == ("/image.png", f"images.test:{server.port}")


def test_allowed_name_does_not_admit_its_address(server: Server, network: Network) -> None:
    network.names["images.test"] = ["127.0.0.1"]
    message = fetch_error(f"{server.url}/image.png", allowing("images.test"))
    assert "127.0.0.1 is a loopback address" in message


def test_settings_fill_the_policy(server: Server, network: Network) -> None:
    network.names["images.test"] = ["127.0.0.1"]
    settings = Settings(fetch_allow="images.test, 10.0.0.0/8", fetch_max_redirects=2)  # type: ignore[arg-type]
    policy = InputPolicy.from_settings(settings)
    assert policy.check_hosts
    assert policy.allow_hosts == frozenset({"images.test"})
    assert policy.allow_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert policy.max_redirects == 2
    assert fetch_url(f"{server.at('images.test')}/chain/2", 0, policy) == PNG
    assert "more than 2" in fetch_error(f"{server.at('images.test')}/chain/3", policy)
    assert not InputPolicy.from_settings(settings, check_hosts=False).check_hosts


def test_parse_fetch_allow() -> None:
    hosts, networks = parse_fetch_allow([" Example.COM ", "", "10.1.2.3/8", "[::1]", "fd00::/8", "cdn_1.test"])
    assert hosts == frozenset({"example.com", "cdn_1.test"})
    assert networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "10.0.0.300", "300.1.1.1/8", "fd00::/129", "cat/dog", "::g"])
def test_bad_cidr_is_a_clear_error(entry: str) -> None:
    with pytest.raises(ValueError, match="is not a valid CIDR network or IP address"):
        parse_fetch_allow([entry])
    # Settings refuse it when they are read, so a server never starts with a broken allow-list.
    with pytest.raises(pydantic.ValidationError, match=f"(?s)fetch_allow.*'{re.escape(entry)}' is not a valid CIDR"):
        Settings(fetch_allow=[entry])


@pytest.mark.parametrize("entry", ["bad host", "*.example.com", "-lead.example", "http://x.example"])
def test_bad_host_name_is_a_clear_error(entry: str) -> None:
    with pytest.raises(ValueError, match=r"is neither a host name nor a CIDR network|is not a valid CIDR"):
        parse_fetch_allow([entry])


# --------------------------------------------------------------------------------------------------
# Redirects: every hop is checked


def test_redirect_to_a_refused_name_is_refused(server: Server, network: Network) -> None:
    # Both names resolve to the test server, but only the first one is allowed.
    network.names["images.test"] = network.names["other.test"] = ["127.0.0.1"]
    first = f"{server.at('images.test')}/to?url={server.at('other.test')}/image.png"
    message = fetch_error(first, allowing("images.test"))
    assert f"refusing to fetch {server.at('other.test')}/image.png (redirected from {first})" in message
    assert "other.test is not a public address" in message
    assert all(host != f"other.test:{server.port}" for _, host in server.seen)  # never reached


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("http://127.0.0.1:{port}/image.png", "127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is the cloud metadata address"),
        ("http://10.0.0.1/x.png", "10.0.0.1 is a private address"),
        ("http://[::ffff:127.0.0.1]:{port}/image.png", "IPv4 127.0.0.1 inside IPv6"),
        ("http://localhost:{port}/image.png", "localhost is not a public address"),
    ],
)
def test_redirect_to_a_refused_address_is_refused(server: Server, network: Network, target: str, fragment: str) -> None:
    network.names["images.test"] = ["127.0.0.1"]
    first = f"{server.at('images.test')}/to?url={target.format(port=server.port)}"
    before = len(server.seen)
    message = fetch_error(first, allowing("images.test"))
    assert "refusing to fetch" in message
    assert f"(redirected from {first})" in message
    assert fragment in message
    assert len(server.seen) == before + 1  # only the first hop reached the server
    assert set(network.connects) == {"127.0.0.1"}


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_statuses_are_followed(server: Server, status: int) -> None:
    url = f"{server.url}/to?url={server.url}/image.png&status={status}"
    assert fetch_url(url, 0, LOOPBACK) == PNG


@pytest.mark.parametrize(
    ("path", "location", "reached"),
    [
        ("/a/b/rel", "image.png", "/a/b/image.png"),
        ("/a/b/rel", "../image.png", "/a/image.png"),
        ("/a/b/rel", "/image.png", "/image.png"),
        ("/a/b/rel", "./c/image.png?q=1", "/a/b/c/image.png?q=1"),
    ],
)
def test_relative_redirects(server: Server, path: str, location: str, reached: str) -> None:
    assert fetch_url(f"{server.url}{path}?to={quote(location)}", 0, LOOPBACK) == PNG
    assert server.seen[-1][0] == reached


def test_scheme_relative_redirect_is_checked(server: Server, network: Network) -> None:
    network.names["images.test"] = ["127.0.0.1"]
    network.names["other.test"] = ["127.0.0.1"]
    first = f"{server.at('images.test')}/to?url=//other.test:{server.port}/image.png"
    assert "other.test is not a public address" in fetch_error(first, allowing("images.test"))
    assert fetch_url(first, 0, allowing("images.test", "other.test")) == PNG


def test_redirect_chain_up_to_the_limit(server: Server) -> None:
    assert fetch_url(f"{server.url}/chain/5", 0, replace(LOOPBACK, max_redirects=5)) == PNG


def test_too_many_redirects(server: Server) -> None:
    message = fetch_error(f"{server.url}/chain/6", replace(LOOPBACK, max_redirects=5))
    assert f"fetching {server.url}/chain/6 followed too many redirects (more than 5)" in message


def test_no_redirects_allowed(server: Server) -> None:
    assert "more than 0" in fetch_error(f"{server.url}/chain/1", replace(LOOPBACK, max_redirects=0))
    assert fetch_url(f"{server.url}/chain/0", 0, replace(LOOPBACK, max_redirects=0)) == PNG


def test_redirect_loop(server: Server) -> None:
    before = len(server.seen)
    message = fetch_error(f"{server.url}/loop", LOOPBACK)
    assert "ran into a redirect loop" in message
    assert len(server.seen) == before + 1


def test_redirect_without_location(server: Server) -> None:
    assert "gave HTTP 302 without a Location" in fetch_error(f"{server.url}/no-location", LOOPBACK)


@pytest.mark.parametrize("target", ["ftp://example.com/x.png", "file:///etc/passwd"])
def test_redirect_to_another_scheme_is_refused(server: Server, network: Network, target: str) -> None:
    message = fetch_error(f"{server.url}/to?url={target}", LOOPBACK)
    assert "unsupported URL scheme" in message
    assert f"redirected from {server.url}" in message
    assert set(network.connects) == {"127.0.0.1"}


# --------------------------------------------------------------------------------------------------
# DNS rebinding: the connection goes to the address that was checked


def test_connection_goes_to_the_checked_address(server: Server, network: Network) -> None:
    # The first answer is allowed; any later lookup would get a private address instead.
    network.names["rebind.test"] = ["127.0.0.1"]
    network.rebind["rebind.test"] = ["10.0.0.1"]
    assert fetch_url(f"{server.at('rebind.test')}/image.png", 0, LOOPBACK) == PNG
    assert network.lookups.count("rebind.test") == 1  # resolved once, for the check
    assert network.connects == ["127.0.0.1"]
    assert server.seen[-1] == ("/image.png", f"rebind.test:{server.port}")  # the name stays in Host


def test_public_address_passes_and_is_the_one_connected_to(network: Network) -> None:
    network.names["public.test"] = ["8.8.8.8"]
    message = fetch_error("http://public.test/x.png", InputPolicy(timeout=2))
    assert "failed: ConnectError" in message  # refused by the test guard, never really contacted
    assert network.connects == ["8.8.8.8"]


def test_every_checked_address_is_tried_in_order(server: Server, network: Network) -> None:
    network.names["two.test"] = ["::1", "127.0.0.1"]  # the guard refuses ::1, as an unreachable address would
    policy = allowing("::1", "127.0.0.1")
    assert fetch_url(f"{server.at('two.test')}/image.png", 0, policy) == PNG
    assert network.connects == ["::1", "127.0.0.1"]


def test_https_target_keeps_the_name_for_sni_and_host(network: Network) -> None:
    network.names["secure.test"] = ["8.8.4.4"]
    url = httpx.URL("https://secure.test:8443/a/b.png?x=1")
    [(target, headers, extensions)] = fetch._targets(url, str(url), 0, InputPolicy())
    assert str(target) == "https://8.8.4.4:8443/a/b.png?x=1"
    assert headers["Host"] == "secure.test:8443"
    assert extensions == {"sni_hostname": "secure.test"}


def test_proxies_from_the_environment_are_ignored_when_checking(
    server: Server, network: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:3128")
    assert fetch_url(f"{server.url}/image.png", 0, LOOPBACK) == PNG
    assert network.connects == ["127.0.0.1"]


# --------------------------------------------------------------------------------------------------
# The CLI: no host check


def test_unchecked_policy_fetches_loopback_without_an_allow_list(server: Server) -> None:
    policy = InputPolicy.from_settings(Settings(), allow_paths=True, check_hosts=False)
    assert policy.allow_hosts == frozenset() and policy.allow_networks == ()
    assert load_reference(f"{server.url}/image.png", 0, policy).size == (8, 6)
    assert fetch_url(f"{server.url}/chain/2", 0, policy) == PNG


def test_unchecked_policy_still_limits_redirects(server: Server) -> None:
    policy = InputPolicy(check_hosts=False, max_redirects=1)
    assert "more than 1" in fetch_error(f"{server.url}/chain/2", policy)
    assert "redirect loop" in fetch_error(f"{server.url}/loop", policy)


# --------------------------------------------------------------------------------------------------
# Byte cap and timeouts


def test_byte_cap_while_streaming(server: Server) -> None:
    message = fetch_error(f"{server.url}/big-unsized", replace(LOOPBACK, max_bytes=1024))
    assert "over the limit of 1024 bytes" in message


def test_declared_length_is_checked_before_reading(server: Server) -> None:
    message = fetch_error(f"{server.url}/big-declared", replace(LOOPBACK, max_bytes=1024))
    assert "is 1000000000 bytes, over the limit of 1024 bytes" in message


def test_byte_cap_allows_exact_size(server: Server) -> None:
    assert fetch_url(f"{server.url}/exact", 0, replace(LOOPBACK, max_bytes=len(PNG))) == PNG


def test_byte_cap_applies_after_a_redirect(server: Server) -> None:
    message = fetch_error(f"{server.url}/to?url=/big-unsized", replace(LOOPBACK, max_bytes=1024))
    assert "over the limit of 1024 bytes" in message


def test_timeout(server: Server) -> None:
    started = time.monotonic()
    message = fetch_error(f"{server.url}/slow", replace(LOOPBACK, timeout=0.3))
    assert f"fetching {server.url}/slow timed out after 0.3s" in message
    assert time.monotonic() - started < SLOW_DELAY - 1


# --------------------------------------------------------------------------------------------------
# Address classification


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::200e"])
def test_public_addresses(address: str) -> None:
    assert non_public_kind(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("2002:a00:1::", "10.0.0.1"),
        ("64:ff9b::7f00:1", "127.0.0.1"),
        ("::7f00:1", "127.0.0.1"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),
        ("2606:4700:4700::1111", None),
        ("::1", None),
        ("10.0.0.1", None),
    ],
)
def test_embedded_ipv4(address: str, inner: str | None) -> None:
    found = embedded_ipv4(ipaddress.ip_address(address))
    assert (str(found) if found else None) == inner


def test_allow_list_admits_mapped_addresses() -> None:
    policy = allowing("127.0.0.0/8")
    assert policy.allows_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not policy.allows_address(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert not policy.allows_address(ipaddress.ip_address("::1"))
