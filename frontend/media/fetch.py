"""Fetch the bytes of one media item from a URL the client sent: http(s), data: or file://.

Every URL is untrusted input, so this is the frontend's SSRF boundary:
- http(s): unless the host is listed in ``allowed_media_domains``, every address it resolves to
  must be public (no private, loopback, link-local, multicast, reserved or unspecified address,
  IPv4-mapped/6to4/Teredo/NAT64 forms included). A non-empty list admits only its hosts.
  Redirects are followed by hand so every hop passes the same check. The check runs inside the
  connector's resolver, so the socket connects to exactly the addresses that were checked: a DNS
  answer that changes between check and connect (rebinding) cannot slip a private address in.
  Residual risk: a listed domain is trusted completely, whatever it resolves to.
- data: only ``data:<image, video or audio>/<subtype>;base64,<payload>``, of the part's
  modality.
- file: only under ``allowed_local_media_path``, after following every symlink.
Bodies are capped at ``max_media_bytes`` while they stream, never after.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import socket
import stat
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from frontend import env
from frontend.config import FrontendConfig
from frontend.errors import RequestError

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Decode base64 on a worker thread past this size so the event loop keeps serving.
_THREAD_DECODE_BYTES = 1 << 20
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(OSError):
    """A host resolved to an address the SSRF policy refuses (raised inside the connector)."""


def is_public_address(ip: IPAddress) -> bool:
    """True if ``ip`` is a globally routable unicast address, checking embedded IPv4 too."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Forms whose packets end at an IPv4 address: the mapped/NAT64 ones are that address,
        # 6to4/Teredo ones must pass on both counts.
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(embedded):
            return False
        if ip.scope_id:
            return False  # zone ids only make sense for link-local
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class PublicOnlyResolver(AbstractResolver):
    """Wraps a resolver and refuses any answer with a non-public address (unless the host is
    explicitly allowed). aiohttp connects only to what resolve() returns: this pins the check."""

    def __init__(self, inner: AbstractResolver, allowed_hosts: tuple[str, ...]):
        self.inner = inner
        self.allowed_hosts = allowed_hosts

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        if _norm_host(host) in self.allowed_hosts:
            return answers
        # Refuse the whole answer if any address is private: a mixed answer is a rebinding smell.
        for a in answers:
            ip = _ip_literal(a["host"])
            if ip is None or not is_public_address(ip):
                raise BlockedAddress(f"{host} resolves to a non-public address")
        if not answers:
            raise BlockedAddress(f"{host} has no address")
        return answers

    async def close(self) -> None:
        await self.inner.close()


def _norm_host(host: str) -> str:
    return host.lower().rstrip(".").strip("[]")


