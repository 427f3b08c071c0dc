"""A room's slow chores: in order, in the room's own task, a failing one never stopping the next, and a sync that
carries an upload handled without waiting for the download."""

import asyncio

import pytest
from structlog.testing import capture_logs

from aiagentchat.desk import Desk
from tests.test_hostile_events import ALICE, _take_sync, sync

pytestmark = pytest.mark.anyio


async def test_chores_run_in_order_and_settled_waits_for_all_of_them():
    desk = Desk("!r:x")
    done: list[str] = []
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()
        done.append("slow")

    async def broken() -> None:
        raise RuntimeError("a bug")

    async def quick() -> None:
        done.append("quick")

    await desk.settled()  # nothing to do yet: returns at once
    for name, chore in (("slow", slow), ("broken", broken), ("quick", quick)):
        desk.add(name, chore)
    with capture_logs() as logs:
        async with asyncio.TaskGroup() as group:
            task = group.create_task(desk.run())
            waiting = group.create_task(desk.settled())
            await asyncio.sleep(0)
            assert not waiting.done()
            gate.set()
            async with asyncio.timeout(5):
                await waiting
            task.cancel()
    assert done == ["slow", "quick"]
    assert [(entry["event"], entry["chore"]) for entry in logs] == [("chore_failed", "broken")]


async def test_a_sync_with_an_upload_is_handled_without_waiting_for_the_download(tmp_path, monkeypatch):
    never = asyncio.Event()

    async def download_forever(*args, **kwargs):
        await never.wait()

    monkeypatch.setattr("nio.AsyncClient.download", download_forever)
    file = {"msgtype": "m.file", "body": "big.bin", "url": "mxc://x/big", "info": {"size": 10}}
    timeline = [
        {"type": "m.room.message", "event_id": "$file", "sender": ALICE, "origin_server_ts": 1, "content": file},
        {
            "type": "m.room.message",
            "event_id": "$prompt",
            "sender": ALICE,
            "origin_server_ts": 2,
            "content": {"msgtype": "m.text", "body": "look at it"},
        },
    ]
    async with asyncio.timeout(5):
        logs, recorded, queued = await _take_sync(tmp_path, sync(timeline, []), "all")
    assert recorded == {"$file", "$prompt"}
    assert [prompt.event_id for prompt in queued] == ["$prompt"]
    assert not [entry for entry in logs if entry["event"] == "upload_saved"]
