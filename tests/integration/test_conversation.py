"""The conversation around a run, end to end: status reactions, 🛑, commands, files and the daily budget
(real Synapse, real CLI, scripted model)."""

import base64
import io
import json
import secrets
from typing import Any

import pytest
from nio import UploadResponse

from aiagentchat.commands import usd
from aiagentchat.wire import MARKER_KEY as MARKER
from tests.integration.conftest import bot_events, bot_text, room_dir, run_ended

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

Events = list[dict[str, Any]]


def reactions(events: Events, sender: str, target: str) -> list[tuple[str, str]]:
    """(event id, key) of `sender`'s reactions to `target`, in order."""
    return [
        (e["event_id"], e["content"]["m.relates_to"]["key"])
        for e in events
        if e["type"] == "m.reaction"
        and e["sender"] == sender
        and e["content"].get("m.relates_to", {}).get("event_id") == target
    ]


def redacted(events: Events, sender: str) -> set[str]:
    return {
        e.get("redacts") or e["content"].get("redacts")
        for e in events
        if e["type"] == "m.room.redaction" and e["sender"] == sender
    }


def shown(events: Events, sender: str, target: str) -> list[str]:
    """The keys of `sender`'s reactions to `target` that are still there."""
    gone = redacted(events, sender)
    return [key for event_id, key in reactions(events, sender, target) if event_id not in gone]


def replies(events: Events, sender: str, event_id: str) -> list[dict[str, Any]]:
    """`sender`'s events in reply to `event_id`."""
    return [
        e
        for e in events
        if e["sender"] == sender
        and (e["content"].get("m.relates_to") or {}).get("m.in_reply_to", {}).get("event_id") == event_id
    ]


async def reply_to(world, room: str, event_id: str, timeout: float = 30) -> dict[str, Any]:
    events = await world.user.wait_for(lambda ev: replies(ev, world.bot_id, event_id), timeout=timeout, room_id=room)
    return replies(events, world.bot_id, event_id)[0]


async def command(world, room: str, text: str) -> str:
    """Send a command; the body of the bot's reply."""
    sent = await world.user.send_text(room, text)
    return (await reply_to(world, room, sent))["content"]["body"]


async def react(user, room: str, target: str, key: str) -> str:
    content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}
    return await user.send(room, "m.reaction", content)


async def running(world, room: str, prompt: str) -> str:
    """Post `prompt` and wait until the bot's first output for it is in the room."""
    prompt_id = await world.user.send_text(room, prompt)
    await world.user.wait_for(lambda ev: bot_text(ev, prompt_id, status=True), timeout=60, room_id=room)
    return prompt_id


async def test_each_prompt_shows_one_status_reaction_ending_in_a_check_or_a_cross(world):
    room = await world.room()
    await world.daemon([{"id": room}]).start()
    slow = await world.user.send_text(room, "slow 8")
    queued = await world.user.send_text(room, "say second")
    failing = await world.user.send_text(room, "fail400")
    bot = world.bot_id

    def settled(events: Events) -> bool:
        return [shown(events, bot, p) for p in (slow, queued, failing)] == [["✅"], ["✅"], ["❌"]]

    events = await world.user.wait_for(settled, timeout=90, room_id=room)
    assert [key for _, key in reactions(events, bot, slow)] == ["✅"]
    assert [key for _, key in reactions(events, bot, queued)] == ["⏳", "✅"]  # ⏳ only while it waited
    assert [key for _, key in reactions(events, bot, failing)] == ["⏳", "❌"]
    assert all(e["type"] != "m.reaction" or "org.aiagentchat" not in e["content"] for e in events)


async def test_a_warm_one_line_answer_costs_two_events_and_the_bot_reads_and_types_for_free(world):
    room = await world.room()
    await world.daemon([{"id": room}]).start()
    bot = world.bot_id
    for prompt in ("say warming up", "slow 8", "say hello"):
        prompt_id = await world.user.send_text(room, prompt)
        events = await world.user.wait_for(lambda ev: shown(ev, bot, prompt_id) == ["✅"], timeout=60, room_id=room)
    from_bot = [e for e in world.user.room_events(room, after=prompt_id) if e["sender"] == bot]
    assert [e["type"] for e in from_bot] == ["m.room.message", "m.reaction"]  # the answer and ✅, nothing else
    assert from_bot[0]["content"]["body"].startswith("hello\n\n✅ Done") and MARKER in from_bot[0]["content"]
    assert not redacted(events, bot)

    def typing() -> list[bool]:
        return [bot in sign["user_ids"] for sign in world.user.signs if sign["type"] == "m.typing"]

    await world.user.wait_for(lambda _: True in typing() and typing()[-1] is False, timeout=40, room_id=room)
    read = {sign["event_id"] for sign in world.user.signs if sign["type"] == "m.receipt" and sign["user_id"] == bot}
    assert prompt_id in read


