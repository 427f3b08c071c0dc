"""Nothing lost, nothing twice (issue 5): kill -9 at several points of a run, homeserver outages of every
kind, Synapse's default rate limit, SIGTERM with escaped children, a flood of prompts, a revoked token.
Real Synapse and the real CLI throughout; faults come from killing processes or from a misbehaving proxy."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aiagentchat.processes import start_time
from tests.harness.faulty_proxy import FaultyProxy
from tests.harness.synapse import running_synapse
from tests.integration.conftest import MARKER, World, bot_events, bot_text, run_ended
from tests.integration.test_conversation import relation_type, shown

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
CONTAINER_GRACE_S = 10.0  # what `podman stop` and `docker stop` wait before SIGKILL


def words(count: int) -> str:
    """What the scripted model streams for `slow <count>`."""
    return " ".join(f"w{i}" for i in range(1, count + 1))


def finals(events: list[dict[str, Any]], prompt_id: str) -> list[dict[str, Any]]:
    return [e for e in bot_events(events, prompt_id) if isinstance(e["content"][MARKER].get("final"), dict)]


def assert_no_duplicates(events: list[dict[str, Any]]) -> None:
    """No event id twice, and no bot output body twice (every body of a run holds different words; a live status
    may say the same twice)."""
    assert len({e["event_id"] for e in events}) == len(events)
    output = [e for e in events if MARKER in e.get("content", {}) and not e["content"][MARKER].get("status")]
    bodies = Counter(e["content"]["body"] for e in output)
    assert [body for body, seen in bodies.items() if seen > 1 and not body.startswith("✅ Done")] == []


def streamed(events: list[dict[str, Any]], prompt_id: str) -> str:
    """The agent's text of a run, without the footer."""
    return bot_text(events, prompt_id).split("\n\n✅ Done")[0].strip()


@pytest.fixture
async def proxy(synapse):
    proxy = FaultyProxy(synapse.base_url)
    await proxy.start()
    yield proxy
    await proxy.close()


def live_processes(*commands: str) -> list[int]:
    """Living processes whose command line is one of `commands`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline.strip() in commands and state != "Z":
            found.append(int(entry.name))
    return found


async def sleeps_started(world, room: str, tag: str) -> tuple[str, str]:
    """Have the room's agent start two long sleeps, one of them in a session of its own (`setsid`), and wait
    until both run; their command lines."""
    sleeps = (f"sleep {1000 + secrets.randbelow(8000)}{tag}1", f"sleep {1000 + secrets.randbelow(8000)}{tag}2")
    await world.user.send_text(room, f"bash setsid {sleeps[0]} & {sleeps[1]}")
    async with asyncio.timeout(60):
        while len(live_processes(*sleeps)) < 2:
            await asyncio.sleep(0.05)
    return sleeps


async def until_gone(*commands: str, timeout: float = 10) -> list[int]:
    """Wait until no living process runs one of `commands`; what is still alive at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := live_processes(*commands)) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return left


async def test_kill_9_mid_run_with_a_prompt_queued_then_each_is_answered_or_reported_once(world):
    await world.model.clear()
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    running = await world.user.send_text(room, "slow 40")
    await world.user.wait_for(lambda evs: bot_events(evs, running, status=True) != [], timeout=60, room_id=room)
    async with asyncio.timeout(60):  # the model is at it: in its sandbox, the agent ends with the killed daemon
        while "slow 40" not in [r["latest_user_text"] for r in await world.model.requests()]:
            await asyncio.sleep(0.05)
    queued = await world.user.send_text(room, "say queued before the crash")
    await daemon.wait_for_log("prompt_accepted", event_id=queued)
    daemon.proc.kill()
    assert await daemon.wait() == -9

    await daemon.start()

    def settled(evs: list[dict[str, Any]]) -> bool:  # each ended, with only its final reaction left on it
        return [shown(evs, world.bot_id, prompt) for prompt in (running, queued)] == [["❌"], ["✅"]]

    events = await world.user.wait_for(
        lambda evs: run_ended(running)(evs) and run_ended(queued)(evs) and settled(evs), timeout=90, room_id=room
    )
    assert len(finals(events, running)) == 1 and len(finals(events, queued)) == 1
    status, *edits = bot_events(events, running, status=True)[:-1]  # the status shown before the crash, its edits
    assert status["content"][MARKER]["status"] is True and edits
    assert {relation_type(edit) for edit in edits} == {"m.replace"}
    assert edits[-1]["content"]["m.new_content"]["body"].startswith("❌ interrupted: the daemon stopped")
    assert "⚠️ Interrupted: the daemon stopped while this prompt ran" in bot_text(events, running)
    assert finals(events, running)[0]["content"][MARKER]["final"]["ok"] is False
    assert "queued before the crash" in bot_text(events, queued)
    texts = [r["latest_user_text"] for r in await world.model.requests() if r["has_tools"]]
    assert texts.count("slow 40") == 1 and texts.count("say queued before the crash") == 1
    assert_no_duplicates(world.user.room_events(room))


