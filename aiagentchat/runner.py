"""One worker per room: runs its prompts in order through a live Claude Code CLI process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fnmatch
import itertools
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from aiagentchat.approvals import ToolDecision, ToolPolicy, suggested_rule
from aiagentchat.batcher import INTERNAL_ERROR, Batcher, Begin, Block, EndOfRun, Item, Text
from aiagentchat.desk import Desk
from aiagentchat.guard import ToolGuard
from aiagentchat.metrics import Metrics
from aiagentchat.processes import start_time, terminate_tree
from aiagentchat.protocol import OverlongLine, Translator, parse_line, read_lines, run_summary
from aiagentchat.sandbox import Wall, installation, prepare_home
from aiagentchat.settings import ClaudeSettings
from aiagentchat.store import Prompt, Store
from aiagentchat.uploads import image_block, uploads_note
from aiagentchat.wire import HOPS_VARIABLE
from aiagentchat.worktrees import GitError, Worktrees

log = structlog.get_logger(__name__)

STDERR_TAIL_LINES = 20
EVENT_BATCHES_BUFFERED = 4  # each the events of one read of the agent's stdout (protocol.READ_CHUNK)
KILL_WAIT_S = 3.0
GUARD_HOOK = "aiagentchat-guard"


def agent_environment(patterns: list[str], source: Mapping[str, str]) -> dict[str, str]:
    """Only the variables named (or matched by glob) in env_passthrough reach the agent."""
    return {name: value for name, value in source.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def cli_arguments(claude: ClaudeSettings, session_id: str | None) -> list[str]:
    args = [
        claude.binary,
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
        "--permission-prompt-tool",
        "stdio",
        "--permission-mode",
        claude.permission_mode,
        # only the settings files and MCP servers the room's settings name: nothing the agent writes into its
        # working directory or home (.claude/settings.json, .mcp.json, ~/.claude.json) applies on its next start
        "--setting-sources",
        ",".join(claude.setting_sources),
        "--strict-mcp-config",
    ]
    if claude.mcp_config is not None:
        args += ["--mcp-config", str(claude.mcp_config)]
    if claude.allowed_tools:
        args += ["--allowedTools", *claude.allowed_tools]
    if claude.disallowed_tools:
        args += ["--disallowedTools", *claude.disallowed_tools]
    if claude.model:
        args += ["--model", claude.model]
    if session_id:
        args += ["--resume", session_id]
    return args + list(claude.extra_args)


def initialize_request() -> dict[str, Any]:
    """The handshake each CLI process gets first: the daemon's PreToolUse hook (the tool guard) registered."""
    hooks = {"PreToolUse": [{"matcher": None, "hookCallbackIds": [GUARD_HOOK]}]}
    return {
        "type": "control_request",
        "request_id": uuid.uuid4().hex,
        "request": {"subtype": "initialize", "hooks": hooks},
    }


def _joined(items: list[Item]) -> list[Item]:
    """`items` with each run of Text items joined into one (the batcher concatenates texts as they are)."""
    joined: list[Item] = []
    for prompt_id, group in itertools.groupby(items, lambda item: item.prompt_id if isinstance(item, Text) else None):
        if prompt_id is None:
            joined += group
        else:
            joined.append(Text(prompt_id, "".join(item.text for item in group)))
    return joined


class AgentExited(Exception):
    """The CLI process ended while a prompt was running."""


class AgentStalled(Exception):
    """The agent wrote nothing for too long (`stall_interrupt`)."""

    def __init__(self, silent_s: float) -> None:
        super().__init__(f"no output for {silent_s:g} s")
        self.silent_s = silent_s


