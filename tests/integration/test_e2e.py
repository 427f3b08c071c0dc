"""Encrypted rooms end to end: a real Synapse, the daemon as a subprocess with its own crypto store, and real
nio devices of the user (tests/harness/e2e.py) that encrypt, withhold keys and verify."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from tests.harness.e2e import E2EUser
from tests.integration.conftest import World, bot_events, bot_text, encrypted_room, run_ended
from tests.integration.daemon import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

def bot_device_id(world: World) -> str:
    return json.loads((world.tmp_path / "data" / "credentials.json").read_text())["device_id"]


def run_ended_or_refused(prompt_id: str):
    """The bot's last word on a prompt: its run ended, or a notice that it will not run (final ok false)."""

    def ended(events: list[dict[str, Any]]) -> bool:
        return any("final" in e["content"]["org.aiagentchat"] for e in bot_events(events, prompt_id))

    return ended


async def ask(user: E2EUser, room: str, text: str, timeout: float = 60) -> tuple[str, list[dict[str, Any]]]:
    """Send an encrypted prompt; its id and the bot's (decrypted) events, live status included, once the run
    ended."""
    prompt = await user.send_text(room, text)
    events = await user.wait_for(run_ended(prompt), timeout=timeout, room_id=room)
    return prompt, bot_events(events, prompt, status=True)


async def test_an_encrypted_prompt_is_answered_encrypted(world):
    user = await world.device()
    room, _ = await encrypted_room(world, user)
    prompt, answer = await ask(user, room, "say hello in private")
    assert "hello in private" in "".join(e["content"]["body"] for e in answer)
    assert answer[-1]["content"]["org.aiagentchat"]["final"]["ok"] is True
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


class Verify:
    """`aiagentchat verify` as a subprocess with the daemon's settings and environment."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = ""

    @classmethod
    async def start(cls, daemon: Daemon, *args: str) -> Verify:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiagentchat", "verify", *args, "--config", str(daemon.config), env=daemon.env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    async def read_until(self, text: str, timeout: float = 60) -> str:
        """Its output so far, once it contains `text`."""
        async with asyncio.timeout(timeout):
            while text not in self.out:
                line = await self.proc.stdout.readline()
                assert line, f"verify ended before printing {text!r}; it printed:\n{self.out}"
                self.out += line.decode()
        return self.out

    async def answer(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Its exit code and whole output."""
        async with asyncio.timeout(timeout):
            out, err = await self.proc.communicate()
        self.out += out.decode()
        return self.proc.returncode, self.out + err.decode()


def emoji_names(sas: Any) -> str:
    return " | ".join(name for _, name in sas.get_emoji())


async def verified_by_sas(daemon: Daemon, user: E2EUser, bot_device: Any) -> tuple[int, str]:
    """`aiagentchat verify USER DEVICE` started by the bot, accepted on the user's device, the emoji confirmed on
    both sides; its exit code and output."""
    verify = await Verify.start(daemon, user.user_id, user.client.device_id)
    sas = await user.accept_sas(bot_device)
    assert emoji_names(sas) in await verify.read_until("numbers:")
    await verify.answer("y")
    await user.confirm_sas(sas)
    code, output = await verify.finish()
    assert sas.verified, output
    return code, output


