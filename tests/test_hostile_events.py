"""Generated hostile events (Hypothesis): arbitrary JSON in every field the daemon reads, for every event type
it reads, through the intake alone and through the daemon's sync handling after nio's own parsing. Nothing
may raise, and nothing may be queued or recorded for a sender who may not drive the room."""

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nio import Event, SyncResponse
from structlog.testing import capture_logs

from aiagentchat import intake
from aiagentchat.bot import Bot
from aiagentchat.intake import Incoming, Malformed
from aiagentchat.settings import RoomSettings, Settings
from aiagentchat.store import Store
from aiagentchat.wire import HOPS_KEY, MARKER_KEY

ROOM, INVITED = "!served:x", "!invited:x"
ALICE, AGENT, STRANGER, BOT = "@alice:x", "@agent:x", "@stranger:x", "@bot:x"
EXAMPLES = 300

# Text as JSON can carry it: any code point, lone surrogates included (a \ud800 escape is valid JSON).
texts = st.text(st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(
    ["", "!stop", "!get ../../credentials.json", "!model", "yes", "no reason", "always", "🛑", "✅", "> q\n\nhi"]
)
ids = st.sampled_from(["$prompt", "$request", "$e1", "", "mxc://x/y"]) | texts
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible value, or any JSON at all."""
    return strategy | junk


def obj(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with any subset of these fields."""
    return st.fixed_dictionaries({}, optional=fields)


relates_to = maybe(
    obj(
        rel_type=maybe(st.sampled_from(["m.thread", "m.replace", "m.annotation", "m.reference"])),
        event_id=maybe(ids),
        key=maybe(st.sampled_from(["🛑", "✅", "❌", "🔁", "👍"])),
        is_falling_back=maybe(st.booleans()),
        **{"m.in_reply_to": maybe(obj(event_id=maybe(ids)))},
    )
)
marker = maybe(
    obj(prompt=maybe(ids), hops=maybe(st.integers(-1, 5)), final=maybe(obj(ok=maybe(st.booleans()), result=texts)))
)
message = obj(
    msgtype=maybe(st.sampled_from(["m.text", "m.notice", "m.file", "m.image", "m.emote", "m.video"])),
    body=maybe(texts),
    format=maybe(st.just("org.matrix.custom.html")),
    formatted_body=maybe(texts),
    url=maybe(st.sampled_from(["mxc://x/file", "https://example.org/x"])),
    info=maybe(obj(size=maybe(st.integers(-5, 10**9)), mimetype=maybe(st.just("image/png")))),
    file=maybe(obj(url=maybe(ids), key=maybe(obj(alg=texts, k=texts)), hashes=maybe(obj(sha256=texts)), iv=texts)),
    **{
        "m.relates_to": relates_to,
        "m.new_content": junk,
        "m.mentions": maybe(obj(user_ids=maybe(st.lists(texts)), room=maybe(st.booleans()))),
        MARKER_KEY: marker,
        HOPS_KEY: maybe(st.integers(-1, 5)),
    },
)
encrypted = obj(
    algorithm=maybe(st.just("m.megolm.v1.aes-sha2")),
    ciphertext=maybe(texts),
    sender_key=maybe(texts),
    session_id=maybe(texts),
    device_id=maybe(texts),
)
contents = {
    "m.room.message": message,
    "m.reaction": obj(**{"m.relates_to": relates_to}),
    "m.room.redaction": obj(redacts=maybe(ids), reason=junk),
    "m.room.encrypted": encrypted,
    "m.room.member": obj(membership=maybe(st.sampled_from(["join", "invite", "leave"])), displayname=junk),
    "m.room.power_levels": obj(users=maybe(st.dictionaries(texts, maybe(st.integers()))), users_default=junk),
    "m.room.create": obj(creator=maybe(ids), additional_creators=maybe(st.lists(maybe(ids))), room_version=junk),
}


@st.composite
def events(draw: st.DrawFn, senders: st.SearchStrategy[str]) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(contents)))
    event = {
        "type": kind,
        "event_id": f"$gen{draw(st.integers(0, 10**9))}",
        "sender": draw(senders),
        "origin_server_ts": draw(st.integers(0, 2**53)),
        "content": draw(contents[kind]),
    }
    if kind in ("m.room.member", "m.room.power_levels", "m.room.create") or draw(st.booleans()):
        event["state_key"] = draw(st.sampled_from(["", BOT, STRANGER]) | texts)
    if kind == "m.room.redaction":
        event["redacts"] = draw(maybe(ids))
    return event


room_events = st.lists(events(st.sampled_from([STRANGER, ALICE, AGENT, BOT])), min_size=1, max_size=6)
invite_events = st.lists(events(st.sampled_from([STRANGER, BOT])), max_size=3)


