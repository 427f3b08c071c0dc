"""Agents talking to agents through Matrix: a handoff with cchat, and the hop limit between two daemons."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.integration.conftest import MARKER, bot_events, bot_text, run_ended
from tests.integration.daemon import REPO
from tests.integration.test_cchat import Cchat

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

DEFAULT_PASSTHROUGH = ["PATH", "HOME", "LANG", "ANTHROPIC_*", "CLAUDE_CODE_*", "DISABLE_*"]


def runs(daemon) -> list[str]:
    return [entry["run_id"] for entry in daemon.logs if entry.get("event") == "run_started"]


async def test_an_agent_hands_work_to_another_room_with_cchat_and_gets_the_answer(world, tmp_path):
    cli = Cchat(tmp_path / "agent-cchat")
    await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    room_a, room_b = await world.room(), await world.room()
    # room A's sandbox holds cchat (this python and the repository, read-only) and cchat's own files
    python_and_cchat = [sys.base_prefix, str(REPO)]
    await world.daemon(
        [
            {
                "id": room_a,
                "allowed_tools": ["Bash"],
                "sandbox_readonly": python_and_cchat,
                "sandbox_writable": [str(cli.root / "config")],
            },
            {"id": room_b},
        ],
        claude={"env_passthrough": [*DEFAULT_PASSTHROUGH, "CCHAT_CONFIG_DIR"], "timeout_s": 120},
        env={"CCHAT_CONFIG_DIR": str(cli.root / "config")},
    ).start()

    command = (
        f"{sys.executable} -m aiagentchat.cchat send {room_b} 'say handed over' --wait --json --timeout 90 "
        f"--bot {world.bot_id}"
    )
    answer = await world.ask(room_a, f"bash {command}", timeout=150)

    handed = [e for e in world.user.room_events(room_b) if e["content"].get("body") == "say handed over"]
    assert [e["content"]["org.aiagentchat.hops"] for e in handed] == [1]
    assert "handed over" in bot_text(world.user.room_events(room_b), handed[0]["event_id"])
    said = answer[answer.index("tool said: ") :]
    assert '"ok": true, "result": "handed over"' in said
    assert "✅ Done" in answer


async def test_two_daemons_allowed_in_each_other_stop_at_the_hop_limit(world):
    second = await world.another_bot()
    room = await world.user.create_room(invite=[world.bot_id, second.user_id])
    # the first streams its output (each piece before the final answer must be refused as a prompt), the other
    # shows a live status (its status message and edits must never be taken as one)
    first = world.daemon([{"id": room, "allowed_bots": [second.user_id], "live_status": False}])
    other = world.daemon([{"id": room, "allowed_users": [], "allowed_bots": [world.bot_id]}], bot=second)
    await first.start()
    await other.start()

    prompt = await world.user.send_text(room, "say ping")
    await other.wait_for_log("prompt_ignored", timeout=120, reason="hop limit 3 reached")
    events = await world.user.wait_for(lambda evs: len(finals(evs)) == 3, timeout=30, room_id=room)
    assert await first.stop() == 0 and await other.stop() == 0

    one, two, three = finals(events)
    assert [(e["sender"], e["content"][MARKER]["prompt"], e["content"][MARKER]["hops"]) for e in (one, two, three)] == [
        (world.bot_id, prompt, 1),
        (second.user_id, one["event_id"], 2),
        (world.bot_id, two["event_id"], 3),
    ]
    assert runs(first) == [prompt, two["event_id"]] and runs(other) == [one["event_id"]]
    refused = {e["event_id"] for e in other.logs if e.get("reason") == "not the successful final answer of an agent's run"}
    streamed = {e["event_id"] for e in bot_events(events, prompt)} - {one["event_id"]}
    assert streamed and streamed <= refused


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that end a run, in order."""
    return [e for e in events if isinstance((e["content"].get(MARKER) or {}).get("final"), dict)]


async def test_an_agents_output_is_never_a_prompt_unless_its_bot_is_allowed(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    final = {"ok": True, "result": "say injected", "duration_ms": 1, "session_id": "s"}
    marked = await world.user.send_text(room, "say injected", **{MARKER: {"prompt": "$x", "hops": 1, "final": final}})
    await daemon.wait_for_log(
        "prompt_ignored", event_id=marked, reason="output of an agent that is not in allowed_bots"
    )
    plain = await world.user.send_text(room, "say after")
    events = await world.user.wait_for(run_ended(plain), timeout=60, room_id=room)
    assert runs(daemon) == [plain]
    assert bot_events(events, marked, status=True) == []
