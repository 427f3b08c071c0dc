"""The console without a homeserver: its screenshot in the README (docs/console.svg) is rendered here from a
fixed state and must match (AIAGENTCHAT_WRITE_SCREENSHOT=1 rewrites it); deny with a reason and drop through a
control socket served in-process; the lines it writes."""

import asyncio
import os
from pathlib import Path

import pytest
from textual.widgets import DataTable

from aiagentchat.approvals import Pending
from aiagentchat.console import Console, log_line, state_text
from aiagentchat.control import OPERATOR
from tests.test_control import ROOM, prompt, served

pytestmark = pytest.mark.anyio
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "console.svg"
NOW = 1_764_500_000.0
ROOMS = [
    {
        "id": "!web:example.org",
        "name": "website",
        "state": "waiting",
        "refused": None,
        "model": "sonnet",
        "cost_today": 0.4213,
        "budget": 5.0,
        "running": {
            "prompt": "$run1",
            "sender": "@ada:example.org",
            "text": "Fix the failing test in checkout and run the suite",
            "since": NOW - 95,
            "tools": ["🔧 Read: `src/checkout.py`", "🔧 Edit: `src/checkout.py`", "🔧 Bash: `pytest -q tests/`"],
            "activity": "✍️ The fix is in; running the tests now.",
        },
        "queue": [
            {"prompt": "$q1", "sender": "@ada:example.org", "text": "Then update the changelog"},
            {"prompt": "$q2", "sender": "@bob:example.org", "text": "Bump the version to 2.4.1"},
        ],
        "approval": {
            "key": "k1",
            "prompt": "$run1",
            "tool": "Bash",
            "what": "Bash `pytest -q tests/`",
            "details": "```sh\npytest -q tests/\n```\nrun it",
            "question": False,
            "always": "Bash commands starting with `pytest`",
            "asked_at": NOW - 12,
        },
    },
    {
        "id": "!infra:example.org",
        "name": "infra",
        "state": "running",
        "refused": None,
        "model": None,
        "cost_today": 1.5,
        "budget": None,
        "running": {
            "prompt": "$run2",
            "sender": "@bob:example.org",
            "text": "Check the disk usage",
            "since": NOW - 8,
            "tools": ["🔧 Bash: `df -h`"],
            "activity": "",
        },
        "queue": [],
        "approval": None,
    },
    {
        "id": "!docs:example.org",
        "name": "docs",
        "state": "refused",
        "refused": "budget spent",
        "model": None,
        "cost_today": 2.0,
        "budget": 2.0,
        "running": None,
        "queue": [],
        "approval": None,
    },
    {
        "id": "!lab:example.org",
        "name": "lab",
        "state": "idle",
        "refused": None,
        "model": "haiku",
        "cost_today": 0.0,
        "budget": None,
        "running": None,
        "queue": [],
        "approval": None,
    },
]
LOG = [
    {"timestamp": "2026-11-30T09:12:01.5Z", "level": "info", "event": "prompt_accepted", "sender": "@ada:example.org"},
    {"timestamp": "2026-11-30T09:12:02.1Z", "level": "info", "event": "run_started", "chars": 52},
    {"timestamp": "2026-11-30T09:13:25.0Z", "level": "info", "event": "approval_asked", "tool": "Bash"},
]


async def test_the_screenshot_in_the_readme_is_what_the_console_shows():
    app = Console(None, clock=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        app.load({"user_id": "@bot:example.org", "ready": True, "rooms": ROOMS})
        for record in LOG:
            app.add_log(record | {"room_id": "!web:example.org"})
        app.add_log(LOG[0] | {"room_id": "!infra:example.org", "event": "elsewhere"})
        await pilot.pause()
        svg = app.export_screenshot()
    assert "Approval&#160;needed:&#160;Bash" in svg and "elsewhere" not in svg
    if os.environ.get("AIAGENTCHAT_WRITE_SCREENSHOT") == "1":
        SCREENSHOT.write_text(svg)
    assert SCREENSHOT.read_text() == svg, (
        "the console changed: AIAGENTCHAT_WRITE_SCREENSHOT=1 rewrites docs/console.svg"
    )


async def test_deny_asks_for_a_reason_drop_takes_the_highlighted_queued_prompt_and_n_starts_anew(tmp_path):
    async with served(tmp_path) as (bot, path):
        worker, policy = bot.workers[ROOM], bot.policies[ROOM]
        worker.current, worker.current_since = prompt("$run"), NOW
        for event_id in ("$first", "$second"):
            queued = prompt(event_id, f"{event_id} text")
            await bot.store.add_prompt(queued)
            worker.inbox.put_nowait(queued)
        pending = policy.pending = Pending("$run", "Bash", {"command": "rm -rf build"}, False)
        app = Console(path)
        async with app.run_test(size=(80, 24)) as pilot:
            async with asyncio.timeout(10):
                while app.query_one("#queue", DataTable).row_count != 2:
                    await pilot.pause(0.05)
            await pilot.press("d")
            await pilot.press(*"not there")
            await pilot.press("enter")
            async with asyncio.timeout(10):
                answer = await asyncio.shield(pending.answer)
            assert (answer.verdict, answer.by, answer.text) == ("deny", OPERATOR, "not there")

            app.query_one("#queue", DataTable).focus()
            await pilot.press("down", "x")
            async with asyncio.timeout(10):
                while "$second" not in worker._dropped:
                    await pilot.pause(0.05)
            assert worker._dropped == {"$second": OPERATOR}

            await pilot.press("N")
            async with asyncio.timeout(10):
                while not worker.fresh:
                    await pilot.pause(0.05)


def test_a_rooms_state_and_a_log_line_in_words():
    assert [state_text(room, NOW) for room in ROOMS] == [
        "✋ waiting for approval",
        "▶ running for 8 s",
        "⛔ refused: budget spent",
        "idle",
    ]
    assert state_text(ROOMS[0] | {"state": "running"}, NOW) == "▶ running for 95 s"
    assert (
        log_line(LOG[1] | {"room_id": "!x", "logger": "aiagentchat.runner"}) == "09:12:02 info    run_started chars=52"
    )