def sync(timeline: list[dict[str, Any]], invite_state: list[dict[str, Any]]) -> dict[str, Any]:
    joined = {"timeline": {"events": timeline, "limited": False, "prev_batch": "p0"}, "state": {"events": []}}
    return {
        "next_batch": "s1",
        "rooms": {"join": {ROOM: joined}, "invite": {INVITED: {"invite_state": {"events": invite_state}}}},
        "to_device": {"events": []},
    }


@settings(max_examples=EXAMPLES, deadline=None)
@given(room_events)
def test_the_intake_never_raises(timeline):
    room = RoomSettings(id=ROOM, allowed_users=[ALICE], allowed_bots=[AGENT])
    state = intake.RoomState(BOT, False, 0, _NoApprovals())
    for source in timeline:
        found = intake.read(Event.parse_event(source))
        if isinstance(found, Incoming):
            decision = intake.decide(room, found, state)
            if found.sender == STRANGER:
                assert isinstance(decision, intake.Refuse)
        else:
            assert found is None or isinstance(found, Malformed)


class _NoApprovals:
    pending = None
    answerers = [ALICE]

    def request_for(self, event_id: str) -> None:
        return None

    def closed(self, event_id: str) -> None:
        return None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(timeline=room_events, invite_state=invite_events, trust=st.sampled_from(["all", "verified"]))
def test_the_daemon_takes_any_sync_in_its_stride(tmp_path_factory, timeline, invite_state, trust):
    response = sync(timeline, invite_state)
    logs, recorded, queued = asyncio.run(_take_sync(tmp_path_factory.mktemp("bot"), response, trust))
    failures = [entry for entry in logs if entry["event"] in ("event_failed", "invite_failed")]
    assert failures == [], failures
    strangers = {event["event_id"] for event in timeline if event["sender"] == STRANGER}
    assert strangers.isdisjoint(recorded)
    assert all(prompt.sender != STRANGER for prompt in queued), queued
    assert [entry for entry in logs if entry["event"] == "invite_accepted"] == []


def test_the_event_that_once_stopped_the_daemon_is_logged_and_the_prompt_after_it_taken(tmp_path):
    poison = {"msgtype": "m.text", "body": "boom", "m.relates_to": "x"}
    timeline = [
        {"type": "m.room.message", "event_id": "$poison", "sender": STRANGER, "origin_server_ts": 1, "content": poison},
        {"type": "m.room.message", "event_id": "$p2", "sender": ALICE, "origin_server_ts": 2, "content": poison},
        {
            "type": "m.room.encrypted",
            "event_id": "$nosession",
            "sender": ALICE,
            "origin_server_ts": 3,
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": "",
                "sender_key": "k",
                "session_id": "",
                "device_id": "D",
            },
        },
        {
            "type": "m.room.message",
            "event_id": "$ok",
            "sender": ALICE,
            "origin_server_ts": 4,
            "content": {"msgtype": "m.text", "body": "fix it"},
        },
    ]
    logs, recorded, queued = asyncio.run(_take_sync(tmp_path, sync(timeline, []), "all"))
    malformed = [(entry["event_id"], entry["what"]) for entry in logs if entry["event"] == "event_malformed"]
    assert malformed == [
        ("$poison", "m.relates_to is str, not an object"),
        ("$p2", "m.relates_to is str, not an object"),
        ("$nosession", "session_id is empty"),
    ]
    assert recorded == {"$ok"}
    assert [(prompt.event_id, prompt.text) for prompt in queued] == [("$ok", "fix it")]


async def _take_sync(
    directory, response: dict[str, Any], trust: str, *, seen: bool = True
) -> tuple[list[dict[str, Any]], set[str], list]:
    """A daemon's bot (no homeserver) takes in one sync response as nio parses it: what it logged, the
    events it recorded as handled, and the prompts it queued."""
    room = RoomSettings(id=ROOM, allowed_users=[ALICE], allowed_bots=[AGENT], trust=trust, max_queued=100)
    settings = Settings(paths={"data_dir": directory}, matrix={"homeserver": "http://127.0.0.1:9", "user_id": BOT})
    store = await Store.open(directory / "db.sqlite")
    bot = Bot(settings, store)
    try:
        bot.client.restore_login(BOT, "BOTDEVICE", "token")  # an Olm machine, as after a login; no homeserver
        bot.crypto.attach()
        bot.rooms[ROOM] = room
        bot.workers[ROOM] = bot._make_worker(ROOM, room)
        if seen:
            await store.mark_room_seen(ROOM)
        parsed = SyncResponse.from_dict(response)
        assert isinstance(parsed, SyncResponse), parsed
        with capture_logs() as logs:
            await bot.client.receive_response(parsed)
            await bot._handle_sync(parsed, history=False)
        events = response["rooms"]["join"][ROOM]["timeline"]["events"]
        recorded = {event["event_id"] for event in events if await store.prompt_state(event["event_id"]) is not None}
        return logs, recorded, list(bot.workers[ROOM].inbox._queue)
    finally:
        await bot.client.close()
        bot.device_lock.release()
        await store.close()
