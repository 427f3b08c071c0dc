"""The control socket of a real daemon (real Synapse, real CLI, scripted model): a stop sent through it ends the
run and the room is told who stopped it; an approval allowed through it lets the run go on."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import bot_text, run_ended
from tests.integration.test_approval import asked
from tests.test_control import Line

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@contextlib.asynccontextmanager
async def control(world) -> AsyncIterator[Line]:
    line = Line(*await asyncio.open_unix_connection(str(world.tmp_path / "data" / "control.sock")))
    try:
        yield line
    finally:
        await line.close()


def room_of(room_id: str, check) -> Any:
    """Accepts a stream line that is `room_id`'s summary and satisfies `check`."""
    return lambda message: message["type"] == "room" and message["room"]["id"] == room_id and check(message["room"])


async def test_a_stop_through_the_socket_ends_the_run_and_the_room_is_told_the_operator_stopped_it(world):
    room = await world.room()
    await world.daemon([{"id": room, "name": "ops"}]).start()
    async with control(world) as client:
        subscribed = await client.ask({"op": "subscribe", "id": 1})
        assert [(r["id"], r["name"], r["state"]) for r in subscribed["rooms"]] == [(room, "ops", "idle")]

        prompt = await world.user.send_text(room, "bash echo started; sleep 30")
        running = await client.until(
            room_of(room, lambda r: r["running"] is not None and r["running"]["tools"]), timeout=60
        )
        assert running["room"]["state"] == "running" and running["room"]["running"]["prompt"] == prompt
        assert running["room"]["running"]["tools"] == ["🔧 Bash: `echo started; sleep 30`"]

        assert (await client.ask({"op": "stop", "room": room, "id": "stop"}))["outcome"] == "stopping"
        end = await client.until(lambda m: m["type"] == "end" and m["prompt"] == prompt, timeout=30)
        assert end["state"] == "failed" and end["final"]["result"] == "stopped by the operator"
        idle = await client.until(room_of(room, lambda r: r["running"] is None))
        assert idle["room"]["state"] == "idle"

    events = await world.user.wait_for(run_ended(prompt), timeout=30, room_id=room)
    assert "🛑 Stopped by the operator; stopping the agent." in bot_text(events, prompt, status=True)
    assert world.daemons[0].logged("operator_action", room_id=room, action="stop")


async def test_an_approval_allowed_through_the_socket_lets_the_run_go_on(world):
    room = await world.room()
    workdir: Path = world.tmp_path / "work"
    workdir.mkdir()
    await world.daemon([{"id": room, "workdir": str(workdir)}]).start()
    made = workdir / "made.txt"
    async with control(world) as client:
        await client.ask({"op": "subscribe", "id": 1})
        prompt, _request = await asked(world, room, "bash touch made.txt")
        waiting = await client.until(room_of(room, lambda r: r["approval"] is not None), timeout=30)
        approval = waiting["room"]["approval"]
        assert waiting["room"]["state"] == "waiting" and approval["tool"] == "Bash"
        assert approval["what"] == "Bash `touch made.txt`" and "touch made.txt" in approval["details"]
        assert not made.exists()

        answer = {"op": "answer", "room": room, "approval": approval["key"], "verdict": "allow", "id": "yes"}
        assert (await client.ask(answer))["outcome"] == "allow"
        end = await client.until(lambda m: m["type"] == "end" and m["prompt"] == prompt, timeout=60)
        assert end["state"] == "done"

    events = await world.user.wait_for(run_ended(prompt), timeout=30, room_id=room)
    assert "✅ Bash `touch made.txt` allowed once by the operator." in bot_text(events, prompt, status=True)
    assert made.exists()