async def test_kill_9_after_the_result_before_the_final_send_delivers_it_exactly_once(world, proxy):
    room = await world.room()
    daemon = world.daemon([{"id": room}], settings={"matrix": {"homeserver": proxy.base_url}})
    await daemon.start()
    await proxy.fault("lose_answers", sends_only=True)  # sends reach Synapse, the daemon never hears back
    prompt = await world.user.send_text(room, "say answered exactly once")
    await daemon.wait_for_log("run_ended", prompt=prompt, state="done", timeout=60)
    await proxy.wait_faulted("lose_answers", 3)  # the first events were posted, and retried, unanswered
    daemon.proc.kill()
    assert await daemon.wait() == -9

    await proxy.heal()
    await daemon.start()
    resumed = await daemon.wait_for_log("outbox_resumed", room_id=room)
    assert resumed["events"] >= 1
    sentinel = await world.user.send_text(room, "say sentinel after the restart")
    events = await world.user.wait_for(run_ended(sentinel), timeout=60, room_id=room)
    assert streamed(events, prompt) == "answered exactly once"
    assert len(finals(events, prompt)) == 1
    assert_no_duplicates(events)


async def test_outages_of_every_kind_mid_stream_lose_nothing_and_log_once_per_episode(world, proxy):
    room = await world.room()
    daemon = world.daemon(
        [{"id": room}],
        settings={"matrix": {"homeserver": proxy.base_url, "request_timeout_s": 2}, "output": {"max_backoff_s": 3}},
    )
    await daemon.start()
    prompt = await world.user.send_text(room, "slow 200")
    await world.user.wait_for(lambda evs: bot_events(evs, prompt, status=True) != [], timeout=60, room_id=room)
    episodes = 0
    for fault in ("bad_gateway", "refuse", "blackhole"):
        await proxy.fault(fault, sends_only=fault == "blackhole")
        episodes += 1
        await daemon.wait_for_log("send_failing", count=episodes, timeout=30)
        if fault != "refuse":
            await proxy.wait_faulted(fault, 3)  # several attempts, still one log line
        await proxy.heal()
        await daemon.wait_for_log("send_recovered", count=episodes, timeout=30)

    events = await world.user.wait_for(run_ended(prompt), timeout=90, room_id=room)
    assert streamed(events, prompt) == words(200)
    assert_no_duplicates(events)
    assert len(daemon.logged("send_failing")) == episodes == len(daemon.logged("send_recovered"))
    assert "⚠️" not in bot_text(events, prompt)


async def test_synapse_stopped_mid_stream_then_started_delivers_everything_in_order_once(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    prompt = await world.user.send_text(room, "slow 100")
    await world.user.wait_for(lambda evs: bot_events(evs, prompt, status=True) != [], timeout=60, room_id=room)
    await world.synapse.stop()
    try:
        await daemon.wait_for_log("sync_failing", timeout=60)
        await daemon.wait_for_log("run_ended", prompt=prompt, timeout=60)  # all output waits in the outbox
    finally:
        await world.synapse.start()
    events = await world.user.wait_for(run_ended(prompt), timeout=120, room_id=room)
    assert streamed(events, prompt) == words(100)
    assert_no_duplicates(events)
    await daemon.wait_for_log("sync_recovered", timeout=60)


async def test_sigterm_mid_run_tells_the_room_and_leaves_no_process_behind(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}], claude={"allowed_tools": ["Bash"]})
    await daemon.start()
    sleeps = (f"sleep {1000 + secrets.randbelow(8000)}1", f"sleep {1000 + secrets.randbelow(8000)}2")
    prompt = await world.user.send_text(room, f"bash setsid {sleeps[0]} & {sleeps[1]}")
    async with asyncio.timeout(60):
        while len(live_processes(*sleeps)) < 2:
            await asyncio.sleep(0.05)
    assert await daemon.stop(timeout=9) == 0  # the agent's kill and the delivery share the 5 s default deadline
    assert await until_gone(*sleeps, timeout=5) == []
    events = await world.user.wait_for(run_ended(prompt), timeout=30, room_id=room)
    assert "⚠️ Interrupted: the daemon is shutting down." in bot_text(events, prompt)
    assert finals(events, prompt)[0]["content"][MARKER]["final"]["result"] == "interrupted: the daemon is shutting down"