async def test_stop_reactions_stop_a_running_prompt_and_drop_a_queued_one_from_allowed_users_only(world):
    other = await world.another_user()
    room = await world.user.create_room(invite=[world.bot_id, other.user_id])
    await other.join(room)
    daemon = world.daemon([{"id": room}], claude={"timeout_s": 120})
    await daemon.start()
    long_run = await running(world, room, "slow 100")
    waiting = await world.user.send_text(room, "say never run")

    spoof = await react(other, room, long_run, "🛑")
    await daemon.wait_for_log("prompt_ignored", event_id=spoof, reason="sender not in allowed_users")
    await react(world.user, room, waiting, "🛑")
    await react(world.user, room, long_run, "🛑")
    # `slow 100` streams for 20 s; the issue asks for the stop within 2 s (measured: 0.15-0.18 s)
    events = await world.user.wait_for(run_ended(long_run), timeout=2, room_id=room)
    assert f"🛑 Stopped by {world.user.user_id}" in bot_text(events, long_run)
    assert "w100" not in bot_text(events, long_run)
    events = await world.user.wait_for(run_ended(waiting), timeout=30, room_id=room)
    assert bot_text(events, waiting) == f"🛑 Dropped by {world.user.user_id} before it ran."
    assert "say never run" not in [r["latest_user_text"] for r in await world.model.requests()]


