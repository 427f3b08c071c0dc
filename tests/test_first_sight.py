"""A room the daemon sees for the first time: its history never runs, what was sent after the bot joined does."""

import asyncio

import pytest

from tests.test_hostile_events import ALICE, BOT, _take_sync, sync

pytestmark = pytest.mark.anyio


def message(event_id: str, body: str) -> dict:
    content = {"msgtype": "m.text", "body": body}
    return {"type": "m.room.message", "event_id": event_id, "sender": ALICE, "origin_server_ts": 1, "content": content}


JOIN = {
    "type": "m.room.member",
    "event_id": "$join",
    "sender": BOT,
    "state_key": BOT,
    "origin_server_ts": 1,
    "content": {"membership": "join"},
}


async def test_in_a_room_joined_in_this_batch_only_what_came_after_the_join_runs(tmp_path):
    timeline = [message("$before", "say old"), JOIN, message("$after", "say new")]
    async with asyncio.timeout(10):
        _, recorded, queued = await _take_sync(tmp_path, sync(timeline, []), "all", seen=False)
    assert recorded == {"$after"} and [prompt.event_id for prompt in queued] == ["$after"]


async def test_a_room_first_seen_without_the_bots_join_runs_nothing(tmp_path):
    timeline = [message("$old", "say old"), message("$older", "say older")]
    _, recorded, queued = await _take_sync(tmp_path, sync(timeline, []), "all", seen=False)
    assert recorded == set() and queued == []
