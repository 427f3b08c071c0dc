"""A sync batch's prompts: recorded together in one transaction at the batch's end, then handed to their rooms;
what else the batch holds still sees the prompts before it."""

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nio import SyncResponse
from structlog.testing import capture_logs

from aiagentchat.bot import Bot
from aiagentchat.settings import RoomSettings, Settings
from aiagentchat.store import Prompt, Store
from tests.test_first_sight import message
from tests.test_health import samples
from tests.test_hostile_events import ALICE, BOT

pytestmark = pytest.mark.anyio
ROOMS = ["!one:x", "!two:x", "!three:x"]


def stop(event_id: str, target: str) -> dict[str, Any]:
    content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": "🛑"}}
    return {"type": "m.reaction", "event_id": event_id, "sender": ALICE, "origin_server_ts": 1, "content": content}


def batch(timelines: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    joined = {
        room_id: {"timeline": {"events": events, "limited": False, "prev_batch": "p0"}, "state": {"events": []}}
        for room_id, events in timelines.items()
    }
    return {"next_batch": "s1", "rooms": {"join": joined}, "to_device": {"events": []}}


@contextlib.asynccontextmanager
async def a_bot(directory, max_queued: int = 10) -> AsyncIterator[tuple[Bot, Store]]:
    settings = Settings(paths={"data_dir": directory}, matrix={"homeserver": "http://127.0.0.1:9", "user_id": BOT})
    store = await Store.open(directory / "db.sqlite")
    bot = Bot(settings, store)
    try:
        bot.client.restore_login(BOT, "BOTDEVICE", "token")
        for room_id in ROOMS:
            room = bot.rooms[room_id] = RoomSettings(id=room_id, allowed_users=[ALICE], max_queued=max_queued)
            bot.workers[room_id] = bot._make_worker(room_id, room)
            await store.mark_room_seen(room_id)
        yield bot, store
    finally:
        await bot.client.close()
        bot.device_lock.release()
        await store.close()


async def take(bot: Bot, response: dict[str, Any]) -> list[dict[str, Any]]:
    parsed = SyncResponse.from_dict(response)
    assert isinstance(parsed, SyncResponse), parsed
    with capture_logs() as logs:
        await bot.client.receive_response(parsed)
        await bot._handle_sync(parsed, history=False)
    return logs


async def test_the_prompts_of_one_batch_are_recorded_in_one_transaction_before_any_room_gets_one(tmp_path):
    async with a_bot(tmp_path) as (bot, store):
        statements: list[str] = []
        execute, add_prompt = store._db.execute, store.add_prompt

        def spied(sql: str, *args: Any) -> Any:
            statements.append("prompt" if sql.startswith("INSERT OR IGNORE INTO prompts") else sql.split()[0])
            return execute(sql, *args)

        async def recorded(prompt, state="queued"):
            assert all(worker.inbox.empty() for worker in bot.workers.values())  # none handed over yet
            return await add_prompt(prompt, state)

        store._db.execute, store.add_prompt = spied, recorded
        timelines = {room: [message(f"${room[1:4]}a", "say a"), message(f"${room[1:4]}b", "say b")] for room in ROOMS}
        logs = await take(bot, batch(timelines))
    transactions = " ".join(statements).split("BEGIN")
    assert [t.split().count("prompt") for t in transactions if "prompt" in t] == [6]  # one commit for the six
    accepted = [entry["event_id"] for entry in logs if entry["event"] == "prompt_accepted"]
    assert accepted == ["$onea", "$oneb", "$twoa", "$twob", "$thra", "$thrb"]
    assert [[p.event_id for p in bot.workers[room].inbox._queue] for room in ROOMS] == [
        ["$onea", "$oneb"],
        ["$twoa", "$twob"],
        ["$thra", "$thrb"],
    ]


async def test_a_stop_in_the_same_batch_drops_the_prompt_before_it_and_the_queue_limit_counts_the_batch(tmp_path):
    async with a_bot(tmp_path, max_queued=2) as (bot, store):
        timeline = [message("$a", "say a"), message("$b", "say b"), stop("$stop", "$b"), message("$c", "say c")]
        logs = await take(bot, batch({ROOMS[0]: timeline}))
        assert await store.prompt_state("$b") == "queued" and await bot.workers[ROOMS[0]].drop("$b", ALICE) is False
        assert await store.prompt_state("$c") == "refused"
    stopped = [entry for entry in logs if entry["event"] == "stop_reaction"]
    assert [(entry["prompt"], entry["outcome"]) for entry in stopped] == [("$b", "dropped")]
    assert [entry["event_id"] for entry in logs if entry["event"] == "prompt_refused_busy"] == ["$c"]


async def test_each_event_of_a_batch_is_timed_from_its_origin_and_the_prompts_it_queues_show_in_the_metrics(tmp_path):
    async with a_bot(tmp_path) as (bot, _):
        recent = {"origin_server_ts": int(time.time() * 1000) - 2_000}  # sent two seconds ago
        await take(bot, batch({ROOMS[0]: [message("$a", "say a") | recent, message("$b", "say b") | recent]}))
        scraped = samples(bot.metrics.exposition(None)[0].decode())
    assert scraped[("aiagentchat_sync_lag_seconds_count", ())] == 2
    assert scraped[("aiagentchat_sync_lag_seconds_sum", ())] >= 4.0  # each was at least two seconds old
    assert scraped[("aiagentchat_queued_prompts", (("room", ROOMS[0]),))] == 2
    assert scraped[("aiagentchat_queued_prompts", (("room", ROOMS[1]),))] == 0


async def test_a_prompt_for_a_room_left_in_the_same_batch_is_not_taken_and_the_others_are(tmp_path):
    async with a_bot(tmp_path) as (bot, store):
        left, kept = Prompt(ROOMS[0], "$left", ALICE, "say a"), Prompt(ROOMS[1], "$kept", ALICE, "say b")
        bot._accepting = [(left, None), (kept, None)]
        del bot.rooms[ROOMS[0]]  # `!leave` later in the batch: the room is forgotten, its tasks still ending
        with capture_logs() as logs:
            await bot._record_accepted()
        assert await store.prompt_state("$left") is None and bot.workers[ROOMS[0]].inbox.empty()
        assert await store.prompt_state("$kept") == "queued"
        assert [p.event_id for p in bot.workers[ROOMS[1]].inbox._queue] == ["$kept"]
    ignored = [(e["event_id"], e["reason"]) for e in logs if e["event"] == "prompt_ignored"]
    assert ignored == [("$left", "room left")]
