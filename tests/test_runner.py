"""The room worker against a small fake CLI: turns, the tool seam, timeouts, crashes, environment."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from aiagentchat.approvals import RoomToolPolicy
from aiagentchat.batcher import Begin, Block, EndOfRun, Text
from aiagentchat.guard import ToolGuard
from aiagentchat.runner import RoomWorker, agent_environment
from aiagentchat.settings import ClaudeSettings
from aiagentchat.store import OutboxRow, Prompt
from aiagentchat.worktrees import Worktrees
from tests.harness.git import make_repository

pytestmark = pytest.mark.anyio
FAKE = Path(__file__).parent / "fakes" / "fake_claude.py"


class Recorder:
    """Collects what the worker hands to its batcher; runs end with EndOfRun."""

    def __init__(self) -> None:
        self.items: list = []
        self.ended: asyncio.Queue[str] = asyncio.Queue()
        self.finals: dict[str, dict] = {}
        self.states: dict[str, str] = {}

    async def put(self, item) -> None:
        self.items.append(item)
        if isinstance(item, EndOfRun):
            self.finals[item.prompt_id] = item.final
            self.states[item.prompt_id] = item.state
            self.ended.put_nowait(item.prompt_id)

    def output(self, prompt_id: str) -> str:
        parts = []
        for item in self.items:
            if isinstance(item, Text) and item.prompt_id == prompt_id:
                parts.append(item.text)
            elif isinstance(item, Block) and item.prompt_id == prompt_id:
                parts.append("\n" + item.markdown + "\n")
        return "".join(parts)


def fake_claude(tmp_path: Path, **overrides) -> ClaudeSettings:
    script = tmp_path / "claude"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    script.chmod(0o755)
    values = {"binary": str(script), "timeout_s": 5, "interrupt_grace_s": 1,
              "env_passthrough": ["PATH", "FAKE_*"]}
    return ClaudeSettings(**(values | overrides))


async def run_prompts(worker: RoomWorker, recorder: Recorder, *texts: str, deadline: float = 20) -> list[str]:
    ids = []
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        for number, text in enumerate(texts):
            event_id = f"$e{number}"
            ids.append(event_id)
            await worker.inbox.put(Prompt("!room:x", event_id, "@u:x", text))
            async with asyncio.timeout(deadline):
                assert await recorder.ended.get() == event_id
        task.cancel()
    return ids


def make_worker(tmp_path, store, claude) -> tuple[RoomWorker, Recorder]:
    recorder = Recorder()
    guard = ToolGuard(tmp_path / "data", tmp_path / "work")
    worker = RoomWorker("!room:x", claude, tmp_path / "work", store, recorder, RoomToolPolicy(claude), guard)
    return worker, recorder


async def test_prompts_are_answered_in_one_live_process_and_session_is_stored(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    first, second = await run_prompts(worker, recorder, "say hello there", "say again")
    assert recorder.output(first).startswith("hello there")
    assert "✅ Done · 1.2 s · 1 turn · $0.0012" in recorder.output(first)
    assert recorder.output(second).startswith("again")
    assert await store.session_id("!room:x") is not None


async def test_streamed_text_is_not_repeated_by_the_final_message(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    (prompt,) = await run_prompts(worker, recorder, "say one two three")
    assert recorder.output(prompt).count("one two three") == 1


async def test_prompt_never_reaches_the_argument_list(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    (prompt,) = await run_prompts(worker, recorder, "argv")
    argv = json.loads(recorder.output(prompt).split("\n")[0])
    assert "--input-format" in argv and "argv" not in argv


async def test_agent_environment_is_only_the_passthrough(tmp_path, store, monkeypatch):
    monkeypatch.setenv("AIAGENTCHAT_MATRIX__PASSWORD", "hunter2")
    monkeypatch.setenv("FAKE_VISIBLE", "1")
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    (prompt,) = await run_prompts(worker, recorder, "env")
    names = recorder.output(prompt).split("\n")[0].split()
    assert "FAKE_VISIBLE" in names
    assert "AIAGENTCHAT_MATRIX__PASSWORD" not in names
    assert "HOME" not in names


def test_environment_patterns():
    env = {"PATH": "/bin", "ANTHROPIC_API_KEY": "k", "CLAUDE_CODE_X": "1", "SECRET": "s", "HOME": "/h"}
    assert agent_environment(["PATH", "HOME", "ANTHROPIC_*", "CLAUDE_CODE_*"], env) == {
        "PATH": "/bin", "ANTHROPIC_API_KEY": "k", "CLAUDE_CODE_X": "1", "HOME": "/h"}


async def test_unlisted_tool_is_denied_with_a_reason_shown_and_sent_to_the_agent(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path, allowed_tools=["Read"]))
    denied, allowed = await run_prompts(worker, recorder, "tool Write", "tool Read")
    assert "🚫 Write denied: Write is not in this room's allowed_tools" in recorder.output(denied)
    assert "decision deny Write is not in this room's allowed_tools" in recorder.output(denied)
    assert "decision allow" in recorder.output(allowed)


async def test_hang_is_stopped_at_the_timeout_and_the_room_keeps_working(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path, timeout_s=1))
    hung, after = await run_prompts(worker, recorder, "hang", "say still here")
    assert "⏱️ Timed out after 1 s" in recorder.output(hung)
    assert "⏹️ Stopped." in recorder.output(hung)
    assert recorder.output(after).startswith("still here")


async def test_interrupt_that_is_obeyed_keeps_the_process(tmp_path, store, monkeypatch):
    monkeypatch.setenv("FAKE_OBEYS_INTERRUPT", "1")
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path, timeout_s=1))
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        await worker.inbox.put(Prompt("!room:x", "$hang", "@u:x", "hang"))
        async with asyncio.timeout(10):
            await recorder.ended.get()
        pid = worker.agent.proc.pid
        await worker.inbox.put(Prompt("!room:x", "$next", "@u:x", "say fine"))
        async with asyncio.timeout(10):
            await recorder.ended.get()
        assert worker.agent.proc.pid == pid
        task.cancel()
    assert recorder.output("$next").startswith("fine")


async def test_crash_is_reported_with_its_stderr_and_the_next_prompt_restarts(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    crashed, after = await run_prompts(worker, recorder, "crash", "say back")
    assert "❌ The agent stopped unexpectedly (exit code 3: boom: something broke)" in recorder.output(crashed)
    assert recorder.output(after).startswith("back")


async def test_missing_binary_is_reported(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, ClaudeSettings(binary=str(tmp_path / "nope")))
    (prompt,) = await run_prompts(worker, recorder, "say hi")
    assert "❌ Cannot start the agent" in recorder.output(prompt)
    assert "Install the Claude Code CLI or set `claude.binary`" in recorder.output(prompt)


async def test_a_conversation_the_cli_no_longer_has_is_started_anew_and_the_room_told_once(tmp_path, store):
    await store.set_session_id("!room:x", "bad")
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    first, second = await run_prompts(worker, recorder, "say fresh", "say again")
    output = recorder.output(first)
    assert output.startswith("\nℹ️ The earlier conversation is gone; starting a new one.\nfresh")
    assert output.count("conversation is gone") == 1 and "❌" not in output
    assert "gone" not in recorder.output(second)
    assert recorder.states == {first: "done", second: "done"}
    session = await store.session_id("!room:x")
    assert session != "bad" and recorder.finals[first]["session_id"] == recorder.finals[second]["session_id"] == session


async def test_a_resumed_agent_that_cannot_start_keeps_its_conversation(tmp_path, store):
    await store.set_session_id("!room:x", "1234-abcd")
    claude = fake_claude(tmp_path, extra_args=["--settings", str(tmp_path / "missing.json")])
    worker, recorder = make_worker(tmp_path, store, claude)
    (prompt,) = await run_prompts(worker, recorder, "say hi")
    assert "❌ The agent stopped unexpectedly (exit code 1: Error: Settings file not found" in recorder.output(prompt)
    assert await store.session_id("!room:x") == "1234-abcd"


async def test_a_cli_that_refuses_the_tool_guard_is_stopped_before_its_turn(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path, extra_args=["--refuse-hooks"]))
    with capture_logs() as logs:
        (prompt,) = await run_prompts(worker, recorder, "say hi")
    assert recorder.output(prompt).strip() == (
        "❌ The Claude Code CLI refused the daemon's handshake (hooks are not supported), which registers the tool "
        "guard, so it was stopped before it could run a tool. `aiagentchat doctor` checks the CLI."
    )
    assert recorder.states == {prompt: "failed"} and worker.agent is None
    assert [entry["error"] for entry in logs if entry["event"] == "agent_refused_handshake"] == [
        "hooks are not supported"
    ]


async def test_a_stored_session_is_resumed(tmp_path, store):
    await store.set_session_id("!room:x", "1234-abcd")
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    (prompt,) = await run_prompts(worker, recorder, "argv")
    argv = json.loads(recorder.output(prompt).split("\n")[0])
    assert argv[argv.index("--resume") + 1] == "1234-abcd"


async def test_a_huge_non_json_line_does_not_break_the_run(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    (prompt,) = await run_prompts(worker, recorder, "bigline 3000000")
    assert recorder.output(prompt).startswith("survived")


async def test_prompts_starting_with_a_dash_or_holding_nul_are_just_text(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    dash, nul = await run_prompts(worker, recorder, "--dangerously-skip-permissions", "a\x00b")
    assert recorder.output(dash).startswith("you said --dangerously-skip-permissions")
    assert recorder.output(nul).startswith("you said a\x00b")


async def test_an_idle_agent_process_is_closed_and_the_next_prompt_resumes(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path, idle_close_s=0.2))
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        await worker.inbox.put(Prompt("!room:x", "$one", "@u:x", "say first"))
        async with asyncio.timeout(10):
            await recorder.ended.get()
        process = worker.agent.proc
        async with asyncio.timeout(10):
            await process.wait()
        await worker.inbox.put(Prompt("!room:x", "$two", "@u:x", "argv"))
        async with asyncio.timeout(10):
            await recorder.ended.get()
        task.cancel()
    argv = json.loads(recorder.output("$two").split("\n")[0])
    assert argv[argv.index("--resume") + 1] == await store.session_id("!room:x")


async def test_a_worker_cancelled_as_a_prompt_arrives_ends_without_running_it(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    task = asyncio.create_task(worker.run())
    for _ in range(5):  # let the worker reach its wait on the empty inbox
        await asyncio.sleep(0)
    worker.inbox.put_nowait(Prompt("!room:x", "$late", "@u:x", "say hi"))
    task.cancel()  # in the same step: asyncio.wait_for (Python 3.11) returned the prompt and lost this
    async with asyncio.timeout(5):
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert recorder.items == [] and worker.inbox.qsize() == 1


async def test_every_run_ends_with_a_summary_for_clients(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path, timeout_s=1))
    ok, hung, crashed = await run_prompts(worker, recorder, "say fine", "hang", "crash")
    assert recorder.finals[ok] | {"session_id": None} == {
        "ok": True, "result": "fine", "cost_usd": 0.0012, "duration_ms": 1234, "num_turns": 1, "session_id": None}
    assert recorder.finals[hung]["ok"] is False and recorder.finals[hung]["result"] == "timed out after 1 s"
    assert recorder.finals[crashed]["ok"] is False
    assert recorder.finals[crashed]["result"].startswith("the agent stopped unexpectedly (exit code 3")
    begins = [item for item in recorder.items if isinstance(item, Begin)]
    assert [b.marker for b in begins] == [{"hops": 1}] * 3


async def test_a_silent_agent_is_reported_at_each_stall_period_until_the_timeout(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path, timeout_s=1.1, stall_notice_s=0.5))
    (hung,) = await run_prompts(worker, recorder, "hang")
    output = recorder.output(hung)
    assert "⏳ No output from the agent for 0.5 s." in output and "⏳ No output from the agent for 1 s." in output
    assert "⏱️ Timed out after 1.1 s" in output
    assert recorder.states[hung] == "failed"


async def test_a_stalled_agent_is_stopped_when_the_room_says_so(tmp_path, store):
    claude = fake_claude(tmp_path, stall_notice_s=0.3, stall_interrupt=True)
    worker, recorder = make_worker(tmp_path, store, claude)
    hung, after = await run_prompts(worker, recorder, "hang", "say awake")
    assert "⏳ No output for 0.3 s; stopping the agent." in recorder.output(hung)
    assert recorder.finals[hung]["result"] == "stalled: no output for 0.3 s"
    assert recorder.output(after).startswith("awake")


async def test_runs_record_their_state_and_end_with_it(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    prompts = [Prompt("!room:x", f"$e{number}", "@u:x", text) for number, text in enumerate(["say ok", "crash"])]
    for prompt in prompts:
        await store.add_prompt(prompt)
    states = []
    real_put = recorder.put

    async def put(item) -> None:
        if isinstance(item, Begin):
            states.append(await store.prompt_state(item.prompt_id))
        await real_put(item)

    recorder.put = put
    ok, crashed = await run_prompts(worker, recorder, "say ok", "crash")
    assert states == ["running", "running"]
    assert (recorder.states[ok], recorder.states[crashed]) == ("done", "failed")


async def test_after_a_restart_a_running_prompt_is_reported_and_queued_ones_run_in_order(tmp_path, store):
    interrupted, first, second = (Prompt("!room:x", f"${name}", "@u:x", f"say {name}") for name in ("i", "q1", "q2"))
    for prompt in (interrupted, first, second):
        await store.add_prompt(prompt)
    await store.set_prompt_state(interrupted.event_id, "running")
    await store.queue_outbox("!room:x", [OutboxRow("t1", {"body": "partial"}, interrupted.event_id)])
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    await worker.recover()
    assert recorder.states == {interrupted.event_id: "interrupted"}
    assert recorder.finals[interrupted.event_id]["result"] == "interrupted: the daemon stopped while this prompt ran"
    assert "(1 events of its output reached the room). It is not run again" in recorder.output(interrupted.event_id)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        async with asyncio.timeout(20):
            assert [await recorder.ended.get() for _ in range(3)] == ["$i", "$q1", "$q2"]
        task.cancel()
    assert recorder.output("$q1").startswith("q1") and recorder.output("$q2").startswith("q2")


async def test_a_refused_prompt_is_answered_without_running(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))
    await worker.refuse(Prompt("!room:x", "$busy", "@u:x", "say hi"), "busy: 3 prompts are queued")
    assert recorder.output("$busy") == "\n⛔ Not run: busy: 3 prompts are queued.\n"
    assert recorder.states["$busy"] == "refused" and recorder.finals["$busy"]["ok"] is False
    assert worker.agent is None


def git_init(path: Path) -> None:
    subprocess.run(["git", "-C", str(path), "init", "--quiet"], check=True)



def threaded_worker(tmp_path, store, claude, max_parallel=2) -> tuple[RoomWorker, Recorder]:
    recorder, repo = Recorder(), make_repository(tmp_path / "work")
    guard = ToolGuard(tmp_path / "data", repo)
    trees = Worktrees(repo, tmp_path / "data" / "worktrees", None)
    policy = RoomToolPolicy(claude)
    worker = RoomWorker(
        "!room:x",
        claude,
        repo,
        store,
        recorder,
        policy,
        guard,
        "thread",
        "thread",
        None,
        None,
        None,
        trees,
        max_parallel,
    )
    return worker, recorder


async def ended_by(recorder: Recorder, deadline: float = 20) -> str:
    async with asyncio.timeout(deadline):
        return await recorder.ended.get()


async def test_threads_run_at_once_each_in_its_worktree_and_in_order_within_a_thread(tmp_path, store):
    worker, recorder = threaded_worker(tmp_path, store, fake_claude(tmp_path))
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        hanging = Prompt("!room:x", "$a", "@u:x", "hang")
        for prompt in (
            hanging,
            Prompt("!room:x", "$b", "@u:x", "cwd"),
            Prompt("!room:x", "$a2", "@u:x", "cwd", thread="$a"),
        ):
            await store.add_prompt(prompt)
            await worker.inbox.put(prompt)
        assert await ended_by(recorder) == "$b"  # while $a still runs: the threads run at once
        assert [runner.current.event_id for runner in worker.running()] == ["$a"]
        assert recorder.output("$b").startswith(str(worker.worktrees.path_of("$b")))
        assert not worker.stop("@u:x", thread="$b")  # nothing runs in that thread
        assert worker.stop("@u:x", thread="$a")
        assert await ended_by(recorder) == "$a" and "Stopped by @u:x" in recorder.output("$a")
        assert await ended_by(recorder) == "$a2"  # after $a, in the same thread and the same worktree
        assert recorder.output("$a2").startswith(str(worker.worktrees.path_of("$a")))
        task.cancel()
    assert recorder.states == {"$a": "failed", "$b": "done", "$a2": "done"}


async def test_a_new_checkout_gives_threads_worktrees_of_it(tmp_path, store):
    worker, recorder = threaded_worker(tmp_path, store, fake_claude(tmp_path))
    other = make_repository(tmp_path / "other")
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        first = Prompt("!room:x", "$a", "@u:x", "cwd")
        await store.add_prompt(first)
        await worker.inbox.put(first)
        assert await ended_by(recorder) == "$a"
        trees = Worktrees(other, tmp_path / "data" / "worktrees-other", None)
        worker.reconfigure(worker.claude, other, ToolGuard(tmp_path / "data", other), None, trees)  # `!project`
        again = Prompt("!room:x", "$a2", "@u:x", "cwd", thread="$a")
        await store.add_prompt(again)
        await worker.inbox.put(again)
        assert await ended_by(recorder) == "$a2"
        task.cancel()
    assert recorder.output("$a2").startswith(str(trees.path_of("$a")))
    assert (other / ".git" / "worktrees").is_dir()


async def test_max_parallel_holds_the_next_thread_until_a_run_ends(tmp_path, store):
    worker, recorder = threaded_worker(tmp_path, store, fake_claude(tmp_path), max_parallel=1)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        for prompt in (Prompt("!room:x", "$a", "@u:x", "hang"), Prompt("!room:x", "$b", "@u:x", "say b")):
            await store.add_prompt(prompt)
            await worker.inbox.put(prompt)
        async with asyncio.timeout(10):
            while not worker.running():
                await asyncio.sleep(0.01)
        assert worker.waits(Prompt("!room:x", "$c", "@u:x", "say c"))
        with pytest.raises(TimeoutError):
            await ended_by(recorder, deadline=1.5)  # $b waits for the one slot
        assert worker.stop("@u:x")
        assert [await ended_by(recorder), await ended_by(recorder)] == ["$a", "$b"]
        task.cancel()


async def test_a_checkout_that_is_not_git_runs_threads_in_turn_in_the_working_directory(tmp_path, store):
    claude = fake_claude(tmp_path)
    recorder, workdir = Recorder(), tmp_path / "plain"
    workdir.mkdir()
    trees = Worktrees(workdir, tmp_path / "data" / "worktrees", None)
    worker = RoomWorker(
        "!room:x", claude, workdir, store, recorder, RoomToolPolicy(claude), ToolGuard(tmp_path / "data", workdir),
        "thread", "thread", None, None, None, trees, 2,
    )  # fmt: skip
    first, second = await run_prompts(worker, recorder, "cwd", "cwd")
    assert recorder.output(first).startswith(str(workdir)) and recorder.output(second).startswith(str(workdir))
    assert not worker.lanes and not (tmp_path / "data" / "worktrees").exists()


async def test_shutdown_interrupts_every_threads_run_and_ends_their_agents_and_an_idle_lane_leaves(tmp_path, store):
    worker, recorder = threaded_worker(tmp_path, store, fake_claude(tmp_path, idle_close_s=1))
    task = asyncio.create_task(worker.run())
    quick = Prompt("!room:x", "$q", "@u:x", "say done")
    await store.add_prompt(quick)
    await worker.inbox.put(quick)
    assert await ended_by(recorder) == "$q"
    async with asyncio.timeout(10):  # idle for idle_close_s: its agent is closed and the lane leaves
        while worker.lanes:
            await asyncio.sleep(0.05)
    for event_id in ("$a", "$b"):
        prompt = Prompt("!room:x", event_id, "@u:x", "hang")
        await store.add_prompt(prompt)
        await worker.inbox.put(prompt)
    async with asyncio.timeout(10):
        while sum(runner.agent is not None for runner in worker.running()) < 2:
            await asyncio.sleep(0.01)
    processes = [runner.agent.proc for runner in worker.running()]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {await ended_by(recorder), await ended_by(recorder)} == {"$a", "$b"}
    assert "Interrupted: the daemon is shutting down" in recorder.output("$a")
    assert recorder.states["$a"] == recorder.states["$b"] == "interrupted"
    assert all(proc.returncode is not None for proc in processes) and not worker.lanes


async def test_a_thread_whose_worktree_cannot_be_made_is_told_why(tmp_path, store):
    claude = fake_claude(tmp_path)
    recorder, empty = Recorder(), tmp_path / "empty"
    empty.mkdir()
    git_init(empty)  # no commit: no HEAD to branch from
    worker = RoomWorker(
        "!room:x", claude, empty, store, recorder, RoomToolPolicy(claude), ToolGuard(tmp_path / "data", empty),
        "thread", "thread", None, None, None, Worktrees(empty, tmp_path / "trees", None), 2,
    )  # fmt: skip
    (prompt,) = await run_prompts(worker, recorder, "say hi")
    assert "❌ Not run: this thread's git worktree could not be made" in recorder.output(prompt)
    assert recorder.states[prompt] == "failed"


async def test_a_room_task_that_fails_raises_the_failure_itself_and_keeps_the_prompts_its_lanes_held(tmp_path, store):
    worker, recorder = threaded_worker(tmp_path, store, fake_claude(tmp_path))
    task = asyncio.create_task(worker.run())
    prompts = [Prompt("!room:x", "$a", "@u:x", "hang")]
    prompts += [Prompt("!room:x", f"$a{n}", "@u:x", f"say {n}", thread="$a") for n in (2, 3)]
    for prompt in prompts:
        await store.add_prompt(prompt)
        await worker.inbox.put(prompt)
    async with asyncio.timeout(10):
        while not (worker.running() and worker.queued() == 2):
            await asyncio.sleep(0.01)
    (lane,) = worker.lanes.values()

    async def broken(prompt: Prompt) -> None:
        raise RuntimeError("a bug in the lane")

    lane.handle = broken  # its next prompt fails outside the run's own error handling
    assert worker.stop("@u:x")  # $a ends; the lane takes $a2 and fails
    with pytest.raises(RuntimeError, match="a bug in the lane"):  # as itself: the supervisor judges it
        await task
    assert await ended_by(recorder) == "$a"
    assert not worker.lanes and worker.inbox.get_nowait().event_id == "$a3"  # handed out again on restart