class MediaFetcher:
    """Fetches media bytes for one frontend replica; one aiohttp session shared by requests,
    created on first use, so a fetcher belongs to the event loop that first used it."""

    def __init__(self, config: FrontendConfig, *, resolver: AbstractResolver | None = None):
        self.max_bytes = config.max_media_bytes
        self.allowed_hosts: tuple[str, ...] = tuple(config.allowed_media_domains)
        local = config.allowed_local_media_path
        self.local_root = os.path.realpath(local) if local is not None else None
        # Per modality: a video is larger than an image and may take longer to arrive.
        self.timeouts_s = {"image": env.image_fetch_timeout_s(),
                           "video": env.video_fetch_timeout_s(),
                           "audio": env.audio_fetch_timeout_s()}
        self._inner_resolver = resolver  # tests inject a fake DNS; None: the system resolver
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: str, param: str, modality: str = "image") -> bytes:
        """The bytes behind ``url``; RequestError(param=param) for anything refused or failed."""
        if not isinstance(url, str) or not url:
            raise RequestError("url must be a non-empty string", param)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            return await self._fetch_http(url, param, modality)
        if scheme == "data":
            return await self._fetch_data(url, param, modality)
        if scheme == "file":
            return await self._fetch_file(url, param, modality)
        raise RequestError("url must be http(s)://, data: or file:// (when allowed)", param)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- http(s) --------------------------------------------------------------------------------

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            inner = self._inner_resolver or aiohttp.ThreadedResolver()
            connector = aiohttp.TCPConnector(
                resolver=PublicOnlyResolver(inner, self.allowed_hosts), limit=64)
            # trust_env=False: an environment proxy would connect for us, around the address
            # check. auto_decompress=False: a gzip body could inflate far past the byte cap.
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False,
                headers={"Accept-Encoding": "identity", "User-Agent": "mmserve"})
        return self._session

    def _check_host(self, url: URL, param: str) -> None:
        host = _norm_host(url.raw_host or "")
        if url.scheme not in ("http", "https") or not host:
            raise RequestError("url must be an http(s) URL with a host", param)
        if self.allowed_hosts:
            if host not in self.allowed_hosts:
                raise RequestError(f"fetching media from {host!r} is not allowed "
                                   "(not in the allowed media domains)", param)
            return
        ip = _ip_literal(host)
        # Literal addresses never reach the resolver, so they are judged here.
        if ip is not None and not is_public_address(ip):
            raise RequestError(f"refusing to fetch from {host}: not a public address", param)

    async def _fetch_http(self, url: str, param: str, modality: str) -> bytes:
        try:
            target = URL(url)
        except (ValueError, TypeError):
            raise RequestError("url is not a valid URL", param) from None
        timeout = self.timeouts_s.get(modality, self.timeouts_s["image"])
        try:
            # One deadline for the whole chain of redirects, not one per hop.
            return await asyncio.wait_for(self._follow(target, param, modality), timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"timed out fetching {target.raw_host} after {timeout:g}s",
                               param) from None

    async def _follow(self, target: URL, param: str, modality: str) -> bytes:
        session = self._session_for_loop()
        for _ in range(MAX_REDIRECTS + 1):
            self._check_host(target, param)
            try:
                async with session.get(target, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise RequestError(f"http {resp.status} without a Location header "
                                               f"from {target.raw_host}", param)
                        target = resp.url.join(URL(location))
                        continue
                    if not 200 <= resp.status < 300:
                        raise RequestError(f"fetching {target.raw_host} failed: http {resp.status}",
                                           param)
                    return await self._read_capped(resp, param, modality)
            except RequestError:
                raise
            except aiohttp.ClientConnectorError as e:
                if isinstance(e.os_error, BlockedAddress):
                    raise RequestError(f"refusing to fetch from {target.raw_host}: "
                                       "it resolves to a non-public address", param) from None
                raise RequestError(f"could not connect to {target.raw_host}", param) from None
            except (aiohttp.ClientError, ValueError):
                # Malformed responses, resets, invalid redirect targets: the client's URL.
                raise RequestError(f"fetching {target.raw_host} failed", param) from None
        raise RequestError(f"too many redirects (more than {MAX_REDIRECTS})", param)

    async def _read_capped(self, resp: aiohttp.ClientResponse, param: str,
                           modality: str) -> bytes:
        too_big = RequestError(f"{modality} is larger than {self.max_bytes} bytes", param)
        if resp.content_length is not None and resp.content_length > self.max_bytes:
            raise too_big  # refuse before reading a byte
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            buf += chunk
            if len(buf) > self.max_bytes:
                raise too_big
        return bytes(buf)

    # -- data: ----------------------------------------------------------------------------------

    async def _fetch_data(self, url: str, param: str, modality: str) -> bytes:
        header, sep, payload = url[len("data:"):].partition(",")
        if not sep:
            raise RequestError("data URL has no ',' before its payload", param)
        fields = [f.strip().lower() for f in header.split(";")]
        mime = fields[0]
        if not mime.startswith(f"{modality}/") or mime == f"{modality}/":
            raise RequestError(f"data URL must have a {modality}/* media type, got {mime!r}",
                               param)
        if "base64" not in fields[1:]:
            raise RequestError(f"data URL must be base64 encoded (data:{modality}/...;base64,"
                               "...)", param)
        return await self.fetch_base64(payload, param, modality)

    async def fetch_base64(self, payload: str, param: str, modality: str) -> bytes:
        """The bytes of a base64 ``payload`` (a data URL's, or input_audio's data), capped at
        ``max_bytes``; RequestError naming ``param`` for bad base64 or too many bytes."""
        # base64 carries 3 bytes per 4 characters: refuse oversized payloads before decoding.
        if len(payload) // 4 * 3 > self.max_bytes + 3:
            raise RequestError(f"{modality} is larger than {self.max_bytes} bytes", param)
        if len(payload) > _THREAD_DECODE_BYTES:
            data = await asyncio.to_thread(_b64decode, payload, param)
        else:
            data = _b64decode(payload, param)
        if len(data) > self.max_bytes:
            raise RequestError(f"{modality} is larger than {self.max_bytes} bytes", param)
        return data

    # -- file:// --------------------------------------------------------------------------------

    async def _fetch_file(self, url: str, param: str, modality: str) -> bytes:
        if self.local_root is None:
            raise RequestError("file:// URLs are not allowed (the server has no "
                               "--allowed-local-media-path)", param)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise RequestError("file URL must look like file:///absolute/path", param)
        path = unquote(parts.path)
        if not path.startswith("/") or "\x00" in path or not _encodable(path):
            raise RequestError("file URL must look like file:///absolute/path", param)
        return await asyncio.to_thread(self._read_local, path, param, modality)

    def _read_local(self, path: str, param: str, modality: str) -> bytes:
        root = self.local_root
        assert root is not None
        outside = RequestError("file is not under the allowed local media path", param)
        real = os.path.realpath(path)  # follows every symlink and '..'
        if os.path.commonpath([real, root]) != root:
            raise outside  # the same answer whether or not the file exists
        try:
            # O_NOFOLLOW: the last component can't be swapped for a symlink after realpath;
            # O_NONBLOCK: opening a FIFO must not hang the thread.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise RequestError("cannot open file under the allowed local media path",
                               param) from None
        try:
            # Re-check what was actually opened: a folder swapped for a symlink meanwhile
            # would show up here (Linux /proc; elsewhere the realpath check stands alone).
            proc = f"/proc/self/fd/{fd}"
            if os.path.exists(proc) and os.path.commonpath([os.readlink(proc), root]) != root:
                raise outside
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RequestError("file URL must name a regular file", param)
            if st.st_size > self.max_bytes:
                raise RequestError(f"{modality} is larger than {self.max_bytes} bytes", param)
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(self.max_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise RequestError(f"{modality} is larger than {self.max_bytes} bytes", param)
        return data


def _encodable(path: str) -> bool:
    """False for lone surrogates, which no file system name can hold (os.open would raise)."""
    try:
        os.fsencode(path)
    except UnicodeError:
        return False
    return True


def _b64decode(payload: str, param: str) -> bytes:
    try:
        # validate=True: refuse stray characters instead of silently skipping them.
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("the payload is not valid base64", param) from None
