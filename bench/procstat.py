"""Resident memory and CPU time of one process, read from /proc, and a sampler for its peak RSS."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.05


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process itself (its children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Usage:
    """A process's peak RSS and CPU seconds over a window."""

    start_rss_mib: float
    peak_rss_mib: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


@contextlib.asynccontextmanager
async def watch(pid: int) -> AsyncIterator[Usage]:
    """Sample `pid`'s RSS every 50 ms while the block runs; CPU and wall time cover the block."""
    loop = asyncio.get_running_loop()
    usage = Usage(rss_mib(pid))
    cpu0, wall0 = cpu_s(pid), loop.time()

    async def sample() -> None:
        while True:
            usage.peak_rss_mib = max(usage.peak_rss_mib, rss_mib(pid))
            await asyncio.sleep(SAMPLE_S)

    sampler = asyncio.create_task(sample())
    try:
        yield usage
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        usage.peak_rss_mib = max(usage.peak_rss_mib, rss_mib(pid))
        usage.cpu_s = cpu_s(pid) - cpu0
        usage.wall_s = loop.time() - wall0
