"""(4) Rate-limited delivery: Synapse's default `rc_message` (0.2 events/s, burst 10, per account) and the real
CLI streaming numbered lines from the scripted model for about two minutes (`drip`).

What the room received is compared with what the model sent, line by line; 429s are counted from the daemon's
`rate_limited` log lines, and the tail is the time from the agent's last line (the daemon logging the run's
result) to the user's client seeing the run's last event.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from aiagentchat.render import content_size
from bench.world import Homeserver, final_marker, log_entry, log_time, run_final
from tests.harness import claude_binary
from tests.harness.model_server import numbered_lines
from tests.integration.conftest import bot_events

DEFAULT_RATE = 0.2
DEFAULT_BURST = 10
LINE_INTERVAL_MS = 100
ERROR_MARKS = ("⚠️", "❌")


@dataclass(frozen=True)
class RateLimited:
    lines: int
    events: int
    allowed_events: int
    body_bytes: int
    content_bytes: int
    rate_limited: int
    tail_s: float
    gaps_s: list[float]
    lost: int
    duplicated: int
    out_of_order: bool
    visible_errors: int
    final_ok: bool


def _check_lines(text: str, expected: list[str]) -> tuple[int, int, bool]:
    """Expected lines that never arrived, lines that arrived more often than sent (or were never sent, or
    arrived cut), and whether the order differs."""
    got = [line + "\n" for line in text.split("\n") if line.startswith("line ")]
    lost = Counter(expected) - Counter(got)
    extra = Counter(got) - Counter(expected)
    return sum(lost.values()), sum(extra.values()), got != expected


async def measure(server: Homeserver, seconds: float) -> RateLimited:
    user = await server.person()
    bot = await server.account("bot")
    room = await user.create_room(invite=[bot[0]])
    daemon = server.daemon("rate-limited", bot, [room], user.user_id, {"binary": claude_binary()})
    await daemon.start()
    count = int(seconds * 1000 / LINE_INTERVAL_MS)
    prompt_id = await user.send_text(room, f"drip {count} {LINE_INTERVAL_MS}")
    events = await user.wait_for(run_final(prompt_id), timeout=seconds * 5 + 120, room_id=room)
    seen_at = time.time()
    finished = log_time(log_entry(daemon, "run_finished", run_id=prompt_id))
    rate_limited = sum(1 for entry in daemon.logs if entry.get("event") == "rate_limited")
    await daemon.stop()
    mine = bot_events(events, prompt_id)
    stamps = [event["origin_server_ts"] / 1000 for event in mine]
    bodies = [event["content"]["body"] for event in mine]
    lost, duplicated, disordered = _check_lines("".join(bodies), numbered_lines(count))
    return RateLimited(
        lines=count,
        events=len(mine),
        allowed_events=DEFAULT_BURST + int(DEFAULT_RATE * (stamps[-1] - stamps[0])),
        body_bytes=sum(len(b.encode()) for b in bodies),
        content_bytes=sum(content_size(event["content"]) for event in mine),
        rate_limited=rate_limited,
        tail_s=seen_at - finished,
        gaps_s=[later - earlier for earlier, later in zip(stamps, stamps[1:])],
        lost=lost,
        duplicated=duplicated,
        out_of_order=disordered,
        visible_errors=sum(1 for b in bodies if any(mark in b for mark in ERROR_MARKS)),
        final_ok=bool(final_marker(events, prompt_id)["ok"]),
    )
