"""Bot._shut_down against real batchers and outboxes with fake senders: one deadline for every room."""

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from aiagentchat.batcher import Batcher, Begin, Block, EndOfRun, Text
from aiagentchat.bot import Bot
from aiagentchat.localserver import KILLED_WAIT_S, STOP_TIMEOUT_S, SynapseProcess
from aiagentchat.outbox import Outbox, RateLimited, SendOutcome, Sent
from aiagentchat.settings import Settings

pytestmark = pytest.mark.anyio
CONTAINER_GRACE_S = 10.0  # what `podman stop` and `docker stop` wait before SIGKILL
DEADLINE_S = 0.5
INTERRUPTED = "⚠️ Interrupted: the daemon is shutting down."


class Sender:
    """Answers every send with the same outcome and counts the attempts."""

    def __init__(self, outcome: SendOutcome) -> None:
        self.outcome = outcome
        self.attempts: list[dict[str, Any]] = []
        self.tried = asyncio.Event()

    async def send(
        self, room_id: str, content: dict[str, Any], txn_id: str, event_type: str = "m.room.message"
    ) -> SendOutcome:
        self.attempts.append(content)
        self.tried.set()
        return self.outcome

    async def redact(self, room_id: str, event_id: str, txn_id: str) -> SendOutcome:
        return await self.send(room_id, {"redacts": event_id}, txn_id, "m.room.redaction")

    async def upload(self, room_id: str, path: Path, mimetype: str) -> SendOutcome:
        raise AssertionError("no uploads here")


@pytest.fixture
async def bot(store, tmp_path) -> AsyncIterator[Bot]:
    settings = Settings(
        matrix={"homeserver": "http://127.0.0.1:9", "user_id": "@bot:x"},
        paths={"data_dir": tmp_path / "data"},
        daemon={"shutdown_timeout_s": DEADLINE_S},
    )
    bot = Bot(settings, store)
    yield bot
    await bot.client.close()
    bot.device_lock.release()


def add_room(bot: Bot, room_id: str, sender: Sender, tmp_path: Path) -> Batcher:
    batcher = Batcher(room_id, Outbox(room_id, sender, bot.store), transcripts=tmp_path / "transcripts")
    bot.workers[room_id] = SimpleNamespace(room_id=room_id, batcher=batcher)
    return batcher


async def interrupted_run(batcher: Batcher, prompt: str) -> None:
    """What a room's worker does with a running prompt: output, then on cancellation the notice and the end."""
    await batcher.put(Begin(prompt, {}))
    await batcher.put(Text(prompt, "w1 w2\n"))
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await batcher.put(Block(prompt, INTERRUPTED))
        await batcher.put(EndOfRun(prompt, None, "interrupted"))
        raise


async def swallowing_run() -> None:
    """A worker that loses its first cancellation (as asyncio.wait_for on Python 3.11 can) and waits on."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    await asyncio.Event().wait()


async def test_one_deadline_for_every_room_a_stuck_run_and_a_rate_limit_included(bot, store, tmp_path):
    limited, stuck = Sender(RateLimited(60.0)), Sender(Sent("$sent"))
    batchers = [add_room(bot, "!limited:x", limited, tmp_path), add_room(bot, "!stuck:x", stuck, tmp_path)]
    intake = [asyncio.create_task(asyncio.Event().wait())]
    runs = [asyncio.create_task(interrupted_run(batchers[0], "$prompt")), asyncio.create_task(swallowing_run())]
    sends = [asyncio.create_task(batcher.run()) for batcher in batchers]
    await limited.tried.wait()  # the room's output now waits behind the rate limit

    loop = asyncio.get_running_loop()
    with capture_logs() as logged:
        started = loop.time()
        async with asyncio.timeout(5):
            await bot._shut_down(intake, runs, sends)
        took = loop.time() - started
    _, pending = await asyncio.wait([*intake, *runs, *sends], timeout=1)

    assert DEADLINE_S <= took < DEADLINE_S + 0.5
    assert pending == set()  # the swallowed cancellation was made again
    kept = await store.outbox("!limited:x")
    assert "w1 w2" in kept[0].content["body"] and INTERRUPTED in kept[-1].content["body"]
    (deadline,) = [entry for entry in logged if entry["event"] == "shutdown_deadline"]
    assert deadline["rooms_still_running"] == ["!stuck:x"]
    assert deadline["undelivered_events"] == len(kept)


async def test_without_trouble_shutdown_ends_once_everything_is_delivered(bot, store, tmp_path):
    sender = Sender(Sent("$sent"))
    batcher = add_room(bot, "!room:x", sender, tmp_path)
    intake = [asyncio.create_task(asyncio.Event().wait())]
    runs = [asyncio.create_task(interrupted_run(batcher, "$prompt"))]
    sends = [asyncio.create_task(batcher.run())]
    await sender.tried.wait()

    with capture_logs() as logged:
        async with asyncio.timeout(DEADLINE_S / 2):
            await bot._shut_down(intake, runs, sends)

    assert all(task.done() for task in [*intake, *runs, *sends])
    assert INTERRUPTED in sender.attempts[-1]["body"]
    assert await store.outbox("!room:x") == []
    assert not [entry for entry in logged if entry["event"] == "shutdown_deadline"]


def test_the_defaults_fit_the_container_runtimes_grace_with_a_margin():
    daemon = Settings().daemon.shutdown_timeout_s
    assert daemon + STOP_TIMEOUT_S + KILLED_WAIT_S <= CONTAINER_GRACE_S - 2


async def test_a_homeserver_that_ignores_sigterm_is_killed_in_time(tmp_path):
    ignores_sigterm = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    process = SynapseProcess(sys.executable, tmp_path, 0)
    with subprocess.Popen([sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE, start_new_session=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"  # SIGTERM is ignored from here on
        process._proc = proc
        started = time.monotonic()
        await process.stop()
        took = time.monotonic() - started
    assert proc.returncode == -9
    assert STOP_TIMEOUT_S <= took < STOP_TIMEOUT_S + KILLED_WAIT_S
