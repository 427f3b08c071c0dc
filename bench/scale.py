"""(5) Scale and (6) start-up: one daemon serving 100 rooms with the fake CLI (so the CLI's own memory does not
count), N of them active at once, then restarted with its persisted sync token.

For each N: every active room gets a prompt that streams lines for a while (`drip`). Dispatch is the time from
the prompt's arrival in the daemon's sync (`synced_at` of `prompt_accepted`) to its agent process having
started (`agent_started`); sync lag is from the prompt's `origin_server_ts` to that arrival. Idle agents close
after 2 s, so every round starts its processes afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.procstat import Usage, rss_mib, watch
from bench.world import FAKE_CLAUDE, Homeserver, log_entry, log_time, run_final
from tests.harness.matrix_user import Event, MatrixUser
from tests.integration.daemon import Daemon

IDLE_CLOSE_S = 2.0
ROUND_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ScaleRound:
    rooms: int
    usage: Usage
    dispatch_s: list[float]
    sync_lag_s: list[float]
    wall_s: float


@dataclass(frozen=True)
class StartUp:
    rooms: int
    ready_s: list[float]
    logged_in_s: list[float]


@dataclass(frozen=True)
class Scale:
    idle_rss_mib: float
    rounds: list[ScaleRound]
    startup: StartUp


def _all_final(prompt_ids: list[str]) -> Callable[[list[Event]], bool]:
    checks = [run_final(prompt_id) for prompt_id in prompt_ids]
    return lambda events: all(check(events) for check in checks)


async def _round(user: MatrixUser, daemon: Daemon, rooms: list[str], prompt: str) -> ScaleRound:
    assert daemon.proc is not None
    start = time.monotonic()
    async with watch(daemon.proc.pid) as usage:
        prompt_ids = await asyncio.gather(*(user.send_text(room, prompt) for room in rooms))
        await user.wait_for(_all_final(list(prompt_ids)), timeout=ROUND_TIMEOUT_S)
    sent_at = {event["event_id"]: event["origin_server_ts"] / 1000 for event in user.events}
    dispatch, lag = [], []
    for prompt_id in prompt_ids:
        synced_at = log_entry(daemon, "prompt_accepted", event_id=prompt_id)["synced_at"]
        dispatch.append(log_time(log_entry(daemon, "agent_started", run_id=prompt_id)) - synced_at)
        lag.append(synced_at - sent_at[prompt_id])
    return ScaleRound(len(rooms), usage, dispatch, lag, time.monotonic() - start)


async def _startups(daemon: Daemon, runs: int, rooms: int) -> StartUp:
    ready, logged_in = [], []
    for _ in range(runs):
        await daemon.stop()
        start_wall, start = time.time(), time.monotonic()
        await daemon.start()
        ready.append(time.monotonic() - start)
        logged_in.append(log_time(log_entry(daemon, "logged_in")) - start_wall)
    return StartUp(rooms, ready, logged_in)


async def measure(server: Homeserver, sizes: list[int], lines: int, interval_ms: int, startup_runs: int) -> Scale:
    user = await server.person()
    bot = await server.account("bot")
    rooms = [await user.create_room(invite=[bot[0]]) for _ in range(max(sizes))]
    claude = {"binary": str(FAKE_CLAUDE), "idle_close_s": IDLE_CLOSE_S}
    daemon = server.daemon("scale", bot, rooms, user.user_id, claude)
    await daemon.start()
    assert daemon.proc is not None
    await asyncio.sleep(IDLE_CLOSE_S)
    idle = rss_mib(daemon.proc.pid)
    rounds = []
    for size in sizes:
        rounds.append(await _round(user, daemon, rooms[:size], f"drip {lines} {interval_ms}"))
        await asyncio.sleep(IDLE_CLOSE_S + 2.0)  # every agent closed: the next round starts them afresh
    startup = await _startups(daemon, startup_runs, len(rooms))
    await daemon.stop()
    return Scale(idle, rounds, startup)
