"""Sampling profiles of a running process with py-spy (`--profile`), summarised for results.md: where the
samples were (by module, the frame on top), and the project's functions most often on the stack."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

PY_SPY = Path(sys.executable).with_name("py-spy")
RATE_HZ = 100
ATTACH_S = 0.3
TOP = 12
PROJECT = "aiagentchat/"


@dataclass(frozen=True)
class Profile:
    name: str
    samples: int
    modules: list[tuple[str, int]]  # samples by the module of the frame on top
    top_lines: list[tuple[str, int]]  # samples by the frame on top, with its line
    functions: list[tuple[str, int]]  # samples with the project's function anywhere on the stack

    def lines(self) -> list[str]:
        rows = [f"### Profile: {self.name} ({self.samples} samples at {RATE_HZ} Hz, active threads only)", "",
                "| on top of the stack (module) | share |", "|---|---|"]
        rows += [f"| `{module}` | {100 * count / self.samples:.0f}% |" for module, count in self.modules]
        rows += ["", "| hottest lines (frame on top) | share |", "|---|---|"]
        rows += [f"| `{frame}` | {100 * count / self.samples:.0f}% |" for frame, count in self.top_lines]
        rows += ["", "| project function on the stack | share |", "|---|---|"]
        rows += [f"| `{frame}` | {100 * count / self.samples:.0f}% |" for frame, count in self.functions]
        return [*rows, ""]


def _module(frame: str) -> str:
    """`Batcher._accept (aiagentchat/batcher.py:214)` → `aiagentchat/batcher.py`; stdlib and site-packages
    frames by their package (`markdown_it`, `asyncio`, `json`)."""
    path = _without_line(frame).rpartition("(")[2].rstrip(")")
    if path.startswith(PROJECT):
        return path
    return "imports" if path.startswith("<frozen") else path.split("/")[0] or "other"


def _without_line(frame: str) -> str:
    """`Batcher._accept (aiagentchat/batcher.py:214)` → `Batcher._accept (aiagentchat/batcher.py)`."""
    return frame.rpartition(":")[0] + ")" if frame.endswith(")") and ":" in frame else frame


def summarise(name: str, collapsed: Path) -> Profile:
    """Read py-spy's raw (collapsed) output: `frame;frame;... count` per distinct stack."""
    modules: Counter[str] = Counter()
    tops: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames, count = stack.split(";"), int(count_text)
        total += count
        modules[_module(frames[-1])] += count
        tops[frames[-1]] += count
        for function in {_without_line(frame) for frame in frames if PROJECT in frame}:
            functions[function] += count
    return Profile(name, total, modules.most_common(TOP), tops.most_common(TOP // 2), functions.most_common(TOP))


class Profiler:
    """Records py-spy profiles of processes into `directory` while a block runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.profiles: list[Profile] = []

    @contextlib.asynccontextmanager
    async def recording(self, pid: int, name: str) -> AsyncIterator[None]:
        output = self.directory / f"{name}.collapsed"
        proc = await asyncio.create_subprocess_exec(
            str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
            "--rate", str(RATE_HZ), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(ATTACH_S)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            await proc.wait()
            if output.exists():
                self.profiles.append(summarise(name, output))


@contextlib.asynccontextmanager
async def maybe(profiler: Profiler | None, pid: int, name: str) -> AsyncIterator[None]:
    """`profiler.recording(pid, name)`, or nothing when not profiling."""
    if profiler is None:
        yield
        return
    async with profiler.recording(pid, name):
        yield
