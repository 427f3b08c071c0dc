"""`aiagentchat console` driven by Textual's headless pilot against a real daemon (real Synapse, real CLI, scripted
model), at 80×24: a running prompt shows its tool lines and a stop from the console ends it, the room told who
stopped it; an approval allowed from the console lets the run go on."""

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.widgets import DataTable, RichLog, Static

from aiagentchat.console import Console
from tests.integration.conftest import bot_text, run_ended
from tests.integration.test_approval import asked

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def until(pilot, check: Callable[[], bool], timeout: float = 60) -> None:
    """Let the app run until `check` holds, at most `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not check():
            await pilot.pause(0.1)


def detail(app: Console) -> str:
    return str(app.query_one("#detail", Static).content)


def console(world) -> Console:
    return Console(world.tmp_path / "data" / "control.sock")


async def test_the_console_shows_a_running_prompts_tool_lines_and_stops_it_naming_the_operator(world):
    room = await world.room()
    await world.daemon([{"id": room, "name": "ops"}]).start()
    app = console(world)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.query_one("#rooms", DataTable).row_count == 1)
        prompt = await world.user.send_text(room, "bash echo started; sleep 30")
        await until(pilot, lambda: "🔧 Bash: `echo started; sleep 30`" in detail(app))
        assert "@" in detail(app) and ": bash echo started; sleep 30" in detail(app)
        assert str(app.query_one("#rooms", DataTable).get_row_at(0)[1]).startswith("▶ running for")
        await until(pilot, lambda: any("run_started" in str(line) for line in app.query_one("#log", RichLog).lines))

        await pilot.press("s")
        events = await world.user.wait_for(run_ended(prompt), timeout=30, room_id=room)
        await until(pilot, lambda: "Nothing is running." in detail(app))
    assert "🛑 Stopped by the operator; stopping the agent." in bot_text(events, prompt, status=True)


async def test_an_approval_allowed_from_the_console_lets_the_run_go_on(world):
    room = await world.room()
    workdir: Path = world.tmp_path / "work"
    workdir.mkdir()
    await world.daemon([{"id": room, "workdir": str(workdir)}]).start()
    app = console(world)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.query_one("#rooms", DataTable).row_count == 1)
        prompt, _request = await asked(world, room, "bash touch made.txt")
        await until(pilot, lambda: "✋ Approval needed: Bash `touch made.txt`" in detail(app))
        assert not (workdir / "made.txt").exists()
        await pilot.press("a")
        events = await world.user.wait_for(run_ended(prompt), timeout=60, room_id=room)
    assert "✅ Bash `touch made.txt` allowed once by the operator." in bot_text(events, prompt, status=True)
    assert (workdir / "made.txt").exists()
