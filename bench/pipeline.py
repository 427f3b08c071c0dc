"""Parser + batcher throughput in one process, the daemon's own code from the CLI's pipe to the sender.

`python -m bench.pipeline FLOOD_FILE NUMBERS [--live]` runs one prompt through a RoomWorker (a real CLI pipe,
read_lines, parse_line, Translator, Batcher with its 2 s interval, render) whose agent is the fake CLI copying
FLOOD_FILE to stdout as fast as it can; the sender is in-process and answers at once, checking every body as it
goes (with --live, a live status instead of streamed output: the answer's text lines are checked in the file
it comes as). Prints one JSON object: wall and CPU seconds, peak RSS, and the verdict. Run in its own process
so that its peak memory is its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiagentchat.approvals import RoomToolPolicy
from aiagentchat.batcher import Batcher
from aiagentchat.guard import ToolGuard
from aiagentchat.outbox import Outbox, SendFailed, SendOutcome, Sent
from aiagentchat.runner import RoomWorker
from aiagentchat.settings import ClaudeSettings
from aiagentchat.store import Prompt, Store
from bench import FAKE_CLAUDE
from bench.procstat import watch
from bench.streamgen import Verifier

ROOM = "!bench:localhost"
UNCAPPED = 10**12  # max_run_bytes that lets every byte of a flood into the room, so all of it can be checked


class CheckingSender:
    """Accepts every event at once and hands its body to the verifier; with `live`, the answer's file instead."""

    def __init__(self, verifier: Verifier, live: bool) -> None:
        self.verifier = verifier
        self.live = live
        self.events = 0

    async def send(
        self, room_id: str, content: dict[str, Any], txn_id: str, event_type: str = "m.room.message"
    ) -> SendOutcome:
        self.events += 1
        if content.get("msgtype") == "m.text" and not self.live:
            self.verifier.feed(content["body"])
        return Sent(f"$event{self.events}")

    async def redact(self, room_id: str, event_id: str, txn_id: str) -> SendOutcome:
        return SendFailed("the benchmark's rooms have no reactions to take back", retryable=False)

    async def upload(self, room_id: str, path: Path, mimetype: str) -> dict[str, Any] | SendOutcome:
        if not self.live:
            return SendFailed("no transcript is expected: the output cap is lifted", retryable=False)
        with path.open(encoding="utf-8") as answer:
            for chunk in iter(lambda: answer.read(1 << 16), ""):
                self.verifier.feed(chunk)
        return {"url": "mxc://bench/answer"}


@dataclass(frozen=True)
class PipelineRun:
    input_bytes: int
    wall_s: float
    cpu_s: float
    baseline_rss_mib: float
    peak_rss_mib: float
    events: int
    text_bytes: int
    verdict: str


async def run(flood: Path, numbers: int, live: bool = False) -> PipelineRun:
    with tempfile.TemporaryDirectory(prefix="aiagentchat-pipeline-") as scratch:
        data = Path(scratch)
        store = await Store.open(data / "bench.db")
        claude = ClaudeSettings(binary=str(FAKE_CLAUDE), env_passthrough=["PATH"])
        verifier = Verifier(numbers, text_only=live)
        sender = CheckingSender(verifier, live)
        batcher = Batcher(ROOM, Outbox(ROOM, sender, store), transcripts=data / "transcripts", max_run_bytes=UNCAPPED,
                          live_status=live)
        worker = RoomWorker(ROOM, claude, data / "work", store, batcher, RoomToolPolicy(claude),
                            ToolGuard(data, data / "work", False))
        sending = asyncio.create_task(batcher.run())
        async with watch(os.getpid()) as usage:
            await worker.handle(Prompt(ROOM, "$prompt", "@user:localhost", f"flood {flood}"))
            await batcher.close()
        await sending
        if worker.agent is not None:
            await worker.agent.close(wait_s=2.0)
        await store.close()
    return PipelineRun(flood.stat().st_size, usage.wall_s, usage.cpu_s, usage.start_rss_mib, usage.peak_rss_mib,
                       sender.events, verifier.text_bytes, verifier.verdict())


def main() -> None:
    result = asyncio.run(run(Path(sys.argv[1]), int(sys.argv[2]), live=sys.argv[3:] == ["--live"]))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
