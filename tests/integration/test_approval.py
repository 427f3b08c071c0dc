"""Asking before acting, end to end: approval requests for Write and Bash answered by reactions and replies,
timeouts, 🔁 rules, the agent's questions, `!stop` while waiting, two rooms at once and an encrypted room
(real Synapse, real CLI, scripted model)."""

import json
from pathlib import Path
from typing import Any

import pytest

from aiagentchat.wire import MARKER_KEY as MARKER
from tests.integration.conftest import bot_text, encrypted_room, room_dir, run_ended
from tests.integration.test_conversation import command, react, shown

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

Events = list[dict[str, Any]]


def requests_for(events: Events, sender: str, prompt_id: str) -> list[dict[str, Any]]:
    """`sender`'s approval requests (and questions) about the prompt."""
    return [
        e
        for e in events
        if e["sender"] == sender
        and "approval" in (e["content"].get(MARKER) or {})
        and (e["content"].get("m.relates_to") or {}).get("m.in_reply_to", {}).get("event_id") == prompt_id
    ]


async def asked(world, room: str, prompt: str, user=None) -> tuple[str, dict[str, Any]]:
    """Post `prompt` and wait for the bot's approval request about it: (prompt id, request event)."""
    user = user or world.user
    prompt_id = await user.send_text(room, prompt)
    events = await user.wait_for(lambda ev: requests_for(ev, world.bot_id, prompt_id), timeout=60, room_id=room)
    return prompt_id, requests_for(events, world.bot_id, prompt_id)[0]


async def reply(user, room: str, target: str, text: str) -> str:
    return await user.send_text(room, text, **{"m.relates_to": {"m.in_reply_to": {"event_id": target}}})


async def ended(world, room: str, prompt_id: str, timeout: float = 60, user=None) -> str:
    events = await (user or world.user).wait_for(run_ended(prompt_id), timeout=timeout, room_id=room)
    return bot_text(events, prompt_id, status=True)


async def served_with_workdir(world, **settings: Any) -> tuple[str, Path]:
    """A new room served by a started daemon, with a working directory of its own: (room id, workdir)."""
    room = await world.room()
    workdir = world.tmp_path / "work"
    workdir.mkdir()
    await world.daemon([{"id": room, "workdir": str(workdir)} | settings]).start()
    return room, workdir


async def test_yes_once_no_with_a_reason_and_the_model_hears_the_reason(world):
    room, workdir = await served_with_workdir(world)

    target = workdir / "approved.txt"
    prompt, request = await asked(world, room, f"write {target} approved text")
    body = request["content"]["body"]
    assert "Approval needed: Write" in body and str(target) in body and "13 bytes" in body
    assert request["content"]["m.mentions"] == {"user_ids": [world.user.user_id]}
    events = await world.user.wait_for(lambda ev: shown(ev, world.bot_id, prompt) == ["✋"], room_id=room)
    assert not target.exists() and not run_ended(prompt)(events)
    await react(world.user, room, request["event_id"], "✅")
    output = await ended(world, room, prompt)
    assert f"✅ Write `{target}` allowed once by {world.user.user_id}." in output
    assert target.read_text() == "approved text"

    refused = workdir / "refused.txt"
    prompt, request = await asked(world, room, f"write {refused} never")
    await reply(world.user, room, request["event_id"], "no: use the other directory")
    output = await ended(world, room, prompt)
    assert f"❌ Write `{refused}` denied by {world.user.user_id}: use the other directory." in output
    assert not refused.exists()
    continued = [r for r in await world.model.requests(full=True) if r["continuation"]]
    denial = json.dumps(continued[-1]["body"]["messages"][-1])
    assert "The user denied this: use the other directory." in denial

    status = await command(world, room, "!status")
    assert f"Write `{refused}`: ❌ denied by {world.user.user_id} (use the other directory)" in status
    assert f"Write `{target}`: ✅ allowed once by {world.user.user_id}" in status


async def test_always_is_remembered_for_the_conversation_and_forgotten_by_a_new_one(world):
    room, workdir = await served_with_workdir(world)
    made = workdir / "made.txt"

    prompt, request = await asked(world, room, "bash touch made.txt")
    await react(world.user, room, request["event_id"], "🔁")
    output = await ended(world, room, prompt)
    assert "Bash commands starting with `touch` now run without asking in this conversation" in output
    assert made.exists()

    made.unlink()
    again = await world.user.send_text(room, "bash touch made.txt")
    await ended(world, room, again)
    assert made.exists()
    assert requests_for(world.user.room_events(room), world.bot_id, again) == []
    assert "Bash commands starting with `touch`" in await command(world, room, "!status")

    assert "new conversation" in await command(world, room, "!new")
    made.unlink()
    prompt, request = await asked(world, room, "bash touch made.txt")
    await reply(world.user, room, request["event_id"], "yes")
    await ended(world, room, prompt)
    assert made.exists()


