"""(5) Scale and (6) start-up: one daemon serving 100 rooms with the fake CLI (so the CLI's own memory does not
count), N of them active at once, then restarted with its persisted sync token.

For each N: every active room gets a prompt that streams lines for a while (`drip`), in the streamed output
mode; the largest round is run again with the rooms' default live status, by a second daemon of the same bot. Dispatch is the time from
the prompt's arrival in the daemon's sync (`synced_at` of `prompt_accepted`) to its agent process having
started (`agent_started`); sync lag is from the prompt's `origin_server_ts` to that arrival. Idle agents close
after 2 s, so every round starts its processes afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import FAKE_CLAUDE
from bench.procstat import Usage, rss_mib, watch
from bench.profile import Profiler, maybe
from bench.quiet import answer_events, checked
from bench.world import Homeserver, log_entry, log_time, run_final
from tests.harness.matrix_user import Event, MatrixUser
from tests.integration.daemon import Daemon

IDLE_CLOSE_S = 2.0
PHASES = ["synced", "prompt_accepted", "run_started", "agent_started"]
ROUND_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ScaleRound:
    rooms: int
    usage: Usage
    dispatch_s: list[float]
    sync_lag_s: list[float]
    wall_s: float
    phases_s: dict[str, list[float]]  # dispatch split at the daemon's log lines
    events: list[int]  # per answer, as `bench.quiet.answer_events` counts them


@dataclass(frozen=True)
class StartUp:
    rooms: int
    ready_s: list[float]
    logged_in_s: list[float]
    joins_s: list[float]  # a plain nio client joining every room again, one after another (all joined already)
    full_sync_s: list[float]  # a plain nio client's full-state sync since a token, in the same rooms


@dataclass(frozen=True)
class Scale:
    idle_rss_mib: float
    rounds: list[ScaleRound]
    startup: StartUp
    live: ScaleRound | None = None  # the largest round with live status; runs before it was measured have none


def _all_done(prompt_ids: list[str], bot: str) -> Callable[[list[Event]], bool]:
    checks = [check for prompt_id in prompt_ids for check in (run_final(prompt_id), checked(bot, prompt_id))]
    return lambda events: all(check(events) for check in checks)


async def _round(
    user: MatrixUser, daemon: Daemon, bot: str, rooms: list[str], prompt: str, profiler: Profiler | None
) -> ScaleRound:
    assert daemon.proc is not None
    start = time.monotonic()
    async with maybe(profiler, daemon.proc.pid, f"daemon, {len(rooms)} active rooms"), watch(daemon.proc.pid) as usage:
        prompt_ids = await asyncio.gather(*(user.send_text(room, prompt) for room in rooms))
        await user.wait_for(_all_done(list(prompt_ids), bot), timeout=ROUND_TIMEOUT_S)
    sent_at = {event["event_id"]: event["origin_server_ts"] / 1000 for event in user.events}
    marks = [_marks(daemon, prompt_id) for prompt_id in prompt_ids]
    phases = {
        f"{PHASES[n]} → {PHASES[n + 1]}": [mark[n + 1] - mark[n] for mark in marks] for n in range(len(PHASES) - 1)
    }
    dispatch = [mark[-1] - mark[0] for mark in marks]
    lag = [mark[0] - sent_at[prompt_id] for mark, prompt_id in zip(marks, prompt_ids)]
    events = [answer_events(user.events, bot, prompt_id) for prompt_id in prompt_ids]
    return ScaleRound(len(rooms), usage, dispatch, lag, time.monotonic() - start, phases, events)


def _marks(daemon: Daemon, prompt_id: str) -> list[float]:
    """When the prompt reached each of PHASES (Unix times)."""
    accepted = log_entry(daemon, "prompt_accepted", event_id=prompt_id)
    return [
        accepted["synced_at"],
        log_time(accepted),
        log_time(log_entry(daemon, "run_started", run_id=prompt_id)),
        log_time(log_entry(daemon, "agent_started", run_id=prompt_id)),
    ]


async def _startups(daemon: Daemon, runs: int, user: MatrixUser, rooms: list[str]) -> StartUp:
    ready, logged_in, joins, syncs = [], [], [], []
    for _ in range(runs):
        await daemon.stop()
        start_wall, start = time.time(), time.monotonic()
        await daemon.start()
        ready.append(time.monotonic() - start)
        logged_in.append(log_time(log_entry(daemon, "logged_in")) - start_wall)
        join, sync = await _client_costs(user, rooms)
        joins.append(join)
        syncs.append(sync)
    return StartUp(len(rooms), ready, logged_in, joins, syncs)


async def _client_costs(user: MatrixUser, rooms: list[str]) -> tuple[float, float]:
    """What a plain nio client pays for the two things the daemon does between login and ready: joining
    every configured room (all joined already) and one full-state sync since a token."""
    client = user.client
    assert client is not None
    start = time.monotonic()
    for room in rooms:
        await client.join(room)
    joined = time.monotonic()
    await client.sync(timeout=0, since=client.next_batch, full_state=True)
    return joined - start, time.monotonic() - joined


async def _profiled_startup(daemon: Daemon, rooms: int, profiler: Profiler) -> None:
    """One more start, not measured: py-spy attaches as soon as the process exists."""
    await daemon.stop()
    await daemon.launch()
    assert daemon.proc is not None
    async with profiler.recording(daemon.proc.pid, f"daemon start-up, {rooms} rooms"):
        await daemon.wait_for_log("ready", timeout=60)


async def measure(
    server: Homeserver, sizes: list[int], lines: int, interval_ms: int, startup_runs: int, profiler: Profiler | None
) -> Scale:
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
    prompt = f"drip {lines} {interval_ms}"
    for size in sizes:
        profiled = profiler if size == max(sizes) else None
        rounds.append(await _round(user, daemon, bot[0], rooms[:size], prompt, profiled))
        await asyncio.sleep(IDLE_CLOSE_S + 2.0)  # every agent closed: the next round starts them afresh
    startup = await _startups(daemon, startup_runs, user, rooms)
    if profiler is not None:
        await _profiled_startup(daemon, len(rooms), profiler)
    await daemon.stop()
    live = server.daemon("scale-live", bot, rooms, user.user_id, claude, live_status=True)
    await live.start()
    live_round = await _round(user, live, bot[0], rooms[: max(sizes)], prompt, None)
    await live.stop()
    return Scale(idle, rounds, startup, live_round)