async def test_verify_started_from_the_bot_is_recorded_on_both_sides(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    bot_device = await user.device_of(world.bot_id)
    declined = await user.send_verification_request(bot_device)
    await user.wait_for(lambda _: user.verification_events("m.key.verification.cancel", declined) != [], timeout=30)
    [cancel] = user.verification_events("m.key.verification.cancel", declined)
    assert "aiagentchat verify" in cancel["reason"]
    busy = await Verify.start(daemon, user.user_id, user.client.device_id)
    code, output = await busy.finish()
    assert code == 2 and "in use by pid" in output
    assert await daemon.stop() == 0

    code, output = await verified_by_sas(daemon, user, bot_device)
    assert code == 0 and f"✅ Verified {user.user_id}'s device {user.client.device_id}" in output
    assert user.client.olm.is_device_verified(bot_device)

    strict = world.daemon([{"id": room, "trust": "verified"}])  # the same bot device, now trusting verified ones only
    await strict.start()
    _, answer = await ask(user, room, "say only verified devices here")
    assert "only verified devices here" in "".join(e["content"]["body"] for e in answer)


async def test_verify_answers_a_request_from_an_allowed_users_client(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    bot_device = await user.device_of(world.bot_id)
    assert await daemon.stop() == 0
    verify = await Verify.start(daemon)
    await verify.read_until("Waiting for an allowed user")
    sas = await user.request_sas(bot_device)
    assert emoji_names(sas) in await verify.read_until("numbers:")
    await verify.answer("y")
    await user.confirm_sas(sas)
    code, output = await verify.finish()
    assert code == 0 and "✅ Verified" in output
    assert user.client.olm.is_device_verified(bot_device)
    done = "m.key.verification.done"
    await user.wait_for(lambda _: user.verification_events(done, sas.transaction_id) != [], timeout=30)


async def test_emoji_that_do_not_match_record_nothing(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    bot_device = await user.device_of(world.bot_id)
    assert await daemon.stop() == 0
    verify = await Verify.start(daemon, user.user_id, user.client.device_id)
    sas = await user.accept_sas(bot_device)
    await verify.read_until("numbers:")
    await verify.answer("n")
    code, output = await verify.finish()
    assert code == 1 and "❌ Not verified" in output
    cancel = "m.key.verification.cancel"
    await user.wait_for(lambda _: user.verification_events(cancel, sas.transaction_id) != [], timeout=30)
    assert [c["code"] for c in user.verification_events(cancel, sas.transaction_id)] == ["m.mismatched_sas"]
    assert sas.canceled and not user.client.olm.is_device_verified(bot_device)


async def test_tofu_keeps_a_device_added_later_out_and_says_so(world):
    first = await world.device()
    room, daemon = await encrypted_room(world, first, trust="tofu")
    await ask(first, room, "say first use")  # the devices the user has now are the ones trusted
    second = await world.device()
    await second.sync_once()
    new_device = second.client.device_id

    prompt, answer = await ask(first, room, "say not for the new device")
    events = await first.wait_for(lambda evs: any(left_out(e, new_device) for e in evs), timeout=30, room_id=room)
    [notice] = [e for e in events if left_out(e, new_device)]
    assert f"aiagentchat verify {first.user_id} {new_device}" in notice["content"]["body"]
    answer_ids = {e["event_id"] for e in answer}
    seen = await second.wait_for(lambda evs: answer_ids <= {e["event_id"] for e in evs}, room_id=room)
    assert {e["type"] for e in seen if e["event_id"] in answer_ids} == {"m.room.encrypted"}  # unreadable there

    refused = await second.send_text(room, "say from the new device")
    events = await first.wait_for(run_ended_or_refused(refused), timeout=30, room_id=room)
    [why] = bot_events(events, refused)
    assert "I did not run" in why["content"]["body"] and new_device in why["content"]["body"]
    await daemon.wait_for_log("prompt_ignored", event_id=refused)
    assert "from the new device" not in str([r["latest_user_text"] for r in await world.model.requests()])


def left_out(event: dict[str, Any], device_id: str) -> bool:
    body = event.get("content", {}).get("body") or ""
    return "cannot read my messages in this room" in body and device_id in body


async def test_verify_by_key_compares_the_key_the_device_shows(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user, trust="verified")
    refused = await user.send_text(room, "say not verified yet")
    entry = await daemon.wait_for_log("prompt_ignored", event_id=refused)
    assert 'trust = "verified" does not accept' in entry["reason"]
    assert await daemon.stop() == 0
    key = user.client.olm.account.identity_keys["ed25519"]
    wrong = await Verify.start(daemon, user.user_id, user.client.device_id, "--key", "AAAA" + key[4:])
    code, output = await wrong.finish()
    assert code == 1 and "❌ Not verified" in output and "not the one given" in output
    unknown = await Verify.start(daemon, user.user_id, "NOSUCHDEVICE", "--key", key)
    code, output = await unknown.finish()
    assert code == 1 and f"no device NOSUCHDEVICE with published keys (they have: {user.client.device_id})" in output
    shown = " ".join(key[i : i + 4] for i in range(0, len(key), 4))  # as Element shows a session key
    right = await Verify.start(daemon, user.user_id, user.client.device_id, "--key", shown)
    code, output = await right.finish()
    assert code == 0 and "✅ Verified" in output
    await daemon.start()
    _, answer = await ask(user, room, "say verified by its key")
    assert "verified by its key" in "".join(e["content"]["body"] for e in answer)
