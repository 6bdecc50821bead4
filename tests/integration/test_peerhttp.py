"""The peer channel's HTTP client (``branchd.cluster.peerhttp``) against real
servers on 127.0.0.1: aiohttp's (as the branches' API serves the peer
route) and raw asyncio ones for the answers aiohttp would never give."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from branchd.cluster.peerhttp import PeerHttp, PeerHttpError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Served:
    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner, self.url = runner, url
        self.connections: set[object] = set()


Serve = Callable[[Handler], Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    made: list[Served] = []

    async def start(handler: Handler) -> Served:
        served: Served

        async def counted(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            served.connections.add(request.transport.get_extra_info("peername"))
            return await handler(request)

        app = web.Application()
        app.router.add_post("/v1/cluster/peer", counted)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        served = Served(runner, f"http://127.0.0.1:{port}/v1/cluster/peer")
        made.append(served)
        return served

    yield start
    for s in made:
        await s.runner.cleanup()


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(body=request.headers["X-Tag"].encode() + b":" + body)


async def test_a_post_is_answered_and_its_connection_kept_for_the_next(serve: Serve) -> None:
    s = await serve(echo)
    http = PeerHttp()
    try:
        for i in range(3):
            status, body = await http.post(s.url, b"x" * i, {"X-Tag": str(i)}, 5.0)
            assert (status, body) == (200, f"{i}:".encode() + b"x" * i)
        assert len(s.connections) == 1  # one connection for all three
    finally:
        await http.close()


async def test_a_chunked_answer_and_an_error_status_are_read(serve: Serve) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=403)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"not ", b"sealed", b""):
            await resp.write(part)
        await resp.write_eof()
        return resp

    s = await serve(chunked)
    http = PeerHttp()
    try:
        assert await http.post(s.url, b"", {}, 5.0) == (403, b"not sealed")
        assert await http.post(s.url, b"", {}, 5.0) == (403, b"not sealed")
    finally:
        await http.close()


class Raw:
    """A raw asyncio server giving one fixed answer to each request (silent
    after it, when not ``close``); ``await stop()`` ends it and its writers."""

    def __init__(self, answer: bytes, close: bool) -> None:
        self.answer, self.close = answer, close
        self.writers: list[asyncio.StreamWriter] = []
        self.done = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        if not self.close:
            await self.done.wait()  # silent: never answers more
        writer.close()

    async def stop(self) -> None:
        self.done.set()
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


async def raw_server(answer: bytes, close: bool = True) -> Raw:
    raw = Raw(answer, close)
    raw.server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = raw.server.sockets[0].getsockname()[1]
    raw.url = f"http://127.0.0.1:{port}/v1/cluster/peer"
    return raw


async def test_a_kept_connection_the_server_closed_is_replaced_unnoticed() -> None:
    # answered as kept alive, then closed (as a server's keep-alive timeout does)
    server = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    url = server.url
    http = PeerHttp()
    try:
        assert await http.post(url, b"", {}, 5.0) == (200, b"ok")
        assert len(http._idle) == 1
        assert await http.post(url, b"", {}, 5.0) == (200, b"ok")  # on a new one
    finally:
        await http.close()
        await server.stop()


async def test_an_interim_answer_is_skipped() -> None:
    server = await raw_server(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    http = PeerHttp()
    try:
        assert await http.post(server.url, b"", {}, 5.0) == (200, b"ok")
    finally:
        await http.close()
        await server.stop()


async def test_an_answer_without_a_length_is_read_to_its_end() -> None:
    server = await raw_server(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    url = server.url
    http = PeerHttp()
    try:
        assert await http.post(url, b"", {}, 5.0) == (200, b"all of it")
        assert http._idle == {}  # not kept: the server closed it
    finally:
        await http.close()
        await server.stop()


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n"],
)  # fmt: skip
async def test_an_answer_that_is_not_http_is_an_error(answer: bytes) -> None:
    server = await raw_server(answer)
    url = server.url
    http = PeerHttp()
    try:
        with pytest.raises(PeerHttpError):
            await http.post(url, b"", {}, 5.0)
    finally:
        await http.close()
        await server.stop()


async def test_a_silent_peer_times_out_and_a_closed_port_is_refused() -> None:
    half = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"
    server = await raw_server(half, close=False)
    url = server.url
    http = PeerHttp()
    try:
        with pytest.raises(TimeoutError):
            await http.post(url, b"", {}, 0.2)
        await server.stop()
        with pytest.raises(OSError):
            await http.post(url, b"", {}, 5.0)
        with pytest.raises(ValueError, match="not an http"):
            await http.post("ftp://127.0.0.1/x", b"", {}, 5.0)
    finally:
        await http.close()
