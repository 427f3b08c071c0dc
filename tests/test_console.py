"""The console without a homeserver: its screenshot in the README (docs/console.svg) is rendered here from a
fixed state and must match (AIAGENTCHAT_WRITE_SCREENSHOT=1 rewrites it); deny with a reason and drop through a
control socket served in-process; the lines it writes."""

import asyncio
import os
from pathlib import Path

import pytest
from nio.crypto import OlmDevice
from textual.widgets import DataTable

from aiagentchat.approvals import Pending
from aiagentchat.console import Console, VerifyScreen, log_line, state_text, trust_text
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
        "trust": {"policy": "verified", "unverified": ["@bob:example.org"]},
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
        "trust": {"policy": "cross_signed", "unverified": []},
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
        "trust": None,
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
        "trust": None,
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
    assert [trust_text(room) for room in ROOMS] == ["1 unverified", "✓", "-", "-"]
    assert (
        log_line(LOG[1] | {"room_id": "!x", "logger": "aiagentchat.runner"}) == "09:12:02 info    run_started chars=52"
    )


class Shown:
    """What the Sas of a verification shows and whom it is with, for the console's screen."""

    other_olm_device = OlmDevice("@ada:example.org", "PHONE", {"ed25519": "k", "curve25519": "c"})

    def get_emoji(self) -> list[tuple[str, str]]:
        return [("🐶", "Dog"), ("🔑", "Key"), ("🎸", "Guitar"), ("🌵", "Cactus"), ("🚀", "Rocket"), ("⚓", "Anchor"),
                ("🍄", "Mushroom")]  # fmt: skip

    def get_decimals(self) -> tuple[int, int, int]:
        return (1234, 5678, 4321)


async def test_v_waits_for_a_verification_shows_its_emoji_confirms_with_y_and_escape_cancels_it(tmp_path):
    async with served(tmp_path) as (bot, path):
        app = Console(path)
        async with app.run_test(size=(80, 24)) as pilot:
            async with asyncio.timeout(10):
                while app.client is None or not app.rooms:
                    await pilot.pause(0.05)
            await pilot.press("v")
            assert isinstance(app.screen, VerifyScreen)
            await pilot.press("enter")  # nothing typed: wait for an allowed user's device
            async with asyncio.timeout(10):
                while bot.crypto.verification is None or app.verification is None:
                    await pilot.pause(0.05)
            verification = bot.control._verification
            decided = asyncio.create_task(verification._decide(Shown()))  # the emoji are established
            async with asyncio.timeout(10):
                while app.verification["phase"] != "comparing":
                    await pilot.pause(0.05)
            app.pop_screen()  # closed without a cancel (as by a console that detached) and opened again: the
            await pilot.press("v")  # emoji of the verification under way, and y answers them, not the target's input
            await pilot.pause()
            shown = str(app.screen.query_one("#progress").render())
            assert all(name in shown for name in ("Dog", "Guitar", "Mushroom")) and "🚀" in shown
            assert "numbers: 1234 5678 4321" in shown
            await pilot.press("y")
            async with asyncio.timeout(10):
                assert await decided is True

            await pilot.press("escape")
            async with asyncio.timeout(10):
                while app.verification["phase"] != "failed":
                    await pilot.pause(0.05)
            assert app.verification["lines"][-1] == "❌ Not verified: cancelled by the operator"
            assert not isinstance(app.screen, VerifyScreen) and bot.crypto.verification is None
