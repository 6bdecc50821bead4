"""HTTP/1.1 POSTs to the peer route of other branches, over asyncio streams.

The peer channel is one route between branchd daemons (``POST
/v1/cluster/peer``, opaque bytes each way, served by aiohttp's server), so
its client needs little of HTTP: a request with a ``Content-Length`` body,
and an answer with a ``Content-Length`` (what aiohttp's ``web.Response``
sends), chunked, or read to the end of a closed connection. aiohttp's client
does that too, but a branch would carry its twenty modules, the cookie jar
with pickle, and the two SSL contexts its connector builds at import (one
parsing the system's CA file): 4.5 MiB of resident memory, most of the
5 MiB a clustered branch may cost over a single one (issue 13). Forwarded
API requests and HTTP probes still use aiohttp's client; this is only the
channel every clustered branch uses all the time (push-pull, names,
declarations, keys).

One idle connection per origin is kept for the next call (the server keeps
it 75 s); a call on a kept connection that the server closed meanwhile is
tried once more on a new one, since nothing of it was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

#: The largest answer taken (a push-pull of a thousand members is ~200 KB).
MAX_BODY = 64 * 2**20
#: The largest status line and header block taken.
MAX_HEAD = 64 * 1024

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_Origin = tuple[str, str, int]


class PeerHttpError(OSError):
    """The peer's answer was not HTTP this client reads."""


class _Stale(Exception):
    """A kept connection the server had closed: nothing of the answer came."""


class PeerHttp:
    """POSTs to branches' API URLs; ``await close()`` drops the kept connections."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._idle: dict[_Origin, _Conn] = {}
        self._default_tls: ssl.SSLContext | None = None  # made at the first https call

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes]:
        """(status, body) of one POST of ``body`` to ``url``, within ``timeout`` s."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, parts.hostname, port)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        head = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head += [f"Content-Length: {len(body)}", "Connection: keep-alive", "", ""]
        request = "\r\n".join(head).encode("latin-1") + body
        async with asyncio.timeout(timeout):
            kept = self._idle.pop(origin, None)
            if kept is not None:
                try:
                    return await self._exchange(origin, kept, request)
                except _Stale:
                    pass  # closed by the server while it was kept: on a new one
            conn = await self._connect(origin)
            try:
                return await self._exchange(origin, conn, request)
            except _Stale:
                raise ConnectionError(f"{url} closed the connection unanswered") from None

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for _, writer in idle.values():
            writer.close()
        for _, writer in idle.values():
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _connect(self, origin: _Origin) -> _Conn:
        scheme, host, port = origin
        if scheme == "https":
            tls = self._tls
            if tls is None:  # (the system's store, read once, not per connection)
                tls = self._default_tls = self._default_tls or ssl.create_default_context()
            return await asyncio.open_connection(host, port, ssl=tls, server_hostname=host)
        return await asyncio.open_connection(host, port)

    async def _exchange(self, origin: _Origin, conn: _Conn, request: bytes) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            try:
                writer.write(request)
                await writer.drain()
                status, fields = await _read_head(reader)
                while 100 <= status < 200:  # interim answers (none is asked for): the next
                    status, fields = await _read_head(reader)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                raise _Stale() from None
            except (ConnectionResetError, BrokenPipeError):
                raise _Stale() from None
            body, reusable = await _read_body(reader, status, fields)
        except BaseException:
            writer.close()
            raise
        if reusable and origin not in self._idle:
            self._idle[origin] = conn
        else:
            writer.close()
        return status, body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise PeerHttpError("the answer's head is too large") from None
    if len(raw) > MAX_HEAD:
        raise PeerHttpError("the answer's head is too large")
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise PeerHttpError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise PeerHttpError(f"a malformed header line: {line[:80]!r}")
            fields[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" and fields.get("connection", "").lower() != "keep-alive":
        fields["connection"] = "close"
    return int(code), fields


async def _read_body(
    reader: asyncio.StreamReader, status: int, fields: dict[str, str]
) -> tuple[bytes, bool]:
    """The body, and whether the connection may carry another request."""
    reusable = fields.get("connection", "").lower() != "close"
    if status in (204, 304):
        return b"", reusable
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return await _read_chunked(reader), reusable
    length = fields.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_BODY:
            raise PeerHttpError(f"an unusable Content-Length: {length[:40]!r}")
        return await reader.readexactly(int(length)), reusable
    body = bytearray()  # to the end: the server closes the connection after it
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > MAX_BODY:
            raise PeerHttpError("the answer is too large")
    return bytes(body), False


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        if not size_text or size_text.strip(b"0123456789abcdefABCDEF") or len(size_text) > 8:
            raise PeerHttpError(f"a malformed chunk size: {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return bytes(out)
        if len(out) + size > MAX_BODY:
            raise PeerHttpError("the answer is too large")
        out += await reader.readexactly(size)
        await reader.readexactly(2)
