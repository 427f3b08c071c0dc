"""The daemon as a service is watched (issue 18): /metrics and /healthz scraped from a running daemon, with the
homeserver up, stopped and started again, and what it tells systemd on the notify socket. Real Synapse and the
real CLI."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import World
from tests.integration.daemon import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
SYNC_MAX_AGE_S = 5


async def address_of(daemon: Daemon) -> str:
    entry = await daemon.wait_for_log("http_serving")
    return entry["addresses"][0]


async def scrape(session: aiohttp.ClientSession, address: str) -> dict[str, float]:
    """Every sample of /metrics, by name and labels (`name{label=value,...}`)."""
    async with session.get(f"http://{address}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        sample.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def healthz(session: aiohttp.ClientSession, address: str) -> tuple[int, str]:
    async with session.get(f"http://{address}/healthz") as response:
        return response.status, await response.text()


@pytest.fixture
async def systemd(tmp_path: Path) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A notify socket as systemd listens on it: its path, and every datagram sent to it, read as it comes (a full
    queue would make the daemon drop the next)."""
    path, told = tmp_path / "notify", []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)

        async def listen() -> None:
            while True:
                told.append(await asyncio.get_running_loop().sock_recv(sock, 64))

        listening = asyncio.create_task(listen())
        yield str(path), told
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)


async def until(check: Callable[[], object], what: str, timeout: float):
    """Ask `check` (awaited when it is a coroutine function) until it returns something true; that, or a failure
    naming `what` at the deadline."""
    last = None
    try:
        async with asyncio.timeout(timeout):
            while not (last := await check() if asyncio.iscoroutinefunction(check) else check()):
                await asyncio.sleep(0.25)
    except TimeoutError:
        raise AssertionError(f"{what} not within {timeout} s; last seen: {last!r}") from None
    return last


async def test_metrics_count_an_answered_prompt_and_health_follows_the_homeserver_down_and_up_but_not_the_watchdog(
    world: World, systemd
):
    room = await world.room()
    notify_socket, told = systemd
    env = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "1000000"}
    daemon = world.daemon([{"id": room}], env=env, settings={"daemon": {"health_sync_max_age_s": SYNC_MAX_AGE_S}})
    await daemon.start()
    await until(lambda: told[:2] == [b"READY=1", b"WATCHDOG=1"] or None, "READY, then a watchdog ping", timeout=10)
    address = await address_of(daemon)
    assert "hello" in await world.ask(room, "say hello")
    async with aiohttp.ClientSession() as session:

        async def counted() -> dict[str, float] | None:
            found = await scrape(session, address)
            done = found["aiagentchat_prompts_total{outcome=done}"] == 1
            return found if done and found["aiagentchat_events_sent_total{type=message}"] >= 1 else None

        metrics = await until(counted, "the answered prompt in /metrics", timeout=30)
        assert metrics["aiagentchat_prompts_total{outcome=failed}"] == 0
        assert metrics["aiagentchat_run_duration_seconds_count{}"] == 1
        assert metrics["aiagentchat_sync_lag_seconds_count{}"] >= 1
        assert metrics["aiagentchat_agents_running{}"] == 1
        assert metrics[f"aiagentchat_queued_prompts{{room={room}}}"] == 0

        def answers(status: int) -> Callable[[], object]:
            async def check() -> tuple[int, str] | None:
                answer = await healthz(session, address)
                return answer if answer[0] == status else None

            return check

        assert await until(answers(200), "a healthy /healthz", timeout=60) == (200, "ok\n")
        await world.synapse.stop()
        try:
            _, reason = await until(answers(503), "/healthz turning 503", timeout=60)
            assert reason.startswith("no good sync for ") and reason.endswith(f"(more than {SYNC_MAX_AGE_S} s)\n")
            pings = told.count(b"WATCHDOG=1")  # a homeserver that is down is no reason for systemd to restart us
            await until(lambda: told.count(b"WATCHDOG=1") >= pings + 3, "watchdog pings with the homeserver down", 10)
        finally:
            await world.synapse.start()
        await until(answers(200), "/healthz healthy again", timeout=120)
    assert await daemon.stop() == 0
    await until(lambda: b"STOPPING=1" in told or None, "STOPPING=1 on SIGTERM", timeout=10)
    assert set(told) == {b"READY=1", b"WATCHDOG=1", b"STOPPING=1"} and told.count(b"READY=1") == 1
