"""An HTTP proxy in front of the homeserver that misbehaves on demand, the way networks and reverse proxies do.

    proxy = FaultyProxy(synapse.base_url); await proxy.start()      # the daemon talks to proxy.base_url
    await proxy.fault("bad_gateway")                                # every request: an HTML 502 page
    await proxy.fault("lose_answers", sends_only=True)              # sends reach Synapse, answers are lost
    await proxy.heal()

Faults: `refuse` (nothing listens: connection refused; a kept-alive connection is reset), `bad_gateway` (HTML 502 from "nginx"), `blackhole`
(the connection is accepted and never answered), `lose_answers` (the request is forwarded and done upstream,
then the connection is dropped without an answer: the client cannot know it worked). `sends_only` limits a
fault to event sends (`PUT .../send/...`), so syncs still pass. `faulted[kind]` counts the requests a fault
has hit so far, for tests to wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Literal

import aiohttp
from aiohttp import web

from tests.harness.synapse import free_port

Fault = Literal["refuse", "bad_gateway", "blackhole", "lose_answers"]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
BAD_GATEWAY_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.faulted: Counter[str] = Counter()
        self._fault: Fault | None = None
        self._sends_only = False
        self._changed = asyncio.Condition()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await self._listen()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def fault(self, kind: Fault, *, sends_only: bool = False) -> None:
        self._fault, self._sends_only = kind, sends_only
        if kind == "refuse" and self._site is not None:
            await self._site.stop()
            self._site = None

    async def heal(self) -> None:
        self._fault = None
        if self._site is None:
            await self._listen()

    async def wait_faulted(self, kind: Fault, count: int, timeout: float = 30) -> None:
        """Until `count` requests have met fault `kind`."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.faulted[kind] >= count)

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    def _applies(self, request: web.Request) -> bool:
        return self._fault is not None and (not self._sends_only or ("/send/" in request.path and request.method == "PUT"))

    async def _count(self, kind: str) -> None:
        async with self._changed:
            self.faulted[kind] += 1
            self._changed.notify_all()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._fault if self._applies(request) else None
        if fault is not None:
            await self._count(fault)
        if fault == "refuse" and request.transport is not None:  # a connection opened before the listener closed
            request.transport.abort()
            return web.Response(status=502)
        if fault == "bad_gateway":
            return web.Response(status=502, text=BAD_GATEWAY_PAGE, content_type="text/html")
        if fault == "blackhole":
            await asyncio.Future()  # never answers; ends when the client gives up and disconnects
        response = await self._forward(request)
        if fault == "lose_answers" and request.transport is not None:
            request.transport.abort()
        return response

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        with contextlib.suppress(aiohttp.ClientError):
            async with self._session.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=body or None
            ) as upstream:
                payload = await upstream.read()
                answer = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(status=upstream.status, headers=answer, body=payload)
        return web.Response(status=502, text=BAD_GATEWAY_PAGE, content_type="text/html")