async def test_two_rooms_wait_apart_strangers_change_nothing_and_silence_denies(world):
    other = await world.another_user()
    patient = await world.user.create_room(invite=[world.bot_id, other.user_id])
    await other.join(patient)
    hasty = await world.room()
    workdir = world.tmp_path / "work"
    rooms = [
        {"id": patient, "workdir": str(workdir / "patient")},
        {"id": hasty, "workdir": str(workdir / "hasty"), "approval_timeout_s": 3},
    ]
    for name in ("patient", "hasty"):
        (workdir / name).mkdir(parents=True)
    daemon = world.daemon(rooms)
    await daemon.start()
    kept, lost = workdir / "patient" / "kept.txt", workdir / "hasty" / "lost.txt"

    patient_prompt, patient_request = await asked(world, patient, f"write {kept} kept")
    hasty_prompt, hasty_request = await asked(world, hasty, f"write {lost} lost")
    spoof = await react(other, patient, patient_request["event_id"], "✅")
    await daemon.wait_for_log("approval_answer_ignored", event_id=spoof)

    output = await ended(world, hasty, hasty_prompt, timeout=30)
    assert f"🚫 Write `{lost}` denied: nobody answered within 3 s." in output
    assert not lost.exists()
    assert not run_ended(patient_prompt)(world.user.room_events(patient)) and not kept.exists()
    assert hasty_request["event_id"] != patient_request["event_id"]

    await react(world.user, patient, patient_request["event_id"], "✅")
    assert "allowed once" in await ended(world, patient, patient_prompt)
    assert kept.read_text() == "kept"


async def test_the_agents_question_is_answered_by_reply_and_stop_while_waiting_denies(world):
    room, workdir = await served_with_workdir(world, timeout_s=120)

    prompt, question = await asked(world, room, "ask Which colour?")
    assert "The agent asks" in question["content"]["body"] and "2. blue" in question["content"]["body"]
    await reply(world.user, room, question["event_id"], "2")
    output = await ended(world, room, prompt)
    assert "💬 Answered by" in output and '"Which colour?"="blue"' in output

    never = workdir / "never.txt"
    prompt, request = await asked(world, room, f"write {never} no")
    assert "Stopping" in await command(world, room, "!stop")
    output = await ended(world, room, prompt, timeout=15)
    assert f"denied: stopped by {world.user.user_id}." in output and f"🛑 Stopped by {world.user.user_id}" in output
    assert not never.exists()

    late = await reply(world.user, room, request["event_id"], "yes")
    events = await world.user.wait_for(
        lambda ev: any(
            (e["content"].get("m.relates_to") or {}).get("m.in_reply_to", {}).get("event_id") == late for e in ev
        ),
        room_id=room,
    )
    answer = next(
        e for e in events if (e["content"].get("m.relates_to") or {}).get("m.in_reply_to", {}).get("event_id") == late
    )
    assert "already decided" in answer["content"]["body"]


async def test_an_encrypted_reaction_approves_in_an_encrypted_room(world):
    user = await world.device()
    room, _ = await encrypted_room(world, user)
    target = room_dir(world, "rooms", room) / "secret.txt"
    prompt, request = await asked(world, room, f"write {target} encrypted approval", user=user)
    assert "Approval needed: Write" in request["content"]["body"]
    wire = await user.raw_event(room, request["event_id"])
    assert wire["type"] == "m.room.encrypted"
    content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": request["event_id"], "key": "✅"}}
    reaction = await user.send_encrypted(room, "m.reaction", content)
    assert (await user.raw_event(room, reaction))["type"] == "m.room.encrypted"
    assert "allowed once" in await ended(world, room, prompt, user=user)
    assert target.read_text() == "encrypted approval"


async def test_plain_messages_answer_only_when_all_answer_and_always_never_covers_an_interpreter(world):
    room, _ = await served_with_workdir(world)
    script = "python3 -c 'print(6 * 7)'"
    prompt, request = await asked(world, room, f"bash {script}")
    assert "🔁 never covers `python3`: its arguments can make it run any code" in request["content"]["body"]

    plain = await world.user.send_text(room, "always")
    told = await world.user.wait_for(
        lambda ev: [e for e in ev if (e["content"].get(MARKER) or {}).get("command") == plain], room_id=room
    )
    (notice,) = [e for e in told if (e["content"].get(MARKER) or {}).get("command") == plain]
    assert "react 🔁 to it, or reply `always` to it. It still waits." in notice["content"]["body"]
    question = await world.user.send_text(room, "ok, what about the tests?")  # a prompt: it waits its turn
    await react(world.user, room, request["event_id"], "🔁")
    output = await ended(world, room, prompt)
    assert f"✅ Bash `{script}` allowed once by {world.user.user_id} (🔁 never covers `python3`" in output
    assert "tool said: 42" in output
    await ended(world, room, question)

    again, request = await asked(world, room, f"bash {script}")
    await reply(world.user, room, request["event_id"], "no")
    assert f"❌ Bash `{script}` denied by {world.user.user_id}." in await ended(world, room, again)
