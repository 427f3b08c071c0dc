"""`GET /healthz` and `GET /metrics` on `[daemon] http_listen`, served in the daemon's own event loop: a health
check that asks the loop itself answers only while that loop runs."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from aiagentchat.errors import ConfigError
from aiagentchat.metrics import Metrics
from aiagentchat.settings import DaemonSettings

log = structlog.get_logger(__name__)

DB_CHECK_TIMEOUT_S = 5.0  # a write that waits longer (a transaction holding the database) counts as failed


def sync_problem(now: float, last_sync: float | None, max_age_s: float) -> str | None:
    """Why the sync loop is unhealthy (no good sync yet, or none for longer than `max_age_s`), or None."""
    if last_sync is None:
        return "starting: no sync with the homeserver yet"
    if (age := now - last_sync) > max_age_s:
        return f"no good sync for {age:.0f} s (more than {max_age_s:g} s)"
    return None


def outbox_problem(now: float, waiting_since: float | None, max_age_s: float) -> str | None:
    """Why sending is stuck (the next event has waited longer than `max_age_s`), or None."""
    if waiting_since is not None and (age := now - waiting_since) > max_age_s:
        return f"outbox stuck: an event has waited {age:.0f} s to be delivered (more than {max_age_s:g} s)"
    return None


@dataclass
class Health:
    """What /healthz asks, and the systemd watchdog. The times are `time.monotonic()` readings."""

    settings: DaemonSettings
    last_sync: Callable[[], float | None]  # when the last good sync ended
    waiting_since: Callable[[], float | None]  # since when the longest-waiting room's next event has waited
    write_check: Callable[[], Awaitable[None]]  # a write to the database; raises when it cannot be written
    clock: Callable[[], float] = time.monotonic

    def sync_problem(self) -> str | None:
        return sync_problem(self.clock(), self.last_sync(), self.settings.health_sync_max_age_s)

    async def problem(self) -> str | None:
        """The first reason the daemon is unhealthy, or None."""
        now = self.clock()
        if found := self.sync_problem() or outbox_problem(
            now, self.waiting_since(), self.settings.health_outbox_max_age_s
        ):
            return found
        try:
            async with asyncio.timeout(DB_CHECK_TIMEOUT_S):
                await self.write_check()
        except TimeoutError:
            return f"database write did not complete within {DB_CHECK_TIMEOUT_S:g} s"
        except (sqlite3.Error, OSError) as exc:  # told to the prober; the daemon's own writes end it if it is fatal
            return f"database not writable: {type(exc).__name__}: {exc}"
        return None


def split_address(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` (as the settings allow) into host and port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def make_app(health: Health, metrics: Metrics) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        problem = await health.problem()
        if problem is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=problem + "\n")

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", scrape)
    return app


@contextlib.asynccontextmanager
async def serving(health: Health, metrics: Metrics) -> AsyncIterator[None]:
    """Serve /healthz and /metrics on `http_listen` (nothing when it is ""); an address that cannot be bound is a
    configuration error, so a deployment never runs blind by accident."""
    listen = health.settings.http_listen
    if not listen:
        yield
        return
    runner = web.AppRunner(make_app(health, metrics), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        host, port = split_address(listen)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(f"[daemon] http_listen = {listen!r} cannot be served: {exc.strerror or exc}") from None
        addresses = [f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}" for a in runner.addresses]
        log.info("http_serving", addresses=addresses, paths=["/healthz", "/metrics"])
        yield
    finally:
        await runner.cleanup()
