"""Fetching reference images from URLs without opening a door into the server's network (SSRF).

Every address a host resolves to is checked, and the request is then sent to that checked address
itself (the name kept in ``Host`` and TLS SNI), so a second DNS answer cannot redirect it
(DNS rebinding). Redirects are followed by hand, each hop checked again. Loopback, private,
link-local (cloud metadata), multicast, reserved and other non-global addresses, IPv4 inside IPv6
included, are refused unless the allow-list admits the host or the address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import httpx

from kleinserve.errors import InvalidImageError

if TYPE_CHECKING:
    from kleinserve.engine.images import InputPolicy

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are IPv4
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_Target: TypeAlias = tuple[httpx.URL, dict[str, str], dict[str, Any]]  # URL, headers, extensions
ALLOW_ENV = "KLEINSERVE_FETCH_ALLOW"


def parse_fetch_allow(entries: Sequence[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """Split allow-list entries into host names and IP networks; ``ValueError`` names a bad entry.

    An entry with a ``/`` or one that reads as an IP address is a network (``10.0.0.0/8``,
    ``127.0.0.1``, ``fd00::/8``; host bits are ignored); anything else must be a host name.
    """
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        if "/" in entry or ":" in entry or _is_ip(entry):
            try:
                network = ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError as err:
                raise ValueError(f"{entry!r} is not a valid CIDR network or IP address ({err})") from None
            if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
                # ::ffff:a.b.c.d/104 means the IPv4 network a.b.c.d/8, however it is written.
                inner = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
                network = ipaddress.IPv4Network((inner, network.prefixlen - 96))
            networks.append(network)
            continue
        name = _normal_host(entry)
        if not _HOST_NAME.match(name):
            raise ValueError(f"{entry!r} is neither a host name nor a CIDR network")
        hosts.add(name)
    return frozenset(hosts), tuple(networks)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        # Digits and dots only ("10.0.0.300", "127.1") are an address, if a bad one; never a name.
        return bool(re.fullmatch(r"[\d.]+", text))
    return True


def _normal_host(name: str) -> str:
    return name.strip().lower().rstrip(".")


def check_byte_size(size: int, index: int, policy: InputPolicy) -> None:
    """Refuse an input of ``size`` bytes when it is over the policy's cap."""
    if size > policy.max_bytes:
        raise InvalidImageError(
            index, f"is {size} bytes, over the limit of {policy.max_bytes} bytes", field=policy.field
        )


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64, IPv4-compatible), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client, the address traffic is relayed to
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if int(address) >> 32 == 0 and int(address) > 1:  # deprecated ::a.b.c.d
        return ipaddress.IPv4Address(int(address))
    return None


def non_public_kind(address: IPAddress) -> str | None:
    """What kind of non-public address this is ("a loopback address", ...), or None when public."""
    inner = embedded_ipv4(address)
    if inner is not None and (kind := non_public_kind(inner)) is not None:
        return f"{kind} (IPv4 {inner} inside IPv6)"
    if address in _METADATA:
        return "the cloud metadata address"
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "a site-local address"),
        (not address.is_global, "a non-public address"),
    )
    return next((kind for hit, kind in checks if hit), None)


def fetch_url(url: str, index: int, policy: InputPolicy) -> bytes:
    """GET ``url`` with timeouts and a byte cap enforced while streaming.

    Redirects are followed by hand (at most ``policy.max_redirects``) so that every hop gets the
    same host check as the first one when ``policy.check_hosts`` is on.
    """
    try:
        current = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise InvalidImageError(index, f"{url} is not a valid URL ({err})", field=policy.field) from None
    # One deadline for the whole fetch: per-read timeouts alone let a host sending a byte a second
    # hold it for ever.
    deadline = time.monotonic() + policy.deadline
    visited: list[httpx.URL] = []
    while True:
        where = str(current) if not visited else f"{current} (redirected from {url})"
        result = _fetch_once(current, where, index, policy, deadline)
        if isinstance(result, bytes):
            return result
        visited.append(current)
        if result in visited:
            raise InvalidImageError(index, f"fetching {url} ran into a redirect loop at {result}", field=policy.field)
        if len(visited) > policy.max_redirects:
            raise InvalidImageError(
                index,
                f"fetching {url} followed too many redirects (more than {policy.max_redirects})",
                field=policy.field,
            )
        current = result