async def test_a_conversation_the_cli_no_longer_has_is_started_anew_and_the_room_told_once(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    tag = secrets.token_hex(3)
    assert "✅ Done" in await world.ask(room, f"say before the loss {tag}")
    assert await daemon.stop() == 0
    # the CLI keeps a conversation in ~/.claude/projects/ (the room's own home)<working directory, "/" as "-">/<session id>.jsonl
    transcripts = list((room_dir(world, "homes", room) / ".claude" / "projects").glob("*/*.jsonl"))
    assert len(transcripts) == 1
    transcripts[0].unlink()

    await daemon.start()
    first = await world.user.send_text(room, f"say after the loss {tag}")
    await world.user.wait_for(run_ended(first), timeout=60, room_id=room)
    second = await world.user.send_text(room, f"recall {tag}")
    events = await world.user.wait_for(run_ended(second), timeout=60, room_id=room)
    for prompt in (first, second):
        final = next(marker["final"] for e in bot_events(events, prompt) if "final" in (marker := e["content"][MARKER]))
        assert final["ok"] is True and "✅ Done" in bot_text(events, prompt, status=True)
    gone = "ℹ️ The earlier conversation is gone; starting a new one."
    assert bot_text(events, first).count(gone) == 1 and gone not in bot_text(events, second, status=True)
    await daemon.wait_for_log("conversation_gone", run_id=first)
    # the model saw the recall in the new conversation, after the prompt that started it
    assert bot_text(events, second).split("\n")[0] == f"I remember: say after the loss {tag}"


async def test_commands_answer_at_once_even_while_a_prompt_runs(world):
    room = await world.room()
    rooms = [{"id": room, "aliases": {"t": "say alias worked"}, "allowed_models": ["claude-test-model"]}]
    await world.daemon(rooms, claude={"timeout_s": 120}).start()

    help_text = await command(world, room, "!help")
    assert "`!status`" in help_text and "`!t` → say alias worked" in help_text
    unknown = await command(world, room, "!frobnicate now")
    assert "Unknown command `!frobnicate`" in unknown and "`!status`" in unknown
    assert "alias worked" in await world.ask(room, "!t")

    long_run = await running(world, room, "slow 100")
    status = await command(world, room, "!status")
    assert "Running:** “slow 100”" in status and "Queued:** 0" in status and "Session:** `" in status
    assert not run_ended(long_run)(world.user.room_events(room))  # answered while the run goes on
    assert "Stopping" in await command(world, room, "!stop")
    events = await world.user.wait_for(run_ended(long_run), timeout=6, room_id=room)
    assert f"🛑 Stopped by {world.user.user_id}" in bot_text(events, long_run)
    assert "Nothing is running" in await command(world, room, "!stop")

    assert "not allowed in this room" in await command(world, room, "!model claude-other")
    assert "`claude-test-model`" in await command(world, room, "!model claude-test-model")
    await world.ask(room, "say remember apple")
    assert "say remember apple" in await world.ask(room, "recall")
    assert "new conversation" in await command(world, room, "!new")
    after = await world.ask(room, "recall")
    assert "apple" not in after and "I remember:" in after
    bodies = [r["body"] for r in await world.model.requests(full=True) if r["has_tools"]]
    assert bodies[-1]["model"] == "claude-test-model"


async def upload(user, room: str, name: str, data: bytes) -> str:
    response, _ = await user.client.upload(io.BytesIO(data), "text/plain", name, filesize=len(data))
    assert isinstance(response, UploadResponse), response
    content = {
        "msgtype": "m.file",
        "body": name,
        "url": response.content_uri,
        "info": {"mimetype": "text/plain", "size": len(data)},
    }
    return await user.send(room, "m.room.message", content)


async def test_files_go_into_the_working_directory_and_come_back_with_get(world):
    room = await world.room()
    workdir = world.tmp_path / "work"
    workdir.mkdir()
    await world.daemon([{"id": room, "workdir": str(workdir), "allowed_tools": ["Bash"]}]).start()

    first = await upload(world.user, room, "notes.txt", b"the secret word is mango\n")
    assert "Saved as `uploads/notes.txt`" in (await reply_to(world, room, first))["content"]["body"]
    second = await upload(world.user, room, "../notes.txt", b"second\n")
    assert "Saved as `uploads/notes-1.txt`" in (await reply_to(world, room, second))["content"]["body"]
    assert (workdir / "uploads" / "notes.txt").read_bytes() == b"the secret word is mango\n"

    answer = await world.ask(room, "bash cat uploads/notes.txt")
    assert "the secret word is mango" in answer
    told = [r for r in await world.model.requests(full=True) if r["latest_user_text"] == "bash cat uploads/notes.txt"]
    assert "uploads/notes.txt" in json.dumps(told[0]["body"]["messages"]) and "uploads/notes-1.txt" in json.dumps(
        told[0]["body"]["messages"]
    )

    (workdir / "report.md").write_text("# Report\n")
    get = await world.user.send_text(room, "!get report.md")
    events = await world.user.wait_for(
        lambda ev: any(e["content"].get("msgtype") == "m.file" for e in replies(ev, world.bot_id, get)),
        timeout=30,
        room_id=room,
    )
    sent = next(e for e in replies(events, world.bot_id, get) if e["content"].get("msgtype") == "m.file")
    assert sent["content"]["filename"] == "report.md"
    downloaded = await world.user.client.download(mxc=sent["content"]["url"])
    assert downloaded.body == b"# Report\n"
    assert "outside the working directory" in await command(world, room, "!get ../../etc/passwd")


PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


async def test_an_uploaded_image_is_shown_to_the_agent_with_the_next_prompt_even_after_a_restart(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    response, _ = await world.user.client.upload(io.BytesIO(PIXEL), "image/png", "dot.png", filesize=len(PIXEL))
    assert isinstance(response, UploadResponse), response
    content = {"msgtype": "m.image", "body": "dot.png", "url": response.content_uri,
               "info": {"mimetype": "image/png", "size": len(PIXEL)}}  # fmt: skip
    image = await world.user.send(room, "m.room.message", content)
    assert "the next prompt shows it to the agent" in (await reply_to(world, room, image))["content"]["body"]
    await daemon.stop()
    await daemon.start()

    await world.ask(room, "say seen")
    (request,) = [r for r in await world.model.requests(full=True) if r["latest_user_text"] == "say seen"]
    blocks = [block for message in request["body"]["messages"] for block in message.get("content") or []]
    images = [block for block in blocks if isinstance(block, dict) and block.get("type") == "image"]
    assert [(i["source"]["media_type"], base64.b64decode(i["source"]["data"])) for i in images] == [
        ("image/png", PIXEL)
    ]
    assert "uploads/dot.png (70 bytes, shown below)" in json.dumps(request["body"]["messages"])
    await world.ask(room, "say again")
    (later,) = [r for r in await world.model.requests(full=True) if r["latest_user_text"] == "say again"]
    assert json.dumps(later["body"]["messages"]).count('"type": "image"') == 1  # told once, kept in the history


async def test_a_room_over_its_daily_budget_refuses_prompts_until_the_next_day(world):
    room = await world.room()
    daemon = world.daemon([{"id": room, "budget_usd_per_day": 0.00005}])
    await daemon.start()
    first = await world.user.send_text(room, "say within budget")
    events = await world.user.wait_for(run_ended(first), timeout=60, room_id=room)
    final = next(marker["final"] for e in events if "final" in (marker := e["content"].get(MARKER) or {}))
    cost = float(final["cost_usd"])  # markers carry numbers as strings (no floats in Matrix events)
    assert final["ok"] is True and cost > 0

    refused = await world.user.send_text(room, "say over budget")
    events = await world.user.wait_for(run_ended(refused), timeout=30, room_id=room)
    assert f"budget of $0.000050 per day is spent ({usd(cost)} today)" in bot_text(events, refused)
    assert "after 00:00 UTC" in bot_text(events, refused)
    assert "say over budget" not in [r["latest_user_text"] for r in await world.model.requests()]
    assert "Prompts are refused" in await command(world, room, "!status")
    assert f"in all: {usd(cost)}" in await command(world, room, "!cost")
    await daemon.wait_for_log("prompt_refused_budget", event_id=refused)


def relation_type(event: dict[str, Any]) -> str | None:
    return (event["content"].get("m.relates_to") or {}).get("rel_type")


async def test_a_live_status_shows_the_model_retries_while_the_model_api_is_overloaded(world):
    room = await world.room()
    await world.daemon([{"id": room}]).start()
    text = f"overloaded 2 back after retries {secrets.token_hex(3)}"  # 529 twice, then the answer
    prompt = await world.user.send_text(room, text)
    events = await world.user.wait_for(run_ended(prompt), timeout=90, room_id=room)
    events = bot_events(events, prompt, status=True)
    statuses = [e["content"].get("m.new_content", e["content"])["body"] for e in events[:-1]]
    assert any("⏳ Model API 529; retry " in body for body in statuses), statuses
    assert events[-1]["content"]["body"].startswith(text.split(maxsplit=2)[2])
    assert [r["latest_user_text"] for r in await world.model.requests() if r["has_tools"]].count(text) == 3


async def test_a_live_status_is_edited_in_place_and_the_answer_is_one_new_reply(world):
    room = await world.room()
    await world.daemon([{"id": room, "allowed_tools": ["Bash"]}]).start()  # live status is the default

    prompt = await world.user.send_text(room, "slow 20")  # 20 words over 4 s
    events = bot_events(await world.user.wait_for(run_ended(prompt), timeout=60, room_id=room), prompt, status=True)
    (status,) = [e for e in events if e["content"][MARKER].get("status") and relation_type(e) != "m.replace"]
    edits = [e for e in events if relation_type(e) == "m.replace"]
    answers = [e for e in events if e not in edits and e is not status]
    assert len(events) == 1 + len(edits) + 1 and len(edits) >= 3
    assert status["content"]["msgtype"] == "m.notice" and "Working" in status["content"]["body"]
    assert status["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": prompt}}
    assert {e["content"]["m.relates_to"]["event_id"] for e in edits} == {status["event_id"]}
    assert edits[-1]["content"]["m.new_content"]["body"].startswith("✅ Done · ")
    (answer,) = answers
    assert answer["content"]["msgtype"] == "m.text" and answer["content"]["body"] == " ".join(
        f"w{n}" for n in range(1, 21)
    )
    assert answer["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": prompt}}
    assert answer["content"][MARKER]["final"]["ok"] is True

    prompt = await world.user.send_text(room, "bash echo live-tool")
    events = bot_events(await world.user.wait_for(run_ended(prompt), timeout=60, room_id=room), prompt, status=True)
    answer = next(e for e in events if "final" in e["content"][MARKER])
    assert "tool said: live-tool" in answer["content"]["body"]
    # the tool line is in the status (or, for a run over before its status was due, under the answer)
    assert "🔧 Bash: `echo live-tool`" in "\n".join(e["content"]["body"] for e in events)
    assert "live-tool\n```" not in answer["content"]["body"]  # the tool's output stays out of the room
