"""Encrypted rooms end to end: a real Synapse, the daemon as a subprocess with its own crypto store, and real
nio devices of the user (tests/harness/e2e.py) that encrypt, withhold keys and verify."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness.e2e import E2EUser
from tests.integration.conftest import World, bot_events, bot_text, run_ended
from tests.integration.daemon import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

ENCRYPTION = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}


async def encrypted_room(world: World, user: E2EUser, **room: Any) -> tuple[str, Daemon]:
    """An encrypted room with the bot in it, served by a started daemon; the user knows the bot's device."""
    room_id = await user.create_room(invite=[world.bot_id], initial_state=[ENCRYPTION])
    daemon = world.daemon([{"id": room_id} | room])
    await daemon.start()
    await user.wait_for(lambda events: joined(events, world.bot_id), room_id=room_id)
    return room_id, daemon


def joined(events: list[dict[str, Any]], user_id: str) -> bool:
    return any(
        e.get("type") == "m.room.member" and e.get("state_key") == user_id and e["content"].get("membership") == "join"
        for e in events
    )


def bot_device_id(world: World) -> str:
    return json.loads((world.tmp_path / "data" / "credentials.json").read_text())["device_id"]


def run_ended_or_refused(prompt_id: str):
    """The bot's last word on a prompt: its run ended, or a notice that it will not run (final ok false)."""

    def ended(events: list[dict[str, Any]]) -> bool:
        return any("final" in e["content"]["org.aiagentchat"] for e in bot_events(events, prompt_id))

    return ended


async def ask(user: E2EUser, room: str, text: str, timeout: float = 60) -> tuple[str, list[dict[str, Any]]]:
    """Send an encrypted prompt; its id and the bot's (decrypted) events once the run ended."""
    prompt = await user.send_text(room, text)
    events = await user.wait_for(run_ended(prompt), timeout=timeout, room_id=room)
    return prompt, bot_events(events, prompt)


async def test_an_encrypted_prompt_is_answered_encrypted(world):
    user = await world.device()
    room, _ = await encrypted_room(world, user)
    prompt, answer = await ask(user, room, "say hello in private")
    assert "hello in private" in "".join(e["content"]["body"] for e in answer)
    assert "✅ Done" in answer[-1]["content"]["body"]
    for event_id in [prompt, *(e["event_id"] for e in answer)]:
        wire = await user.raw_event(room, event_id)
        assert wire["type"] == "m.room.encrypted", wire
        assert "body" not in wire["content"] and wire["content"]["algorithm"] == "m.megolm.v1.aes-sha2"
    assert {e["sender"] for e in answer} == {world.bot_id}


async def test_after_a_restart_the_same_device_decrypts_and_is_read(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    await ask(user, room, "say before the restart")
    device_id = bot_device_id(world)
    assert await daemon.stop() == 0

    while_down = await user.send_text(room, "say sent while the daemon was down")
    await daemon.start()
    events = await user.wait_for(run_ended(while_down), timeout=60, room_id=room)
    assert "sent while the daemon was down" in bot_text(events, while_down)
    _, answer = await ask(user, room, "say after the restart")
    assert "after the restart" in "".join(e["content"]["body"] for e in answer)
    assert bot_device_id(world) == device_id
    assert [d.id for d in user.client.olm.device_store.active_user_devices(world.bot_id)] == [device_id]
    assert not [entry for entry in daemon.logs if entry.get("event") == "waiting_for_room_key"]


async def test_a_second_device_of_the_user_reads_the_next_answer(world):
    first = await world.device()
    room, _ = await encrypted_room(world, first)
    await ask(first, room, "say only one device so far")
    second = await world.device()
    await second.sync_once()  # uploads its keys: the homeserver tells the bot about the new device
    prompt, _ = await ask(first, room, "say two devices now")
    events = await second.wait_for(run_ended(prompt), timeout=60, room_id=room)
    assert "two devices now" in bot_text(events, prompt)


async def test_a_room_key_that_comes_late_still_gets_the_prompt_answered(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    bot_device = await user.device_of(world.bot_id)
    withheld = await user.send_withholding(room, "say key came late", bot_device)
    await daemon.wait_for_log("waiting_for_room_key", event_id=withheld.event_id)
    await user.send_room_key(withheld, bot_device)
    events = await user.wait_for(run_ended(withheld.event_id), timeout=60, room_id=room)
    assert "key came late" in bot_text(events, withheld.event_id)


async def test_the_sender_can_answer_the_bots_key_request(world):
    user = await world.device()
    room, _ = await encrypted_room(world, user)
    bot_device = await user.device_of(world.bot_id)
    withheld = await user.send_withholding(room, "say forwarded key", bot_device)
    await user.wait_for(lambda _: user.key_requests(withheld.session_id) != [], timeout=30)
    [request] = user.key_requests(withheld.session_id)
    assert (request.sender, request.requesting_device_id, request.room_id) == (world.bot_id, bot_device.id, room)
    await user.forward_room_key(withheld, bot_device)
    events = await user.wait_for(run_ended(withheld.event_id), timeout=60, room_id=room)
    assert "forwarded key" in bot_text(events, withheld.event_id)


async def test_a_room_key_that_never_comes_gets_a_could_not_decrypt_notice(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user, key_wait_s=2)
    bot_device = await user.device_of(world.bot_id)
    withheld = await user.send_withholding(room, "say never decrypted", bot_device)
    events = await user.wait_for(run_ended_or_refused(withheld.event_id), timeout=30, room_id=room)
    [notice] = bot_events(events, withheld.event_id)
    body = notice["content"]["body"]
    assert "could not decrypt" in body and user.user_id in body and "send it again" in body
    assert notice["content"]["org.aiagentchat"]["final"]["ok"] is False
    await daemon.wait_for_log("room_key_never_arrived", event_id=withheld.event_id)
    assert user.key_requests(withheld.session_id) != []
    _, answer = await ask(user, room, "say the next one is fine")
    assert "the next one is fine" in "".join(e["content"]["body"] for e in answer)