class AgentProcess:
    """A live CLI process in bidirectional stream-json mode."""

    def __init__(
        self, proc: asyncio.subprocess.Process, resumed: bool, hops: int, model: str | None, conversation: str
    ) -> None:
        self.proc = proc
        self.conversation = conversation  # whose session it carries on: `Prompt.conversation`
        self.resumed = resumed
        self.hops = hops
        self.model = model
        self.cost_usd = 0.0  # what its turns have cost so far
        # bounded: when the room's output falls behind, reading stops and the agent's pipe pushes back
        self.events: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue(maxsize=EVENT_BATCHES_BUFFERED)
        self._taken: collections.deque[dict[str, Any]] = collections.deque()  # of a batch, not yet handed on
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.saw_output = False
        self.conversation_gone = False  # it was to resume a conversation the CLI no longer has
        self.initialize_id = ""  # the request id of the handshake
        self.refused: str | None = None  # why the CLI refused the handshake: it is not read any further
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    @classmethod
    async def start(
        cls,
        claude: ClaudeSettings,
        workdir: Path,
        session_id: str | None,
        hops: int,
        conversation: str,
        wall: Wall | None = None,
    ) -> AgentProcess:
        """Start the CLI in `workdir`, inside the room's `wall` when it has one (HOME is then the room's)."""
        env = agent_environment(claude.env_passthrough, os.environ) | {HOPS_VARIABLE: str(hops)}
        command = cli_arguments(claude, session_id)
        if wall is not None:
            command = wall.argv([str(installation(claude.binary)), *command[1:]])
            env["HOME"] = str(wall.home)
        proc = await asyncio.create_subprocess_exec(
            *command,
            cwd=workdir,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        agent = cls(proc, session_id is not None, hops, claude.model, conversation)
        handshake = initialize_request()
        agent.initialize_id = handshake["request_id"]
        await agent.write(handshake)
        return agent

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.proc.stdout.at_eof()

    async def _read_stdout(self) -> None:
        """Queue the events of each read as one batch: one queue hop for all the lines a read brought."""
        async for lines in read_lines(self.proc.stdout):
            events = [event for line in lines if (event := self._event(line)) is not None]
            if events:
                await self.events.put(events)
            if self.refused is not None:
                break  # the run ends as if the agent had exited, and the process is ended then
        await self.events.put(None)

    def _event(self, line: bytes | OverlongLine) -> dict[str, Any] | None:
        if isinstance(line, OverlongLine):
            log.warning("agent_line_too_long", size=line.size)
            return None
        event = parse_line(line)
        if self.refused is not None:
            return None
        if event is None:
            if line.strip():
                log.warning("agent_line_not_json", line=line[:200].decode("utf-8", "replace"))
            return None
        if self.resumed and not self.saw_output and event.get("type") == "result" and event.get("is_error"):
            # an error result before anything else: the CLI could not take up the conversation (2.1.197:
            # "No conversation found with session ID: <id>" on stderr and in `errors`, 0 turns, exit 1)
            self.conversation_gone = True
            return None
        if event.get("type") == "control_response" and not self._handshake_accepted(event.get("response")):
            return None
        self.saw_output = True
        return event

    def _handshake_accepted(self, response: Any) -> bool:
        """False when `response` refuses the handshake, which registers the tool guard: a CLI that does not take
        the guard's hook must run no tool, whatever its version says."""
        if not isinstance(response, dict) or response.get("request_id") != self.initialize_id:
            return True
        if response.get("subtype") == "success":
            return True
        self.refused = str(response.get("error") or "no reason given")[:300]
        log.error("agent_refused_handshake", error=self.refused)
        return False

    async def _read_stderr(self) -> None:
        async for lines in read_lines(self.proc.stderr, max_line=64 * 1024):
            for line in lines:
                if isinstance(line, bytes) and line.strip():
                    self.stderr_tail.append(line.decode("utf-8", "replace"))

    async def write(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise AgentExited("the agent's input closed") from exc

    async def next_event(self) -> dict[str, Any]:
        if not self._taken:
            self._take(await self.events.get())
        return self._taken.popleft()

    def ready_event(self) -> dict[str, Any] | None:
        """The next event if one is already waiting (no timer, no task: the hot path of a busy agent)."""
        if not self._taken and not self.events.empty():
            self._take(self.events.get_nowait())
        return self._taken.popleft() if self._taken else None

    def _take(self, batch: list[dict[str, Any]] | None) -> None:
        if batch is None:
            self.events.put_nowait(None)
            raise AgentExited("the agent exited")
        self._taken.extend(batch)

    async def close(self, wait_s: float) -> None:
        """End the process: close its input and give it `wait_s` to finish, then end its whole tree."""
        if self.proc.stdin and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self.proc.wait()
        await terminate_tree(self.proc, KILL_WAIT_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def exit_description(self) -> str:
        code = self.proc.returncode
        detail = "\n".join(self.stderr_tail).strip()
        what = f"exit code {code}" if code is not None and code >= 0 else f"signal {-(code or 0)}"
        return f"{what}: {detail[-800:]}" if detail else what


class RoomWorker:
    """Takes a room's prompts from its inbox, one at a time, and streams the agent's output to its batcher.

    With `worktrees` (a room with `worktrees = true` whose working directory is a git checkout), it hands each
    thread's prompts to that thread's `Lane` instead: a worker of its own, in the thread's git worktree, which
    runs them in order; up to `max_parallel` lanes run a prompt at once."""

    def __init__(
        self,
        room_id: str,
        claude: ClaudeSettings,
        workdir: Path,
        store: Store,
        batcher: Batcher,
        policy: ToolPolicy,
        guard: ToolGuard,
        reply_mode: str = "flat",
        session_scope: str = "room",
        desk: Desk | None = None,
        wall: Wall | None = None,
        metrics: Metrics | None = None,
        worktrees: Worktrees | None = None,
        max_parallel: int = 1,
    ) -> None:
        self.room_id = room_id
        self.reply_mode = reply_mode
        self.session_scope = session_scope
        self.claude = claude
        self.workdir = workdir
        self.store = store
        self.batcher = batcher
        self.policy = policy
        self.guard = guard
        self.desk = desk  # the room's uploads are saved there; a prompt waits for the ones sent before it
        self.wall = wall  # the room's sandbox; None: `sandbox = "off"`
        self.metrics = metrics or Metrics()  # the daemon's; one of its own in tests
        self.inbox: asyncio.Queue[Prompt] = asyncio.Queue()
        self.agent: AgentProcess | None = None
        self.model = claude.model  # `!model` changes it for the next agent process
        self.current: Prompt | None = None
        self.current_since = 0.0  # time.time() when the current prompt started
        self.fresh = False  # `!new`: the next prompt starts a new conversation
        self._reconfigured = False  # the settings changed: the next prompt starts a new agent process
        self.restart = False  # `!resume`: the next prompt starts a new agent process, which resumes the stored session
        self._deadline: asyncio.Timeout | None = None
        self._stopped_by: str | None = None
        self._dropped: dict[str, str] = {}  # queued prompts to answer as dropped → who dropped them
        self.worktrees = worktrees
        self.max_parallel = max_parallel
        self.slots = asyncio.Semaphore(max_parallel)  # taken by a lane while it runs a prompt
        self.lanes: dict[str, Lane] = {}  # by conversation (`Prompt.conversation`)
        self._orphans: list[Prompt] = []  # prompts that lanes ran when the room's task failed

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(room_id=self.room_id)
        try:
            async with asyncio.TaskGroup() as lanes:  # shut down or failed: the lanes end with it
                while True:
                    try:
                        async with asyncio.timeout(self.claude.idle_close_s):
                            prompt = await self.inbox.get()
                    except TimeoutError:
                        await self._close_agent("idle")
                        continue
                    if (by := self._dropped.pop(prompt.event_id, None)) is not None:
                        await self._report_dropped(prompt, by)
                    elif (lane := self._lane_for(prompt, lanes)) is not None:
                        lane.inbox.put_nowait(prompt)
                    else:
                        await self.handle(prompt)
        except ExceptionGroup as failed:  # a lane's or this loop's failure, as the room's supervisor judges it
            raise failed.exceptions[0] from failed
        finally:
            self._orphans = [lane.current for lane in self.lanes.values() if lane.current is not None]
            self._take_back_queued()
            await asyncio.shield(self._close_agent("stopping"))

    def _take_back_queued(self) -> None:
        """The lanes' waiting prompts back into this worker's inbox, before the ones still there (the lanes are
        gone: a run() started again by the room's supervisor hands them out afresh)."""
        waiting = [lane.inbox.get_nowait() for lane in self.lanes.values() for _ in range(lane.inbox.qsize())]
        waiting += [self.inbox.get_nowait() for _ in range(self.inbox.qsize())]
        for prompt in waiting:
            self.inbox.put_nowait(prompt)
        self.lanes.clear()

    def _lane_for(self, prompt: Prompt, lanes: asyncio.TaskGroup) -> Lane | None:
        """The lane of the prompt's thread (started if it has none), or None: this worker runs it itself."""
        if self.worktrees is None or not self.worktrees.available():
            return None
        conversation = prompt.conversation(self.session_scope)
        lane = self.lanes.get(conversation)
        if lane is None:
            lane = self.lanes[conversation] = Lane(self, prompt.thread or prompt.event_id, conversation)
            lanes.create_task(lane.run())
        return lane

    def workers(self, thread: str | None = None) -> list[RoomWorker]:
        """This worker and its lanes; with `thread` (and worktrees), only that thread's lane."""
        if thread is None or self.worktrees is None:
            return [self, *self.lanes.values()]
        return [lane for lane in self.lanes.values() if lane.thread == thread]

    def running(self) -> list[RoomWorker]:
        """The workers (this one, lanes) running a prompt now."""
        return [worker for worker in self.workers() if worker.current is not None]

    def queued(self) -> int:
        """Prompts waiting to run, in this worker's inbox and its lanes'."""
        return sum(worker.inbox.qsize() for worker in self.workers())

    def waits(self, prompt: Prompt) -> bool:
        """Whether a prompt handed over now would wait behind another (it gets ⏳)."""
        if self.worktrees is None or not self.worktrees.available():
            return self.current is not None or self.inbox.qsize() > 0
        lane = self.lanes.get(prompt.conversation(self.session_scope))
        busy = lane is not None and (lane.current is not None or lane.inbox.qsize() > 0)
        return busy or self.slots.locked()

    def live_agents(self) -> int:
        return sum(worker.agent is not None for worker in self.workers())

    async def spare_agents(self, wanting: RoomWorker) -> None:
        """Close idle lanes' agents so that, with the one `wanting` is about to use, at most `max_parallel`
        live (each is a CLI process of a few hundred MB)."""
        idle = [lane for lane in self.lanes.values() if lane is not wanting and lane.agent and not lane.current]
        excess = self.live_agents() + (wanting.agent is None) - self.max_parallel
        for lane in idle[: max(0, excess)]:
            await lane._close_agent("another thread needs its place")

    async def recover(self) -> None:
        """After a restart: report the prompts that were running as interrupted (never run them again) and
        queue the ones that were waiting, in order. Call before run()."""
        for prompt in await self.store.prompts(self.room_id, "running"):
            delivered = await self.store.output_events(prompt.event_id)
            log.warning("run_interrupted_by_restart", room_id=self.room_id, run_id=prompt.event_id)
            await self.batcher.put(self._begin(prompt))
            await self.batcher.put(
                Block(
                    prompt.event_id,
                    f"⚠️ Interrupted: the daemon stopped while this prompt ran ({delivered} events of its output "
                    "reached the room). It is not run again; send it again if you still want it.",
                )
            )
            final = run_summary(None, "interrupted: the daemon stopped while this prompt ran")
            await self.batcher.put(EndOfRun(prompt.event_id, final, "interrupted"))
        for prompt in await self.store.prompts(self.room_id, "queued"):
            self.inbox.put_nowait(prompt)
        if self.inbox.qsize():
            log.info("queue_resumed", room_id=self.room_id, prompts=self.inbox.qsize())

    async def crashed(self) -> None:
        """After run() failed unexpectedly (its supervisor starts it again): the prompt it ran is answered as
        failed, never left running."""
        orphans, self._orphans = self._orphans, []  # of lanes that failed
        prompt, self.current = self.current, None
        for running in [*([prompt] if prompt is not None else []), *orphans]:
            await self._answer_crashed(running)

    async def _answer_crashed(self, prompt: Prompt) -> None:
        log.warning("run_failed_by_crash", room_id=self.room_id, run_id=prompt.event_id)
        text = f"{INTERNAL_ERROR} This prompt failed; send it again if you still want it."
        await self.batcher.put(Block(prompt.event_id, text))
        await self.batcher.put(EndOfRun(prompt.event_id, run_summary(None, "internal error in aiagentchat"), "failed"))

    async def refuse(self, prompt: Prompt, reason: str) -> None:
        """Answer a prompt that will not run (already recorded as refused)."""
        await self.batcher.put(self._begin(prompt, working=False))
        await self.batcher.put(Block(prompt.event_id, f"⛔ Not run: {reason}."))
        await self.batcher.put(EndOfRun(prompt.event_id, run_summary(None, reason), "refused"))

    def stop(self, by: str, thread: str | None = None) -> bool:
        """Interrupt the running prompt (`!stop`); with lanes, every one, or with `thread` only that thread's;
        False if none runs."""
        interrupted = [worker.interrupt(by) for worker in self.workers(thread)]  # each one, not just the first
        return any(interrupted)

    def stop_prompt(self, prompt_id: str, by: str) -> bool:
        """Interrupt the prompt `prompt_id` if it runs (🛑 on it); False if it does not."""
        return any(worker.interrupt(by) for worker in self.running() if worker.current.event_id == prompt_id)

    def interrupt(self, by: str) -> bool:
        """Interrupt this worker's running prompt; False if none runs. A request waiting for approval is denied
        first; the run stops once the agent has that answer."""
        if self.current is None:
            return False
        self._stopped_by = by
        cancelled = self.policy.cancel(f"stopped by {by}", self.current.event_id)
        if not cancelled and self._deadline is not None and not self._deadline.expired():
            self._deadline.reschedule(asyncio.get_running_loop().time())
        return True

    def reconfigure(
        self, claude: ClaudeSettings, workdir: Path, guard: ToolGuard, wall: Wall | None, worktrees: Worktrees | None
    ) -> None:
        """New settings from the chat (`!tools`, `!project`): the next prompt starts a new agent process with them,
        in another working directory also a new conversation, and threads get worktrees of the new checkout (the
        lanes of the old one end when idle). The agent of a running prompt finishes it."""
        for lane in self.lanes.values():
            lane.claude, lane._reconfigured = claude, True
        if workdir != self.workdir:
            self.fresh = True
            self.worktrees = worktrees
            self.lanes = {}
        self.claude, self.workdir, self.guard, self.wall = claude, workdir, guard, wall
        self._reconfigured = True

    def waiting_prompts(self) -> list[Prompt]:
        """The prompts waiting to run, in this worker's inbox and its lanes', in order, without those dropped."""
        waiting: list[Prompt] = []
        for worker in self.workers():
            waiting += worker.inbox._queue  # type: ignore[attr-defined]  # asyncio keeps them so
        return [prompt for prompt in waiting if prompt.event_id not in self._dropped]

    async def drop(self, event_id: str, by: str) -> bool:
        """Answer a queued prompt as dropped instead of running it (🛑 on it); False if it is not queued."""
        if event_id in self._dropped or await self.store.prompt_state(event_id) != "queued":
            return False
        self._dropped[event_id] = by
        return True

    async def _report_dropped(self, prompt: Prompt, by: str) -> None:
        log.info("prompt_dropped", room_id=self.room_id, run_id=prompt.event_id, by=by)
        await self.batcher.put(self._begin(prompt, working=False))
        await self.batcher.put(Block(prompt.event_id, f"🛑 Dropped by {by} before it ran."))
        await self.batcher.put(EndOfRun(prompt.event_id, run_summary(None, f"dropped by {by}"), "dropped"))

    def _begin(self, prompt: Prompt, *, working: bool = True) -> Begin:
        return Begin(prompt.event_id, {"hops": prompt.hops + 1}, working, prompt.output_thread(self.reply_mode))

    async def handle(self, prompt: Prompt) -> None:
        structlog.contextvars.bind_contextvars(run_id=prompt.event_id)
        log.info("run_started", sender=prompt.sender, chars=len(prompt.text))
        self.current, self.current_since, self._stopped_by = prompt, time.time(), None
        started = time.monotonic()
        await self.store.set_prompt_state(prompt.event_id, "running")
        await self.batcher.put(self._begin(prompt))
        try:
            final = await self._run(await self._told_of_uploads(prompt))
        except asyncio.CancelledError:
            queued = self.inbox.qsize()
            later = f" {queued} queued prompt{'s' * (queued != 1)} will run when it is back." if queued else ""
            await self.batcher.put(Block(prompt.event_id, f"⚠️ Interrupted: the daemon is shutting down.{later}"))
            reason = "interrupted: the daemon is shutting down"
            await self.batcher.put(EndOfRun(prompt.event_id, run_summary(None, reason), "interrupted"))
            raise
        except Exception:
            log.exception("run_crashed")
            await self.batcher.put(
                Block(prompt.event_id, "❌ Internal error while running this prompt; see the daemon log.")
            )
            final = run_summary(None, "internal error in aiagentchat")
        finally:
            self.current = None
            structlog.contextvars.unbind_contextvars("run_id")
        self.metrics.run_seconds.observe(time.monotonic() - started)
        await self.batcher.put(EndOfRun(prompt.event_id, final, "done" if final["ok"] else "failed"))

    async def _told_of_uploads(self, prompt: Prompt) -> Prompt:
        """The prompt with the files uploaded since the last one run (once those sent before it are saved)."""
        if self.desk is not None:
            await self.desk.settled()
        saved = await self.store.take_uploads(self.room_id)
        if not saved:
            return prompt
        images = tuple(upload["path"] for upload in saved if upload.get("image"))
        return dataclasses.replace(prompt, note=uploads_note(saved), images=images)

    async def _run(self, prompt: Prompt) -> dict[str, Any]:
        agent = await self._ensure_agent(prompt)
        if agent is None:
            return run_summary(None, "the agent could not be started")
        translator = Translator(prompt.event_id, agent.cost_usd)
        if self._stopped_by is not None:
            await self.batcher.put(Block(prompt.event_id, f"🛑 Stopped by {self._stopped_by} before it began."))
            return run_summary(None, f"stopped by {self._stopped_by}")
        content: str | list[dict[str, Any]] = prompt.text
        if prompt.note:
            images = [block for path in prompt.images if (block := image_block(self.workdir, path)) is not None]
            content = [{"type": "text", "text": prompt.note}, *images, {"type": "text", "text": prompt.text}]
        with contextlib.suppress(AgentExited):  # it may have ended already: what it wrote says why
            await agent.write({"type": "user", "message": {"role": "user", "content": content}})
        failure = None
        try:
            async with asyncio.timeout(self.claude.timeout_s) as self._deadline:
                await self._pump(agent, prompt, translator)
        except TimeoutError:
            if (by := self._stopped_by) is not None:
                log.info("run_stopped", by=by)
                failure = f"stopped by {by}"
                await self._stop(agent, prompt, translator, f"🛑 Stopped by {by}")
            else:
                log.warning("run_timeout", timeout_s=self.claude.timeout_s)
                failure = f"timed out after {self.claude.timeout_s:g} s"
                await self._stop(agent, prompt, translator, f"⏱️ Timed out after {self.claude.timeout_s:g} s")
        except AgentStalled as stalled:
            log.warning("run_stalled", silent_s=stalled.silent_s)
            failure = f"stalled: no output for {stalled.silent_s:g} s"
            await self._stop(agent, prompt, translator, f"⏳ No output for {stalled.silent_s:g} s")
        except AgentExited:
            return await self._report_exit(agent, prompt)
        finally:
            self._deadline = None
        if translator.session_id and not self.fresh:
            await self.store.set_session_id(agent.conversation, translator.session_id)
        result = translator.result
        if result is not None and result.cost_usd:
            agent.cost_usd += result.cost_usd
            await self.store.add_cost(self.room_id, prompt.event_id, result.cost_usd)
            self.metrics.cost_usd.labels(self.room_id).inc(result.cost_usd)
        log.info(
            "run_finished",
            ok=bool(result and not result.is_error),
            cost_usd=result.cost_usd if result else None,
            duration_ms=result.duration_ms if result else None,
        )
        return run_summary(result, failure)

    async def _ensure_agent(self, prompt: Prompt) -> AgentProcess | None:
        conversation = prompt.conversation(self.session_scope)
        if self.fresh:
            self.fresh = False
            await self._close_agent("new conversation")
            await self.store.new_conversation(conversation)
        if self.restart:
            self.restart = False
            await self._close_agent("conversation adopted")
        agent, wanted = self.agent, (prompt.hops, self.model, conversation)
        reconfigured, self._reconfigured = self._reconfigured, False
        if (
            agent is not None
            and agent.alive
            and not reconfigured
            and (agent.hops, agent.model, agent.conversation) == wanted
        ):
            return agent
        if agent is not None:
            changed = "settings changed" if reconfigured else "hops, model or conversation changed"
            await self._close_agent("exited" if not agent.alive else changed)
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.wall is not None:
            prepare_home(self.wall)
        session_id = await self.store.session_id(conversation)
        claude = self.claude.model_copy(update={"model": self.model})
        try:
            self.agent = await AgentProcess.start(
                claude, self.workdir, session_id, prompt.hops, conversation, self.wall
            )
        except (FileNotFoundError, PermissionError) as exc:
            log.error("agent_start_failed", binary=self.claude.binary, error=str(exc))
            await self.batcher.put(
                Block(
                    prompt.event_id,
                    f"❌ Cannot start the agent: `{self.claude.binary}` could not be run ({exc.strerror}). "
                    "Install the Claude Code CLI or set `claude.binary`.",
                )
            )
            return None
        except AgentExited:
            await self._close_agent("exited")
            await self.batcher.put(Block(prompt.event_id, "❌ The agent exited as soon as it started."))
            return None
        pid = self.agent.proc.pid
        if (started := start_time(pid)) is not None:
            await self.store.agent_started(self.room_id, pid, started)
        log.info("agent_started", pid=pid, resume=session_id)
        return self.agent

    async def _pump(self, agent: AgentProcess, prompt: Prompt, translator: Translator) -> None:
        """Translate the agent's events into room output: all those already waiting at once, their text joined
        into one item, and a control request answered once the output before it is with the batcher."""
        while translator.result is None:
            event: dict[str, Any] | None = await self._next_event_watched(agent, prompt)
            items: list[Item] = []
            while event is not None and event.get("type") != "control_request":
                items += translator.feed(event)
                event = agent.ready_event() if translator.result is None else None
            for item in _joined(items):
                await self.batcher.put(item)
            if event is not None:
                await self._answer_control(agent, prompt, event)

    async def _next_event_watched(self, agent: AgentProcess, prompt: Prompt) -> dict[str, Any]:
        """The agent's next event; while it stays silent, tell the room every `stall_notice_s` (and with
        `stall_interrupt`, give up on it: AgentStalled)."""
        if (event := agent.ready_event()) is not None:
            return event
        silent_s = 0.0
        while True:
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the run deadline's cancellation
                async with asyncio.timeout(self.claude.stall_notice_s):  # (🛑) when it lands as an event arrives
                    return await agent.next_event()
            except TimeoutError:
                silent_s += self.claude.stall_notice_s
                if self.claude.stall_interrupt:
                    raise AgentStalled(silent_s) from None
                log.info("agent_silent", silent_s=silent_s)
                silent = f"⏳ No output from the agent for {silent_s:g} s."
                await self.batcher.put(Block(prompt.event_id, silent, "progress"))

    async def _answer_control(
        self, agent: AgentProcess, prompt: Prompt, event: dict[str, Any], *, stopping: bool = False
    ) -> None:
        request = event.get("request") or {}
        request_id = event.get("request_id")
        if request.get("subtype") == "hook_callback":
            await self._answer_guard_hook(agent, prompt, request_id, request.get("input") or {})
            return
        if request.get("subtype") != "can_use_tool":
            await agent.write(
                {
                    "type": "control_response",
                    "response": {
                        "subtype": "error",
                        "request_id": request_id,
                        "error": f"unsupported request {request.get('subtype')!r}",
                    },
                }
            )
            return
        tool_name = str(request.get("tool_name", ""))
        tool_input = request.get("input") if isinstance(request.get("input"), dict) else {}
        if stopping:
            decision = ToolDecision(False, "The run is being stopped.")
        else:
            suggested = suggested_rule(request.get("permission_suggestions"))
            decision = await self._decide(prompt, tool_name, tool_input, suggested)
        log.info("tool_decision", tool=tool_name, allow=decision.allow)
        if decision.allow:
            response = {"behavior": "allow", "updatedInput": decision.updated_input or tool_input}
        else:
            response = {"behavior": "deny", "message": decision.message}
            if not decision.told:
                await self.batcher.put(Block(prompt.event_id, f"🚫 {tool_name} denied: {decision.message}", "tool"))
        await agent.write(
            {
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request_id, "response": response},
            }
        )
        if self._stopped_by is not None and self._deadline is not None and not self._deadline.expired():
            self._deadline.reschedule(asyncio.get_running_loop().time())

    async def _decide(
        self, prompt: Prompt, tool_name: str, tool_input: dict[str, Any], suggested: str | None
    ) -> ToolDecision:
        """The policy's decision; the run's time limit is paused while people are asked."""
        deadline, loop = self._deadline, asyncio.get_running_loop()
        when = deadline.when() if deadline is not None else None
        if deadline is None or when is None:
            return await self.policy.decide(prompt, tool_name, tool_input, suggested)
        left = when - loop.time()
        deadline.reschedule(None)
        try:
            return await self.policy.decide(prompt, tool_name, tool_input, suggested)
        finally:
            if not deadline.expired():
                deadline.reschedule(loop.time() + left)

    async def _answer_guard_hook(
        self, agent: AgentProcess, prompt: Prompt, request_id: Any, hook_input: dict[str, Any]
    ) -> None:
        tool_name = str(hook_input.get("tool_name", ""))
        tool_input = hook_input.get("tool_input") if isinstance(hook_input.get("tool_input"), dict) else {}
        reason = self.guard.check(tool_name, tool_input)
        output: dict[str, Any] = {}
        if reason is not None:
            log.warning("tool_blocked", tool=tool_name, reason=reason)
            await self.batcher.put(Block(prompt.event_id, f"🛡️ {tool_name} blocked: {reason}.", "tool"))
            output = {
                "hookSpecificOutput": {
                    "hookEventName": "PreToolUse",
                    "permissionDecision": "deny",
                    "permissionDecisionReason": f"aiagentchat blocked this: {reason}.",
                }
            }
        await agent.write(
            {
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request_id, "response": output},
            }
        )

    async def _stop(self, agent: AgentProcess, prompt: Prompt, translator: Translator, why: str) -> None:
        """Interrupt the turn; if the agent does not end it within the grace period, end the process tree."""
        await self.batcher.put(Block(prompt.event_id, f"{why}; stopping the agent."))
        with contextlib.suppress(AgentExited, TimeoutError):
            await agent.write(
                {"type": "control_request", "request_id": uuid.uuid4().hex, "request": {"subtype": "interrupt"}}
            )
            async with asyncio.timeout(self.claude.interrupt_grace_s):
                while translator.result is None:
                    event = await agent.next_event()
                    if event.get("type") == "control_request":
                        await self._answer_control(agent, prompt, event, stopping=True)
                    elif event.get("type") == "result":
                        translator.feed(event)
        if translator.result is None:
            await self._close_agent("stopped")
        await self.batcher.put(Block(prompt.event_id, "⏹️ Stopped."))

    async def _report_exit(self, agent: AgentProcess, prompt: Prompt) -> dict[str, Any]:
        await self._close_agent("exited")
        description = agent.exit_description()
        if agent.conversation_gone:
            log.warning("conversation_gone", detail=description)
            await self.store.new_conversation(agent.conversation)
            await self.batcher.put(Block(prompt.event_id, "ℹ️ The earlier conversation is gone; starting a new one."))
            return await self._run(prompt)
        if agent.refused is not None:
            text = (
                f"❌ The Claude Code CLI refused the daemon's handshake ({agent.refused}), which registers the tool "
                "guard, so it was stopped before it could run a tool. `aiagentchat doctor` checks the CLI."
            )
            await self.batcher.put(Block(prompt.event_id, text))
            return run_summary(None, "the CLI refused the tool guard")
        log.warning("agent_exited", detail=description)
        await self.batcher.put(Block(prompt.event_id, f"❌ The agent stopped unexpectedly ({description})."))
        return run_summary(None, f"the agent stopped unexpectedly ({description})")

    async def _close_agent(self, reason: str) -> None:
        agent, self.agent = self.agent, None
        if agent is not None:
            log.info("agent_closing", reason=reason, pid=agent.proc.pid)
            await agent.close(wait_s=2.0 if reason == "idle" else 0.0)
            await self.store.agent_ended(agent.proc.pid)


class Lane(RoomWorker):
    """One thread of a room with worktrees: its prompts, in order, in the thread's own git worktree (made on
    its first prompt), each once one of the room's `max_parallel` slots is free. It ends when idle."""

    def __init__(self, room: RoomWorker, thread: str, conversation: str) -> None:
        super().__init__(
            room.room_id,
            room.claude,
            room.workdir,
            room.store,
            room.batcher,
            room.policy,
            room.guard,
            room.reply_mode,
            room.session_scope,
            room.desk,
            room.wall,
            room.metrics,
        )
        assert room.worktrees is not None
        self.room, self.thread, self.conversation, self.trees = room, thread, conversation, room.worktrees
        self._dropped = room._dropped  # a 🛑 reaches a queued prompt wherever it waits

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(room_id=self.room_id, thread=self.thread)
        ending = "stopping"
        try:
            while True:
                try:
                    async with asyncio.timeout(self.claude.idle_close_s):
                        prompt = await self.inbox.get()
                except TimeoutError:
                    if self.inbox.empty():  # the room makes a new lane for the thread's next prompt
                        if self.room.lanes.get(self.conversation) is self:
                            del self.room.lanes[self.conversation]
                        ending = "idle"
                        return
                    continue
                if (by := self._dropped.pop(prompt.event_id, None)) is not None:
                    await self._report_dropped(prompt, by)
                    continue
                await self.handle(prompt)
        finally:
            await asyncio.shield(self._close_agent(ending))

    async def handle(self, prompt: Prompt) -> None:
        async with self.room.slots:
            if (by := self._dropped.pop(prompt.event_id, None)) is not None:  # dropped while it waited for a slot
                await self._report_dropped(prompt, by)
                return
            async with self.trees.lock(self.thread):
                try:
                    path = await self.trees.ensure(self.thread)
                except (GitError, OSError) as exc:
                    log.warning("worktree_failed", thread=self.thread, error=str(exc))
                    await self._fail(prompt, f"this thread's git worktree could not be made: {exc}")
                    return
                self._work_in(path)
                await self.room.spare_agents(self)
                self.model = self.room.model
                if self.room.fresh:  # `!new`: the next prompt, whichever thread it is in
                    self.room.fresh, self.fresh = False, True
                await super().handle(prompt)

    def _work_in(self, path: Path) -> None:
        """Run the agent in the worktree at `path`: its working directory, its guard's and its wall's."""
        if path == self.workdir:
            return
        self.workdir = path
        self.guard = ToolGuard(self.room.guard.data_dir, path, self.room.guard.allow_claude_config_writes)
        if self.room.wall is not None:
            self.wall = self.trees.lane_wall(self.room.wall, path)

    async def _fail(self, prompt: Prompt, reason: str) -> None:
        await self.store.set_prompt_state(prompt.event_id, "running")
        await self.batcher.put(self._begin(prompt, working=False))
        await self.batcher.put(Block(prompt.event_id, f"❌ Not run: {reason}."))
        await self.batcher.put(EndOfRun(prompt.event_id, run_summary(None, reason), "failed"))
