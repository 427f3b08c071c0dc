"""(3) Throughput: an agent that floods stream-json as fast as it can (the fake CLI copying a generated file).

- In process (`bench.pipeline`, its own process per run): parser + batcher MB/s, CPU s/MB and peak memory,
  with an instant sender that checks every body.
- End to end: the daemon as a subprocess, Synapse, and the user's client reading the room; daemon CPU s/MB
  and peak RSS from /proc, and the same check on what the room received.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import FAKE_CLAUDE
from bench.pipeline import UNCAPPED, PipelineRun
from bench.procstat import Usage, rss_mib, watch
from bench.profile import Profiler, maybe
from bench.streamgen import Verifier, write_flood
from bench.world import Homeserver, final_marker, run_final
from tests.integration.conftest import bot_events

E2E_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Flood:
    path: Path
    numbers: int

    @property
    def megabytes(self) -> float:
        return self.path.stat().st_size / 1e6


def flood(scratch: Path, megabytes: float) -> Flood:
    path = scratch / f"flood-{megabytes:g}mb.jsonl"
    return Flood(path, write_flood(path, megabytes))


async def in_process(source: Flood, profiler: Profiler | None = None, live: bool = False) -> PipelineRun:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.pipeline", str(source.path), str(source.numbers), *(["--live"] if live else []),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    async with maybe(profiler, proc.pid, f"parser + batcher in process, {source.megabytes:.0f} MB"):
        out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.pipeline failed with exit code {proc.returncode}")
    return PipelineRun(**json.loads(out.decode().strip().splitlines()[-1]))


@dataclass(frozen=True)
class EndToEnd:
    megabytes: float
    wall_s: float
    idle_rss_mib: float
    usage: Usage
    events: int
    verdict: str
    final_ok: bool


async def end_to_end(server: Homeserver, sources: list[Flood]) -> list[EndToEnd]:
    """One daemon, one room; each flood is one prompt, measured on its own."""
    user = await server.person()
    bot = await server.account("bot")
    room = await user.create_room(invite=[bot[0]])
    daemon = server.daemon(  # the output cap lifted, so that every line's arrival can be checked
        "throughput", bot, [room], user.user_id, {"binary": str(FAKE_CLAUDE)}, {"max_run_bytes": UNCAPPED}
    )
    await daemon.start()
    assert daemon.proc is not None
    runs = []
    for source in sources:
        idle = await _settled_rss(daemon.proc.pid)
        start = time.monotonic()
        async with watch(daemon.proc.pid) as usage:
            prompt_id = await user.send_text(room, f"flood {source.path}")
            events = await user.wait_for(run_final(prompt_id), timeout=E2E_TIMEOUT_S, room_id=room)
        verifier = Verifier(source.numbers)
        mine = bot_events(events, prompt_id)
        for event in mine:
            verifier.feed(event["content"]["body"])
        runs.append(EndToEnd(source.megabytes, time.monotonic() - start, idle, usage, len(mine),
                             verifier.verdict(), bool(final_marker(events, prompt_id)["ok"])))
    await daemon.stop()
    return runs


async def _settled_rss(pid: int) -> float:
    """The daemon's RSS once a previous run's garbage is gone."""
    await asyncio.sleep(3.0)
    return rss_mib(pid)
