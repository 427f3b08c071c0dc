"""Threads, end to end: with `reply_mode = "thread"` a run's output, its approval requests and the answers to
commands stay in the prompt's thread; with `session_scope = "thread"` each thread is its own conversation
(real Synapse, real CLI, scripted model)."""

from typing import Any

import pytest

from tests.integration.conftest import MARKER, bot_events, run_ended
from tests.integration.test_approval import asked, ended, served_with_workdir
from tests.integration.test_conversation import replies

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def in_thread(root: str, latest: str, *, fallback: bool = True) -> dict[str, Any]:
    return {
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": fallback,
            "m.in_reply_to": {"event_id": latest},
        }
    }


async def test_a_runs_output_its_approval_request_and_command_answers_stay_in_the_prompts_thread(world):
    room, workdir = await served_with_workdir(world, reply_mode="thread")

    first = await world.user.send_text(room, "slow 20")  # 4 s: a live status, edited, then the answer
    events = await world.user.wait_for(run_ended(first), timeout=60, room_id=room)
    output = bot_events(events, first, status=True)
    edits = [e for e in output if e["content"]["m.relates_to"].get("rel_type") == "m.replace"]
    status, answer = [e for e in output if e not in edits]
    assert status["content"][MARKER]["status"] is True and "w20" in answer["content"]["body"]
    for event in (status, answer):
        relation = event["content"]["m.relates_to"]
        assert relation == {"rel_type": "m.thread", "event_id": first, "is_falling_back": False,
                            "m.in_reply_to": {"event_id": first}}  # fmt: skip
    assert edits and {e["content"]["m.relates_to"]["event_id"] for e in edits} == {status["event_id"]}

    target = workdir / "threaded.txt"
    prompt, request = await asked(world, room, f"write {target} in a thread")
    assert request["content"]["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": prompt,
        "is_falling_back": False,
        "m.in_reply_to": {"event_id": prompt},
    }
    await world.user.send_text(room, "yes", **in_thread(prompt, request["event_id"]))  # typed in the thread
    assert "allowed once" in await ended(world, room, prompt)
    assert target.read_text() == "in a thread"

    status = await world.user.send_text(room, "!status", **in_thread(first, first))
    events = await world.user.wait_for(lambda ev: replies(ev, world.bot_id, status), timeout=30, room_id=room)
    (answer,) = replies(events, world.bot_id, status)
    assert answer["content"]["m.relates_to"]["event_id"] == first and "Running:** nothing" in answer["content"]["body"]


async def test_each_thread_is_its_own_conversation(world):
    room = await world.room()
    await world.daemon([{"id": room, "reply_mode": "thread", "session_scope": "thread"}]).start()
    apple = await world.user.send_text(room, "say remember apple")
    await ended(world, room, apple)
    banana = await world.user.send_text(room, "say remember banana")
    await ended(world, room, banana)

    in_apple = await world.user.send_text(room, "recall", **in_thread(apple, apple))
    recalled = await ended(world, room, in_apple)
    assert "say remember apple" in recalled and "banana" not in recalled
    in_banana = await world.user.send_text(room, "recall", **in_thread(banana, banana))
    recalled = await ended(world, room, in_banana)
    assert "say remember banana" in recalled and "apple" not in recalled
    top_level = await world.user.send_text(room, "recall")
    recalled = await ended(world, room, top_level)
    assert "apple" not in recalled and "banana" not in recalled
    events = world.user.room_events(room)
    assert {e["content"]["m.relates_to"]["event_id"] for e in bot_events(events, in_apple)} == {apple}
    assert {e["content"]["m.relates_to"]["event_id"] for e in bot_events(events, top_level)} == {top_level}
