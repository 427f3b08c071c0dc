"""The systemd notify protocol against a datagram socket the test binds and listens on, as systemd does."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from aiagentchat.bot import Bot
from aiagentchat.settings import Settings
from aiagentchat.systemd import Notifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = tmp_path / "notify"
        sock.bind(str(path))
        sock.setblocking(False)
        yield str(path), sock


def received(sock: socket.socket) -> list[str]:
    """Every datagram already waiting on the (non-blocking) socket."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def next_message(sock: socket.socket) -> str:
    async with asyncio.timeout(5):
        return (await asyncio.get_running_loop().sock_recv(sock, 4096)).decode()


def test_each_state_is_one_datagram_on_the_socket_named(listener):
    path, sock = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    notifier.send("READY=1")
    notifier.send("STOPPING=1")
    assert received(sock) == ["READY=1", "STOPPING=1"]


def test_a_leading_at_sign_names_the_abstract_namespace():
    name = f"aiagentchat-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    notifier = Notifier.from_environment({})
    with capture_logs() as logs:
        notifier.send("READY=1")
    assert (notifier.address, notifier.watchdog_s, logs) == (None, None, [])


def test_the_watchdog_period_is_for_this_process_only():
    assert Notifier.from_environment({"WATCHDOG_USEC": "4000000"}).watchdog_s == 4.0
    assert Notifier.from_environment({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 4.0
    assert Notifier.from_environment({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier.from_environment({"WATCHDOG_USEC": "soon"}).watchdog_s is None


def test_a_socket_that_is_gone_is_logged_once_and_never_raises(tmp_path):
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with capture_logs() as logs:
        notifier.send("WATCHDOG=1")
        notifier.send("WATCHDOG=1")
    assert [entry["event"] for entry in logs] == ["systemd_notify_failed"]


async def test_ready_once_ready_then_a_watchdog_ping_each_half_period_only_while_healthy(listener):
    path, sock = listener
    notifier = Notifier(path, watchdog_s=0.02)
    ready, healthy, unhealthy_checks = asyncio.Event(), [True], Counter()

    def check() -> bool:
        unhealthy_checks["seen"] += not healthy[0]
        return healthy[0]

    async def checked_unhealthy(times: int) -> None:
        async with asyncio.timeout(5):
            while unhealthy_checks["seen"] < times:
                await asyncio.sleep(0.01)

    task = asyncio.create_task(notifier.run(ready, check))
    try:
        ready.set()
        assert await next_message(sock) == "READY=1"  # first: nothing before the daemon is ready
        assert await next_message(sock) == "WATCHDOG=1"
        assert await next_message(sock) == "WATCHDOG=1"
        healthy[0] = False
        await checked_unhealthy(1)
        assert set(received(sock)) <= {"WATCHDOG=1"}  # at most the ping sent before the change
        await checked_unhealthy(4)
        assert received(sock) == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_a_watchdog_run_ends_after_ready(listener):
    path, sock = listener
    ready = asyncio.Event()
    ready.set()
    async with asyncio.timeout(5):
        await Notifier(path).run(ready, lambda: True)
    assert received(sock) == ["READY=1"]


async def test_the_watchdog_sees_a_sync_loop_alive_while_the_homeserver_is_down_and_not_once_it_hangs(store, tmp_path):
    settings = Settings(matrix={"homeserver": "http://127.0.0.1:9", "user_id": "@bot:x"}, paths={"data_dir": tmp_path})
    bot = Bot(settings, store)
    attempts: list[float] = []
    hang = asyncio.Event()

    async def sync(**_: object) -> None:
        attempts.append(time.monotonic())
        if len(attempts) > 2:
            hang.set()
            await asyncio.Event().wait()  # a request that never ends
        raise ConnectionRefusedError("homeserver down")

    bot.client.sync = sync  # type: ignore[method-assign]
    assert not bot.sync_loop_alive()  # not started
    loop = asyncio.create_task(bot._sync_loop())
    try:
        with capture_logs():
            async with asyncio.timeout(10):
                await hang.wait()
            assert bot.last_sync is None and bot.sync_loop_alive()  # two failed syncs, and backing off between
            bot._turn_limit_s = 0.2
            async with asyncio.timeout(5):
                while bot.sync_loop_alive():
                    await asyncio.sleep(0.02)  # poll interval of the condition above
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await bot.client.close()
        bot.device_lock.release()
