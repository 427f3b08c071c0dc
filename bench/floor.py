"""(1) The floor: the homeserver's own round trip between two nio clients, and the CLI's own time from a
written prompt to its first text, cold (new process) and warm (a live process that has answered before).

The CLI is driven by the daemon's own AgentProcess, so its flags and initialise handshake are the daemon's.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiagentchat.runner import AgentProcess
from aiagentchat.sandbox import prepare_home, wall_for
from aiagentchat.settings import ClaudeSettings
from bench.world import Homeserver
from tests.harness import claude_binary
from tests.harness.matrix_user import MatrixUser, body

POLL_IN_FLIGHT_S = 0.1  # the receiver's long poll is running when the message is sent
PROMPT = {"type": "user", "message": {"role": "user", "content": "say first words of the answer"}}


@dataclass(frozen=True)
class Floor:
    matrix_s: list[float]
    cli_cold_s: list[float]
    cli_warm_s: list[float]


async def _one_trip(sender: MatrixUser, receiver: MatrixUser, room: str) -> float:
    text = f"floor {secrets.token_hex(4)}"
    waiter = asyncio.create_task(
        receiver.wait_for(lambda events: any(body(e) == text for e in events), timeout=30, room_id=room)
    )
    await asyncio.sleep(POLL_IN_FLIGHT_S)
    start = time.monotonic()
    await sender.send_text(room, text)
    await waiter
    return time.monotonic() - start


async def matrix_round_trips(server: Homeserver, runs: int) -> list[float]:
    """Message from one plain nio client to another's sync, through the same Synapse."""
    alice, bob = await server.person("alice"), await server.person("bob")
    room = await alice.create_room(invite=[bob.user_id])
    await bob.wait_for(lambda _: room in bob.invites, timeout=30)
    await bob.join(room)
    return [await _one_trip(alice, bob, room) for _ in range(runs)]


def _is_text(event: dict[str, Any]) -> bool:
    inner = event.get("event") or {}
    return event.get("type") == "stream_event" and (inner.get("delta") or {}).get("type") == "text_delta"


async def _next_text(agent: AgentProcess) -> None:
    while not _is_text(await agent.next_event()):
        pass


async def _until_result(agent: AgentProcess) -> None:
    while (await agent.next_event()).get("type") != "result":
        pass


async def _warm_turns(agent: AgentProcess, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.monotonic()
        await agent.write(PROMPT)
        await _next_text(agent)
        samples.append(time.monotonic() - start)
        await _until_result(agent)
    return samples


async def cli_first_text(
    workdir: Path, cold_runs: int, warm_runs: int, *, wall_home: Path | None = None
) -> tuple[list[float], list[float]]:
    """Cold: process start (spawn, initialise, prompt) to the first text line. Warm: prompt written to a live
    process to its first text line. The warm turns run in the first cold run's process. With `wall_home`, each
    process runs in a room's sandbox with that home, as the daemon starts it; without, unsandboxed."""
    claude = ClaudeSettings(binary=claude_binary())
    cold: list[float] = []
    warm: list[float] = []
    for run in range(cold_runs):
        directory = workdir / f"cold{run}"
        directory.mkdir(parents=True)
        wall = wall_for(claude, directory, wall_home, Path.home()) if wall_home is not None else None
        if wall is not None:
            prepare_home(wall)
        start = time.monotonic()
        agent = await AgentProcess.start(claude, directory, None, 0, "bench", wall)
        await agent.write(PROMPT)
        await _next_text(agent)
        cold.append(time.monotonic() - start)
        await _until_result(agent)
        if run == 0:
            warm = await _warm_turns(agent, warm_runs)
        await agent.close(wait_s=5.0)
    return cold, warm


async def measure(server: Homeserver, workdir: Path, matrix_runs: int, cold_runs: int, warm_runs: int) -> Floor:
    matrix = await matrix_round_trips(server, matrix_runs)
    cold, warm = await cli_first_text(workdir, cold_runs, warm_runs, wall_home=workdir / "home")  # as the daemon
    return Floor(matrix, cold, warm)
