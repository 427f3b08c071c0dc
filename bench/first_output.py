"""(2) First output: a prompt posted by a user client until that client sees the bot's first event, through
the daemon and the real CLI with the scripted model. Warm: the room's agent process is alive; cold: the
room's first prompt starts it.

Warm prompts are spaced a little over the flush interval apart, as a person types: the batcher sends the
first output after a quiet interval at once, and anything sooner is coalesced on purpose.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.world import Homeserver, first_output, run_final
from tests.harness import claude_binary
from tests.harness.matrix_user import MatrixUser

PROMPT = "say first words of the answer"
QUIET_S = 2.5  # more than the 2 s flush interval
IDLE_CLOSE_S = 30.0
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class FirstOutput:
    cold_s: list[float]
    warm_s: list[float]


async def _one(user: MatrixUser, room: str) -> float:
    start = time.monotonic()
    prompt_id = await user.send_text(room, PROMPT)
    await user.wait_for(first_output(prompt_id), timeout=TIMEOUT_S, room_id=room)
    elapsed = time.monotonic() - start
    await user.wait_for(run_final(prompt_id), timeout=TIMEOUT_S, room_id=room)
    return elapsed


async def _warm(user: MatrixUser, room: str, runs: int) -> list[float]:
    await _one(user, room)  # starts the agent
    samples = []
    for _ in range(runs):
        await asyncio.sleep(QUIET_S)
        samples.append(await _one(user, room))
    return samples


async def measure(
    server: Homeserver, cold_runs: int, warm_runs: int, sandbox: str = "bwrap", name: str = "first-output"
) -> FirstOutput:
    user = await server.person()
    bot = await server.account("bot")
    rooms = [await user.create_room(invite=[bot[0]]) for _ in range(cold_runs + 1)]
    claude = {"binary": claude_binary(), "idle_close_s": IDLE_CLOSE_S, "sandbox": sandbox}
    daemon = server.daemon(name, bot, rooms, user.user_id, claude)
    await daemon.start()
    warm = await _warm(user, rooms[0], warm_runs)
    cold = [await _one(user, room) for room in rooms[1:]]
    await daemon.stop()
    return FirstOutput(cold, warm)
