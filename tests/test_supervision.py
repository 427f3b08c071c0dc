"""A room whose task fails restarts alone: the supervisor, a crashing worker and a crashing sender."""

import asyncio
import sqlite3

import pytest
from structlog.testing import capture_logs

from aiagentchat import bot
from aiagentchat.batcher import INTERNAL_ERROR, Batcher, Block, EndOfRun, Notice
from aiagentchat.outbox import Outbox, Sent
from aiagentchat.store import Prompt
from aiagentchat.transport import TokenRevoked
from tests.test_runner import fake_claude, make_worker

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch):
    monkeypatch.setattr(bot, "RESTART_BACKOFF_S", 0.01)


async def test_a_failing_task_is_restarted_with_back_off_and_told_each_time():
    attempts, recoveries = [], []

    async def run() -> None:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise RuntimeError(f"failure {len(attempts)}")

    async def recover() -> None:
        recoveries.append(len(attempts))

    with capture_logs() as logs:
        await asyncio.wait_for(bot.supervise("!r:x", "worker", run, recover), 5)
    assert attempts == [0, 1, 2] and recoveries == [1, 2]
    failed = [(entry["failures"], entry["restart_in_s"]) for entry in logs if entry["event"] == "room_task_failed"]
    assert failed == [(1, 0.01), (2, 0.02)]


@pytest.mark.parametrize("fatal", [TokenRevoked(), sqlite3.OperationalError("disk I/O error")])
async def test_what_the_daemon_cannot_recover_from_ends_it(fatal):
    async def run() -> None:
        raise fatal

    with pytest.raises(type(fatal)):
        await bot.supervise("!r:x", "worker", run)


async def test_a_statement_that_fails_is_not_fatal():
    assert not bot.fatal(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert bot.fatal(sqlite3.DatabaseError("database disk image is malformed"))


class Flaky:
    """A store whose first `set_prompt_state` fails, as an unexpected bug would."""

    def __init__(self, store) -> None:
        self._store = store
        self.failed = False

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def set_prompt_state(self, event_id, state) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug")
        await self._store.set_prompt_state(event_id, state)


async def test_a_crashed_worker_answers_its_prompt_as_failed_and_takes_the_next(tmp_path, store):
    worker, recorder = make_worker(tmp_path, Flaky(store), fake_claude(tmp_path))
    async with asyncio.TaskGroup() as group:
        task = group.create_task(bot.supervise("!room:x", "worker", worker.run, worker.crashed))
        await worker.inbox.put(Prompt("!room:x", "$first", "@u:x", "say one"))
        async with asyncio.timeout(10):
            assert await recorder.ended.get() == "$first"
        await worker.inbox.put(Prompt("!room:x", "$second", "@u:x", "say two"))
        async with asyncio.timeout(20):
            assert await recorder.ended.get() == "$second"
        task.cancel()
    assert recorder.states == {"$first": "failed", "$second": "done"}
    assert INTERNAL_ERROR in recorder.output("$first")
    assert recorder.output("$second").startswith("two")


class Sender:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, room_id, content, txn_id, event_type="m.room.message"):
        self.sent.append(content)
        return Sent(f"$out{len(self.sent)}")


async def test_a_crashed_sender_tells_the_room_and_delivers_what_was_queued(tmp_path, store, monkeypatch):
    sender = Sender()
    batcher = Batcher("!room:x", Outbox("!room:x", sender, store), transcripts=tmp_path, interval_s=0.01)
    accept = batcher._accept
    crashes = []

    def crash_once(item):
        if isinstance(item, Block) and not crashes:
            crashes.append(item)
            raise RuntimeError("a bug")
        accept(item)

    monkeypatch.setattr(batcher, "_accept", crash_once)
    async with asyncio.TaskGroup() as group:
        group.create_task(bot.supervise("!room:x", "batcher", batcher.run, batcher.crashed))
        await batcher.put(Block("$p", "lost in the crash"))
        await batcher.put(Notice("$q", "after the crash", {}))
        await batcher.put(EndOfRun("$p", {"ok": True, "result": "r"}))
        await batcher.close()
    bodies = [content["body"] for content in sender.sent]
    assert sum(INTERNAL_ERROR in body for body in bodies) == 1
    assert any("after the crash" in body for body in bodies)
