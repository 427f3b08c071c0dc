"""Ending an agent process and everything it started, including children that left its process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None when there is no such process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after the last ')' are fixed.
    return stat.rsplit(")", 1)[1].split()


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process for good, even
    after the pid is reused. None when there is no such living process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def kill_leftover(pid: int, started: int) -> bool:
    """SIGKILL a process that an earlier daemon left running (its group and every descendant), if `pid` is
    still the process that started at `started`; True if it was."""
    if start_time(pid) != started:
        return False
    _signal_all(pid, descendants(pid), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return True


def descendants(pid: int) -> list[int]:
    """Every living process below `pid`, whatever its session or process group (the Bash tool uses setsid)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (parent := _parent_of(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal_all(group: int, pids: list[int], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def terminate_tree(proc: asyncio.subprocess.Process, wait_s: float) -> None:
    """SIGTERM the process, its group and all its descendants; SIGKILL whatever is left after `wait_s`."""
    # Once the process is reaped its pid may be reused: then only its process group still names our orphans.
    tree = descendants(proc.pid) if proc.returncode is None else []
    _signal_all(proc.pid, tree, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            await proc.wait()
    if proc.returncode is None:
        tree += [pid for pid in descendants(proc.pid) if pid not in tree]
    _signal_all(proc.pid, tree, signal.SIGKILL)
    await proc.wait()