def _fetch_once(url: httpx.URL, where: str, index: int, policy: InputPolicy, deadline: float) -> bytes | httpx.URL:
    """One GET without following redirects: the body, or the URL a redirect points to."""
    if url.scheme not in ("http", "https"):
        raise InvalidImageError(
            index, f"cannot fetch {where}: unsupported URL scheme {url.scheme!r}; use http or https", field=policy.field
        )
    if not url.raw_host:
        raise InvalidImageError(index, f"cannot fetch {where}: the URL has no host", field=policy.field)
    targets = _targets(url, where, index, policy)
    try:
        # A client per hop: its connection pool is keyed by address, so a TLS connection verified
        # for one name must never be reused for another name on the same address. When the hosts
        # are checked, proxies from the environment are ignored: the connection must go straight
        # to the checked address (and httpcore's HTTPS proxy tunnel would drop the SNI name).
        timeout = max(0.001, min(policy.timeout, deadline - time.monotonic()))
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=not policy.check_hosts) as client:
            requests = [client.build_request("GET", u, headers=h, extensions=e) for u, h, e in targets]
            response = _send_first(client, requests)
            try:
                return _read_response(response, url, where, index, policy, deadline)
            finally:
                response.close()
    except httpx.TimeoutException:
        raise InvalidImageError(
            index, f"fetching {where} timed out after {policy.timeout:g}s", field=policy.field
        ) from None
    except httpx.HTTPError as err:
        raise InvalidImageError(index, f"fetching {where} failed: {type(err).__name__}", field=policy.field) from None


def _targets(url: httpx.URL, where: str, index: int, policy: InputPolicy) -> list[_Target]:
    """What to request: one target per vetted address of the host, tried in order."""
    headers = {"Accept": "image/*"}
    if not policy.check_hosts:
        return [(url, headers, {})]
    host = url.raw_host.decode("ascii")
    addresses = _resolve(host, url.port or (443 if url.scheme == "https" else 80), where, index, policy)
    if _normal_host(host) not in policy.allow_hosts:
        for address in addresses:
            kind = non_public_kind(address)
            if kind is not None and not policy.allows_address(address):
                # A name's DNS answer is not told: the error must not turn the server into a resolver
                # of internal names for its callers. An address the caller wrote is named.
                what = f"{address} is {kind}" if _is_literal(host, address) else f"{host} is not a public address"
                raise InvalidImageError(
                    index, f"refusing to fetch {where}: {what}; allow it with {ALLOW_ENV}", field=policy.field
                )
    # DNS rebinding: the name was resolved once, above, and every address was vetted. Resolving it
    # again to connect could give another answer (a short-TTL record flipping to 127.0.0.1), so the
    # request goes to the vetted address itself: the URL's host becomes that IP, while the Host
    # header keeps the original name (virtual hosting) and, for HTTPS, the "sni_hostname" extension
    # keeps it for SNI and certificate verification (httpcore verifies against the SNI name).
    headers["Host"] = url.netloc.decode("ascii")
    extensions = {"sni_hostname": host} if url.scheme == "https" and not _is_ip(host) else {}
    return [(url.copy_with(host=str(address)), headers, extensions) for address in addresses]


def _is_literal(host: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host) == address
    except ValueError:
        return False


def _resolve(host: str, port: int, where: str, index: int, policy: InputPolicy) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself), in resolver order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) else str(err)
        raise InvalidImageError(
            index, f"cannot fetch {where}: cannot resolve {host} ({reason})", field=policy.field
        ) from None
    addresses: list[IPAddress] = []
    for info in infos:
        # A scoped IPv6 address ("fe80::1%eth0") loses its zone: only link-local ones have one.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidImageError(index, f"cannot fetch {where}: {host} has no address", field=policy.field)
    return addresses


def _send_first(client: httpx.Client, requests: list[httpx.Request]) -> httpx.Response:
    """Send to the first address that accepts a connection (as a resolver-ordered connect would)."""
    for request in requests[:-1]:
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError:
            continue
    return client.send(requests[-1], stream=True)


def _read_response(
    response: httpx.Response, url: httpx.URL, where: str, index: int, policy: InputPolicy, deadline: float
) -> bytes | httpx.URL:
    status = response.status_code
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise InvalidImageError(
                index, f"fetching {where} gave HTTP {status} without a Location", field=policy.field
            )
        try:
            return url.join(location)  # a relative Location is relative to this hop's URL
        except httpx.InvalidURL:
            raise InvalidImageError(
                index, f"fetching {where} redirected to an invalid URL {location!r}", field=policy.field
            ) from None
    if status != 200:
        raise InvalidImageError(index, f"fetching {where} gave HTTP {status}", field=policy.field)
    declared = response.headers.get("content-length")
    if declared and declared.isdigit():
        check_byte_size(int(declared), index, policy)
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        check_byte_size(total, index, policy)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise InvalidImageError(
                index, f"fetching {where} took longer than {policy.deadline:g}s in all", field=policy.field
            )
    return b"".join(chunks)


def vetted_targets(url: str, policy: InputPolicy) -> list[_Target]:
    """Where a request to ``url`` may go under the image-URL rules (http(s), a host, no private or
    local address unless allowed): one (URL with a vetted IP, headers, extensions) per address.

    For other outgoing requests, such as webhooks, so they pass the same SSRF guard. Raises
    :class:`InvalidImageError` naming ``policy.field`` (without an index).
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise InvalidImageError(None, f"{url} is not a valid URL ({err})", field=policy.field) from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise InvalidImageError(None, f"{url} must be an http(s) URL with a host", field=policy.field)
    return _targets(parsed, url, None, policy)  # type: ignore[arg-type]
