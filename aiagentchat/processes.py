"""Ending an agent process and everything it started, including children that left its process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _parent_of(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after the last ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[1])


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
        await asyncio.wait_for(proc.wait(), wait_s)
    if proc.returncode is None:
        tree += [pid for pid in descendants(proc.pid) if pid not in tree]
    _signal_all(proc.pid, tree, signal.SIGKILL)
    await proc.wait()