async def test_a_restart_ends_the_agent_a_killed_daemon_left_running(world):
    room = await world.room()  # unsandboxed: in its sandbox the agent ends with the daemon (test_wall.py)
    daemon = world.daemon([{"id": room}], claude={"allowed_tools": ["Bash"], "sandbox": "off"})
    await daemon.start()
    sleeps = await sleeps_started(world, room, "3")
    agent_pid = daemon.logged("agent_started")[-1]["pid"]
    daemon.proc.kill()
    await daemon.wait()
    assert start_time(agent_pid) is not None and len(live_processes(*sleeps)) == 2  # orphaned, still running

    await daemon.start()
    killed = daemon.logged("leftover_agent_killed")
    assert [entry["pid"] for entry in killed] == [agent_pid]
    assert await until_gone(*sleeps, timeout=5) == []


async def test_a_flood_beyond_the_inbox_bound_gets_a_busy_reply(world):
    room = await world.room()
    daemon = world.daemon([{"id": room, "max_queued": 2}])
    await daemon.start()
    running = await world.user.send_text(room, "slow 30")
    await daemon.wait_for_log("run_started", run_id=running)
    flood = [await world.user.send_text(room, f"say flood {i}") for i in range(5)]
    events = await world.user.wait_for(
        lambda evs: all(run_ended(p)(evs) for p in [running, *flood]), timeout=120, room_id=room
    )
    for prompt in flood[:2]:
        assert f"flood {flood.index(prompt)}" in bot_text(events, prompt)
    for prompt in flood[2:]:
        assert bot_text(events, prompt) == "⛔ Not run: busy: 2 prompts are queued in this room; send it again later."
        assert finals(events, prompt)[0]["content"][MARKER]["final"]["ok"] is False
    assert [e["event_id"] for e in daemon.logged("prompt_refused_busy")] == flood[2:]
    assert [e["run_id"] for e in daemon.logged("run_started")] == [running, *flood[:2]]


async def test_a_revoked_access_token_stops_the_daemon_with_its_own_exit_code(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    token = json.loads((world.tmp_path / "data" / "credentials.json").read_text())["access_token"]
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{world.synapse.base_url}/_matrix/client/v3/logout", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200
    assert await daemon.wait(timeout=60) == 5
    (entry,) = daemon.logged("token_revoked")
    assert "M_UNKNOWN_TOKEN" in entry["reason"] and "credentials.json" in entry["reason"]
    assert token not in "\n".join(daemon.raw)


@pytest.fixture(scope="module")
async def limited_synapse():
    async with running_synapse(default_rc_message=True) as server:
        yield server


@pytest.fixture
async def limited_world(limited_synapse, model, tmp_path):
    """A test's world on the Synapse with the default message rate limit."""
    world = World(limited_synapse, model, tmp_path)
    await world.setup()
    yield world
    await world.close()


async def test_a_minute_of_output_under_the_default_rate_limit_arrives_whole_without_errors(limited_world):
    world = limited_world
    room = await world.room()
    daemon = world.daemon([{"id": room}], claude={"timeout_s": 150}, settings={"output": {"flush_interval_s": 2.0}})
    await daemon.start()
    prompt = await world.user.send_text(room, "slow 300")
    events = await world.user.wait_for(run_ended(prompt), timeout=240, room_id=room)
    text = bot_text(events, prompt)
    assert streamed(events, prompt) == words(300)
    assert not re.search("⚠️|❌", text)
    assert_no_duplicates(events)
    assert daemon.logged("rate_limited"), "Synapse's default rc_message was met"


async def test_sigterm_while_output_waits_behind_the_rate_limit_exits_within_the_grace_and_keeps_the_output(
    limited_world,
):
    world = limited_world
    room = await world.room()
    daemon = world.daemon([{"id": room, "live_status": False}], claude={"timeout_s": 150})
    await daemon.start()
    prompt = await world.user.send_text(room, "slow 200")
    await daemon.wait_for_log("rate_limited", room_id=room, timeout=60)
    started = time.monotonic()
    code = await daemon.stop(timeout=30)
    took = time.monotonic() - started
    assert code == 0
    assert took < CONTAINER_GRACE_S, f"SIGTERM to exit took {took:.1f} s"
    (deadline,) = daemon.logged("shutdown_deadline")
    assert deadline["undelivered_events"] >= 1 and deadline["rooms_still_running"] == []

    await daemon.start()
    resumed = await daemon.wait_for_log("outbox_resumed", room_id=room)
    assert 1 <= resumed["events"] <= deadline["undelivered_events"]
    events = await world.user.wait_for(run_ended(prompt), timeout=180, room_id=room)
    before, notice, _ = bot_text(events, prompt).partition("⚠️ Interrupted: the daemon is shutting down.")
    assert notice, bot_text(events, prompt)
    assert before.split() == words(len(before.split())).split() != []  # every word up to the stop, in order
    (final,) = finals(events, prompt)
    assert final["content"][MARKER]["final"]["result"] == "interrupted: the daemon is shutting down"
    assert_no_duplicates(events)
