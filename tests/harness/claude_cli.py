"""Running the real Claude Code CLI against the scripted model server (`tests.harness.model_server`).

- `claude_env(base_url, home)`: the offline environment (scratch HOME, no telemetry, no other traffic).
- `run_one_shot(prompt, ...)`: `claude -p --output-format stream-json --verbose -- PROMPT`, parsed.
- `StreamJsonClaude`: one live bidirectional process (`--input-format stream-json --permission-prompt-tool
  stdio`), for checking the CLI's protocol itself; the product's runner has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.harness import claude_binary

Event = dict[str, Any]
LINE_LIMIT = 64 * 1024 * 1024


def claude_env(base_url: str, home: str, **extra: str) -> dict[str, str]:
    """The environment for running the real CLI against the model server at `base_url`, offline."""
    env = {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "test-key",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
    }
    env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


async def _terminate_group(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds, wait for the exit, then SIGKILL the
    descendants found before: the CLI's Bash tool runs in its own session, outside the group."""
    tools = descendants(proc.pid) if proc.returncode is None else []
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.returncode is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), wait)
        except asyncio.TimeoutError:
            continue
    _kill_all(tools)


def _parse_lines(data: bytes) -> list[Event]:
    events = []
    for line in data.decode(errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"type": "_non_json", "line": line})
    return events


@dataclass
class OneShotResult:
    events: list[Event]
    returncode: int
    stderr: str

    @property
    def result(self) -> Event:
        results = [e for e in self.events if e.get("type") == "result"]
        if not results:
            raise AssertionError(f"no result line (exit {self.returncode}); stderr: {self.stderr[-2000:]}\n{self.events}")
        return results[-1]


async def run_one_shot(
    prompt: str,
    *,
    base_url: str,
    home: str,
    cwd: str,
    args: Sequence[str] = (),
    timeout: float = 60.0,
) -> OneShotResult:
    proc = await asyncio.create_subprocess_exec(
        claude_binary(),
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        *args,
        "--",
        prompt,
        cwd=cwd,
        env=claude_env(base_url, home),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        await _terminate_group(proc)
        raise AssertionError(f"claude -p {prompt!r} did not finish within {timeout} s") from None
    assert proc.returncode is not None
    return OneShotResult(_parse_lines(out), proc.returncode, err.decode(errors="replace"))


class StreamJsonClaude:
    """One bidirectional CLI process. Every stdout line read is kept in `events`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[Event] = []
        self._stderr = bytearray()
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())

    @classmethod
    async def start(cls, *, base_url: str, home: str, cwd: str, args: Sequence[str] = ()) -> StreamJsonClaude:
        proc = await asyncio.create_subprocess_exec(
            claude_binary(),
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-prompt-tool",
            "stdio",
            *args,
            cwd=cwd,
            env=claude_env(base_url, home),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
        return cls(proc)

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self._stderr.extend(chunk)

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    async def write(self, message: Event) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def control(self, request: Event) -> str:
        request_id = "req_" + uuid.uuid4().hex[:12]
        await self.write({"type": "control_request", "request_id": request_id, "request": request})
        return request_id

    async def initialize(self, timeout: float = 30.0) -> Event:
        request_id = await self.control({"subtype": "initialize"})
        events = await self.read_until(lambda e: _is_response_to(e, request_id), timeout)
        return events[-1]

    async def send_user(self, text: str) -> None:
        await self.write({"type": "user", "message": {"role": "user", "content": text}})

    async def interrupt(self) -> str:
        return await self.control({"subtype": "interrupt"})

    async def answer_permission(
        self, request: Event, allow: bool, message: str = "denied by the test"
    ) -> None:
        inner = request["request"]
        decision: Event = (
            {"behavior": "allow", "updatedInput": inner.get("input", {})}
            if allow
            else {"behavior": "deny", "message": message}
        )
        await self.write(
            {
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request["request_id"], "response": decision},
            }
        )

    async def read_until(self, stop: Callable[[Event], bool], timeout: float) -> list[Event]:
        """Read stdout lines until one satisfies `stop`; returns the lines read (the matching one last)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        read: list[Event] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"CLI: no matching line within {timeout} s; read: "
                    + "\n".join(json.dumps(e)[:300] for e in read[-20:])
                    + f"\nstderr: {self.stderr[-2000:]}"
                )
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except asyncio.TimeoutError:
                continue
            if not line:
                await self.proc.wait()
                raise AssertionError(
                    f"CLI exited ({self.proc.returncode}) before a matching line; read: "
                    + "\n".join(json.dumps(e)[:300] for e in read[-20:])
                    + f"\nstderr: {self.stderr[-2000:]}"
                )
            event = _parse_lines(line)[0] if line.strip() else None
            if event is None:
                continue
            self.events.append(event)
            read.append(event)
            if stop(event):
                return read

    async def close(self, timeout: float = 10.0) -> int:
        """Close stdin (the CLI ends after the current turn), then terminate it if it lingers."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return await self.kill()

    async def kill(self) -> int:
        """Terminate the CLI now, with its process group and its descendants (running tools)."""
        await _terminate_group(self.proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stderr_task, 5)
        assert self.proc.returncode is not None
        return self.proc.returncode


def _is_response_to(event: Event, request_id: str) -> bool:
    return event.get("type") == "control_response" and event.get("response", {}).get("request_id") == request_id


def is_result(event: Event) -> bool:
    return event.get("type") == "result"
