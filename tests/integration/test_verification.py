"""Emoji verification inside a running daemon, through its control socket (real Synapse, real CLI, scripted model,
and a person on matrix-js-sdk's Rust crypto as Element has it): the socket streams the emoji the person sees, the
operator confirms them, and at once, with no restart, the person's device and identity count where
trust = "verified"; the console's verification screen shows the same emoji and `y` verifies them; the bot starts
one with a person's device, and a no-match records nothing."""

import asyncio
from typing import Any

import pytest
from textual.widgets import DataTable, Static

from aiagentchat.console import Console
from tests.harness.js_person import JsPersonError
from tests.integration.conftest import same_sas
from tests.integration.test_console import until
from tests.integration.test_control import control, room_of
from tests.integration.test_cross_signing import element_asks, element_room
from tests.integration.test_e2e import bot_device_id
from tests.test_control import verification

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def printed(state: dict[str, Any]) -> str:
    """The emoji and numbers of a verification's state, as `aiagentchat verify` prints them."""
    emoji = "   ".join(symbol for symbol, _ in state["emoji"])
    return f"{emoji}\n  numbers: {' '.join(str(number) for number in state['decimals'])}"


def finished(state: dict[str, Any]) -> bool:
    return state["phase"] in ("verified", "failed")


async def emoji_shown(client, person: asyncio.Task) -> dict[str, Any]:
    """The verification's state once it shows its emoji (or failed); at once an error when the person's side of it
    ended first (declined, say)."""
    shown = asyncio.create_task(client.until(verification(lambda v: v["phase"] in ("comparing", "failed")), 180))
    done, _ = await asyncio.wait([shown, person], return_when=asyncio.FIRST_COMPLETED)
    if shown not in done:
        shown.cancel()
        raise AssertionError(f"the person's side ended before the emoji were shown: {person.exception()!r}")
    state = shown.result()["verification"]
    assert state["phase"] == "comparing", state["lines"]
    return state


async def refused_until_verified(world, people):
    """A person on Element, cross-signed, in a room with trust = "verified" whose first prompt is refused."""
    person = await people(world.user.user_id, world.user_password, "element")
    await person.bootstrap_cross_signing(world.user_password)
    room, daemon = await element_room(world, person, trust="verified")
    refused = await person.send_text(room, "say before verification")
    entry = await daemon.wait_for_log("prompt_ignored", event_id=refused, timeout=90)
    assert f"{world.user.user_id}'s identity is not verified by me" in entry["reason"]
    return person, room, daemon


async def test_a_person_verifies_the_running_bot_from_element_and_the_console_confirms_the_same_emoji(world, people):
    person, room, daemon = await refused_until_verified(world, people)
    async with control(world) as client:
        subscribed = await client.ask({"op": "subscribe", "id": 1})
        [summary] = subscribed["rooms"]
        assert summary["trust"] == {"policy": "verified", "unverified": [world.user.user_id]}
        assert (await client.ask({"op": "verify", "timeout": 240, "id": 2}))["outcome"] == "started"

        verifying = asyncio.create_task(person.verify_device(world.bot_id, bot_device_id(world), timeout=240))
        state = await emoji_shown(client, verifying)
        assert len(state["emoji"]) == 7 and len(state["decimals"]) == 3
        assert (await client.ask({"op": "verify_confirm", "match": True, "id": 3}))["outcome"] == "confirmed"
        shown = await verifying
        assert same_sas(shown, printed(state))  # the person saw what the console showed
        ended = (await client.until(verification(finished), timeout=120))["verification"]
        assert ended["phase"] == "verified", ended["lines"]
        assert f"✅ Verified {world.user.user_id}'s identity" in "\n".join(ended["lines"])
        await client.until(room_of(room, lambda r: r["trust"]["unverified"] == []), timeout=60)

    _, answer = await element_asks(world, person, room, "say verified while running")  # no restart
    assert answer["content"]["org.aiagentchat"]["final"]["ok"] is True
    assert "verified while running" in answer["content"]["body"]
    assert daemon.logged("operator_action", action="verify_confirm")


async def test_the_console_starts_a_verification_with_a_persons_device_and_a_no_match_records_nothing(world, people):
    person, room, daemon = await refused_until_verified(world, people)
    async with control(world) as client:
        await client.ask({"op": "subscribe", "id": 1})
        start = {"op": "verify", "user": world.user.user_id, "device": person.device_id, "timeout": 240, "id": 2}
        assert (await client.ask(start))["outcome"] == "started"
        accepting = asyncio.create_task(person.accept_verification(world.bot_id, timeout=240))
        await emoji_shown(client, accepting)
        assert (await client.ask({"op": "verify_confirm", "match": False, "id": 3}))["outcome"] == "denied"
        ended = (await client.until(verification(finished), timeout=120))["verification"]
        assert ended["phase"] == "failed" and "do not match" in ended["lines"][-1]
        with pytest.raises(JsPersonError) as there:
            await accepting  # the person is told it was not a match
        assert "got no answer" not in str(there.value)

        again = await client.ask({"op": "snapshot", "id": 4})
        assert again["rooms"][0]["trust"]["unverified"] == [world.user.user_id]
    refused = await person.send_text(room, "say still refused")
    await daemon.wait_for_log("prompt_ignored", event_id=refused, timeout=90)


async def test_the_console_shows_the_emoji_the_person_sees_and_y_verifies_them(world, people):
    person, _room, _daemon = await refused_until_verified(world, people)
    app = Console(world.tmp_path / "data" / "control.sock")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.query_one("#rooms", DataTable).row_count == 1)
        assert str(app.query_one("#rooms", DataTable).get_row_at(0)[5]) == "1 unverified"
        await pilot.press("v", "enter")  # nothing typed: wait for the person to start it
        await until(pilot, lambda: app.verification is not None and app.verification["phase"] == "waiting")
        verifying = asyncio.create_task(person.verify_device(world.bot_id, bot_device_id(world), timeout=240))
        await until(pilot, lambda: app.verification["phase"] in ("comparing", "failed") or verifying.done(), 180)
        state = app.verification
        assert state["phase"] == "comparing", (state["lines"], verifying)
        progress = str(app.screen.query_one("#progress", Static).render())
        assert all(name in progress for _, name in state["emoji"]), progress
        await pilot.press("y")
        shown = await verifying
        assert same_sas(shown, printed(state))
        await until(pilot, lambda: app.verification["phase"] in ("verified", "failed"), 120)
        assert app.verification["phase"] == "verified", app.verification["lines"]
        await until(pilot, lambda: str(app.query_one("#rooms", DataTable).get_row_at(0)[5]) == "✓", 60)


async def test_a_verification_cancelled_from_the_console_ends_on_the_persons_side_too(world, people):
    person, _room, _daemon = await refused_until_verified(world, people)
    async with control(world) as client:
        await client.ask({"op": "subscribe", "id": 1})
        start = {"op": "verify", "user": world.user.user_id, "device": person.device_id, "timeout": 240, "id": 2}
        await client.ask(start)
        accepting = asyncio.create_task(person.accept_verification(world.bot_id, timeout=90))
        await emoji_shown(client, accepting)
        assert (await client.ask({"op": "verify_cancel", "id": 3}))["outcome"] == "cancelled"
        with pytest.raises(JsPersonError) as there:
            await accepting
        assert "got no answer" not in str(there.value)  # told, not left waiting
