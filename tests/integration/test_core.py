"""The working core end to end: a real Synapse, a real nio user, the daemon as a subprocess, and the real
Claude Code CLI talking to the scripted model API."""

import json
import stat
from pathlib import Path

import pytest

from tests.integration.conftest import bot_events, bot_text, room_dir, run_ended

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_a_prompt_is_answered_with_html_and_no_mentions(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    prompt_id = await world.user.send_text(room, "say hello from the agent")
    events = await world.user.wait_for(run_ended(prompt_id), timeout=60, room_id=room)
    text = bot_text(events, prompt_id, status=True)
    assert "hello from the agent" in text
    assert "✅ Done" in text
    for event in bot_events(events, prompt_id, status=True):
        assert event["sender"] == world.bot_id
        assert event["content"]["m.mentions"] == {}
        assert event["content"]["format"] == "org.matrix.custom.html"

    data = world.tmp_path / "data"
    credentials = data / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    # the first run made the data dir 0700, and nothing in it (database, keys, rooms) lets group or others in
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "aiagentchat.db").exists() and (data / "crypto").is_dir()
    open_to_others = [str(p) for p in data.rglob("*") if stat.S_IMODE(p.lstat().st_mode) & 0o077 and not p.is_symlink()]
    assert open_to_others == []
    assert "Umask:\t0077" in Path(f"/proc/{daemon.proc.pid}/status").read_text()
    token = json.loads(credentials.read_text())["access_token"]
    log = "\n".join(daemon.raw)
    assert token not in log and world.bot_password not in log
    run_lines = [entry for entry in daemon.logs if entry.get("run_id") == prompt_id]
    assert {"run_started", "agent_started", "run_finished"} <= {entry["event"] for entry in run_lines}
    assert all(entry.get("room_id") == room for entry in run_lines)


async def test_a_second_prompt_continues_the_conversation(world):
    room = await world.room()
    await world.daemon([{"id": room}]).start()
    await world.ask(room, "say first turn")
    answer = await world.ask(room, "recall")
    assert "I remember: say first turn" in answer


async def test_after_a_restart_the_conversation_continues_and_nothing_runs_twice(world):
    room = await world.room()
    old = await world.user.send_text(room, "say sent before the bot ever looked")
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    assert daemon.logged("password_still_set") == []  # the first login needs it
    first = await world.user.send_text(room, "say before restart")
    await world.user.wait_for(run_ended(first), timeout=60, room_id=room)
    assert await daemon.stop() == 0

    while_down = await world.user.send_text(room, "say while down")
    await daemon.start()
    [still_set] = daemon.logged("password_still_set")  # the harness keeps AIAGENTCHAT_MATRIX__PASSWORD set
    assert "remove the password" in still_set["detail"] and world.bot_password not in still_set["detail"]
    await world.user.wait_for(run_ended(while_down), timeout=60, room_id=room)
    answer = await world.ask(room, "recall")
    assert "say before restart" in answer and "say while down" in answer

    events = world.user.room_events(room)
    assert bot_text(events, first, status=True).count("✅ Done") == 1
    assert bot_text(events, while_down, status=True).count("✅ Done") == 1
    assert bot_events(events, old, status=True) == []
    assert "sent before the bot ever looked" not in answer
    runs = [r["latest_user_text"] for r in await world.model.requests() if r["has_tools"] and not r["continuation"]]
    assert runs.count("say before restart") == 1


async def test_two_rooms_never_see_each_others_conversation(world):
    room_a = await world.room()
    room_b = await world.room()
    await world.daemon([{"id": room_a}, {"id": room_b}]).start()
    await world.ask(room_a, "say apple secret")
    await world.ask(room_b, "say banana secret")
    recall_a = await world.ask(room_a, "recall")
    recall_b = await world.ask(room_b, "recall")
    assert "apple" in recall_a and "banana" not in recall_a
    assert "banana" in recall_b and "apple" not in recall_b
    a_events = world.user.room_events(room_a)
    assert "banana" not in "\n".join(str(e.get("content", {}).get("body")) for e in a_events)


async def test_streamed_a_tool_call_shows_as_a_tool_line_with_its_result(world):
    room = await world.room()
    await world.daemon([{"id": room, "live_status": False}], claude={"allowed_tools": ["Bash"]}).start()
    answer = await world.ask(room, "bash echo tool-output-42")
    assert "🔧 Bash: `echo tool-output-42`" in answer
    assert "```\ntool-output-42\n```" in answer
    assert "tool said: tool-output-42" in answer


async def test_an_unlisted_tool_is_denied_and_the_room_is_told(world):
    room = await world.room()
    target = room_dir(world, "rooms", room) / "should-not-exist.txt"
    await world.daemon([{"id": room, "unlisted_tools": "deny"}]).start()
    answer = await world.ask(room, f"write {target} forbidden")
    assert "🚫 Write denied: Write is not in this room's allowed_tools" in answer
    assert "Approval needed" not in answer
    assert not target.exists()


async def test_a_hanging_agent_is_stopped_at_the_timeout(world):
    room = await world.room()
    await world.daemon([{"id": room}], claude={"timeout_s": 3, "interrupt_grace_s": 3}).start()
    answer = await world.ask(room, "hang")
    assert "⏱️ Timed out after 3 s" in answer
    assert "⏹️ Stopped." in answer
    after = await world.ask(room, "say alive again")
    assert "alive again" in after


async def test_streamed_text_comes_into_the_room_while_the_model_writes(world):
    room = await world.room()
    await world.daemon([{"id": room, "live_status": False}]).start()
    prompt_id = await world.user.send_text(room, "slow 12")
    events = await world.user.wait_for(run_ended(prompt_id), timeout=60, room_id=room)
    bodies = [e["content"]["body"] for e in bot_events(events, prompt_id)]
    assert len(bodies) >= 2
    assert "w1" in bodies[0] and "w12" not in bodies[0]
    assert "w12" in "".join(bodies)
