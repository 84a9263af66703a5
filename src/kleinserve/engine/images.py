"""Reading reference images safely, and encoding generated ones.

Inputs may be a URL (http/https), a ``data:`` URI, bare base64, or (only where the caller allows it,
i.e. the CLI) a file path. Every input is capped in bytes and pixels before it is decoded, gets its
EXIF orientation applied, and is flattened onto white when it has alpha. Errors name the input.

URL fetches by the server are guarded against server-side request forgery: every hop (redirects
are followed by hand) must resolve only to public addresses, unless its host name or address is in
the operator's allow-list (``KLEINSERVE_FETCH_ALLOW``), and the connection goes to the very address
that was checked. The CLI, a local user fetching what they ask for, skips the check.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import httpx
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from kleinserve.errors import InvalidImageError, KleinserveError
from kleinserve.request import OutputFormat
from kleinserve.settings import Settings

# Formats a reference may come in; animated GIF/WebP/PNG contribute their first frame.
ALLOWED_INPUT_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
ASSET_PREFIX = "asset:"  # an image uploaded to this server, kept in its storage
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

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


@dataclass(frozen=True)
class InputPolicy:
    """What reference inputs are accepted and how far a fetch may go."""

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout: float = 15.0
    allow_paths: bool = False
    field: str = "images"
    # Reads "asset:<key>" references (files uploaded to the server); None refuses them.
    read_asset: Callable[[str], bytes] | None = None
    max_redirects: int = 5
    # Refuse URLs whose host resolves to a loopback, private, link-local, ... address (the server);
    # False fetches whatever is asked (the CLI, run by a local user).
    check_hosts: bool = True
    # Exceptions to that check: host names (lowercase, no trailing dot) and networks.
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        allow_paths: bool = False,
        field: str = "images",
        read_asset: Callable[[str], bytes] | None = None,
        check_hosts: bool = True,
    ) -> InputPolicy:
        try:
            allow_hosts, allow_networks = parse_fetch_allow(settings.fetch_allow)
        except ValueError as err:
            raise KleinserveError(f"{ALLOW_ENV}: {err}", code="invalid_setting") from None
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            timeout=settings.fetch_timeout,
            allow_paths=allow_paths,
            field=field,
            read_asset=read_asset,
            max_redirects=settings.fetch_max_redirects,
            check_hosts=check_hosts,
            allow_hosts=allow_hosts,
            allow_networks=allow_networks,
        )

    def allows_address(self, address: IPAddress) -> bool:
        """Whether the allow-list holds ``address`` (or the IPv4 address it wraps)."""
        inner = embedded_ipv4(address)
        return any(address in net or (inner is not None and inner in net) for net in self.allow_networks)


def load_references(sources: Sequence[str], policy: InputPolicy) -> list[Image.Image]:
    """Load every reference in order; the first bad one raises :class:`InvalidImageError`."""
    return [load_reference(source, index, policy) for index, source in enumerate(sources)]


def load_reference(source: str, index: int, policy: InputPolicy) -> Image.Image:
    """Read one reference from wherever ``source`` points and decode it to an RGB image."""
    return decode_image(read_source(source, index, policy), index, policy)


def read_source(source: str, index: int, policy: InputPolicy) -> bytes:
    """The raw bytes behind a URL, data URI, base64 string or (if allowed) file path."""
    text = source.strip()
    if text.startswith(("http://", "https://")):
        return fetch_url(text, index, policy)
    if text.startswith("data:"):
        return _decode_data_uri(text, index, policy)
    if text.startswith(ASSET_PREFIX):
        return _read_asset(text.removeprefix(ASSET_PREFIX), index, policy)
    if "://" in text[:16]:
        scheme = text.split("://", 1)[0]
        raise InvalidImageError(index, f"unsupported URL scheme {scheme!r}; use http or https", field=policy.field)
    if policy.allow_paths and len(text) < 4096:
        path = Path(text).expanduser()
        if path.is_file():
            return _read_file(path, index, policy)
        if _looks_like_path(text):
            raise InvalidImageError(index, f"no such file: {text}", field=policy.field)
    data = _decode_base64(text)
    if data is None:
        what = (
            "a file, an http(s) URL, a data URI or base64"
            if policy.allow_paths
            else ("an http(s) URL, a data URI or base64 image data")
        )
        raise InvalidImageError(index, f"is not {what}", field=policy.field)
    _check_byte_size(len(data), index, policy)
    return data


def _read_asset(key: str, index: int, policy: InputPolicy) -> bytes:
    if policy.read_asset is None:
        raise InvalidImageError(index, "asset references are not accepted here", field=policy.field)
    try:
        return policy.read_asset(key)
    except KleinserveError:
        raise InvalidImageError(index, f"no such uploaded asset: {key}", field=policy.field) from None


def _looks_like_path(text: str) -> bool:
    # Base64 never has a file suffix, and never starts with "./", "../" or "~".
    return text.startswith(("./", "../", "~")) or Path(text).suffix.lower() in _IMAGE_SUFFIXES


def _read_file(path: Path, index: int, policy: InputPolicy) -> bytes:
    size = path.stat().st_size
    _check_byte_size(size, index, policy)
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidImageError(index, f"cannot read {path}: {err.strerror}", field=policy.field) from None


def _check_byte_size(size: int, index: int, policy: InputPolicy) -> None:
    if size > policy.max_bytes:
        raise InvalidImageError(
            index, f"is {size} bytes, over the limit of {policy.max_bytes} bytes", field=policy.field
        )


def _decode_base64(text: str) -> bytes | None:
    compact = _WHITESPACE.sub("", text)
    if not compact:
        return None
    compact += "=" * (-len(compact) % 4)
    if "-" in compact or "_" in compact:  # the URL-safe alphabet
        compact = compact.translate(str.maketrans("-_", "+/"))
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_data_uri(text: str, index: int, policy: InputPolicy) -> bytes:
    match = _DATA_URI.match(text)
    if match is None or ";base64" not in match.group("params").lower():
        raise InvalidImageError(index, "data URI must be of the form data:image/...;base64,...", field=policy.field)
    # 4 base64 characters carry 3 bytes: refuse oversized payloads before decoding them.
    payload = _WHITESPACE.sub("", match.group("data")).rstrip("=")
    _check_byte_size(len(payload) * 3 // 4, index, policy)
    data = _decode_base64(match.group("data"))
    if data is None:
        raise InvalidImageError(index, "data URI does not hold valid base64", field=policy.field)
    return data


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
    visited: list[httpx.URL] = []
    while True:
        where = str(current) if not visited else f"{current} (redirected from {url})"
        result = _fetch_once(current, where, index, policy)
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


def _fetch_once(url: httpx.URL, where: str, index: int, policy: InputPolicy) -> bytes | httpx.URL:
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
        with httpx.Client(timeout=policy.timeout, follow_redirects=False, trust_env=not policy.check_hosts) as client:
            requests = [client.build_request("GET", u, headers=h, extensions=e) for u, h, e in targets]
            response = _send_first(client, requests)
            try:
                return _read_response(response, url, where, index, policy)
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
                what = f"{address} is" if _is_literal(host, address) else f"{host} resolves to {address},"
                raise InvalidImageError(
                    index,
                    f"refusing to fetch {where}: {what} {kind}; allow it with {ALLOW_ENV}",
                    field=policy.field,
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
    response: httpx.Response, url: httpx.URL, where: str, index: int, policy: InputPolicy
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
        _check_byte_size(int(declared), index, policy)
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        _check_byte_size(total, index, policy)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image(data: bytes, index: int | None, policy: InputPolicy) -> Image.Image:
    """Decode image bytes to RGB, refusing unknown formats, bombs and truncated files."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InvalidImageError(index, "image has too many pixels", field=policy.field) from None
    except Exception:
        raise InvalidImageError(
            index, "is not a readable image (PNG, JPEG, WebP, GIF, BMP or TIFF)", field=policy.field
        ) from None
    if image.format not in ALLOWED_INPUT_FORMATS:
        raise InvalidImageError(index, f"image format {image.format} is not accepted", field=policy.field)
    width, height = image.size
    # Checked on the header, before any pixel is decoded (decompression bombs).
    if width * height > policy.max_pixels:
        raise InvalidImageError(
            index, f"is {width}x{height} pixels, over the limit of {policy.max_pixels}", field=policy.field
        )
    if width < 1 or height < 1:
        raise InvalidImageError(index, "image is empty", field=policy.field)
    try:
        image.seek(0)
        image.load()
    except Exception as err:
        raise InvalidImageError(index, f"image data is corrupt or truncated ({err})", field=policy.field) from None
    try:
        # A damaged EXIF block must not cost the picture: it is then used as stored, unrotated.
        oriented = ImageOps.exif_transpose(image) or image
    except Exception:
        oriented = image
    try:
        return to_rgb(oriented)
    except Exception as err:
        raise InvalidImageError(index, f"image data cannot be converted ({err})", field=policy.field) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any Pillow mode: alpha flattened onto white, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit modes span 0-65535; plain 32-bit "I" carries no range, so judge it by its values.
        scale = 257.0 if image.mode != "I" or values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class EncodedImage:
    """An encoded output image."""

    data: bytes
    format: OutputFormat
    width: int
    height: int

    @property
    def media_type(self) -> str:
        return self.format.media_type


def encode_image(
    image: Image.Image, fmt: OutputFormat, quality: int, metadata: Mapping[str, Any] | None = None
) -> EncodedImage:
    """Encode to PNG (metadata in a ``parameters`` text chunk), JPEG or WebP at ``quality``."""
    buffer = io.BytesIO()
    text = json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False) if metadata else None
    if fmt is OutputFormat.PNG:
        info = PngImagePlugin.PngInfo()
        if text:
            info.add_itxt("parameters", text)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt is OutputFormat.JPEG:
        extra: dict[str, Any] = {"comment": text.encode()} if text else {}
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, **extra)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return EncodedImage(buffer.getvalue(), fmt, image.width, image.height)
