"""Cross-signing end to end: the bot's identity as today's Element sees it (a matrix-js-sdk person in the mode that
excludes insecure devices), its users' identities under `trust = "cross_signed"` (the default) and "verified",
and the `aiagentchat keys` and `aiagentchat trust` commands."""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import pytest

from aiagentchat.identity import CrossSigningKeys, query, read_devices, read_identity
from tests.harness.e2e import E2EUser
from tests.harness.js_person import Event, JsPerson
from tests.integration.conftest import (
    MARKER,
    World,
    encrypted_room,
    joined,
    membership,
    run_ended,
    same_sas,
    settled,
)
from tests.integration.daemon import Daemon
from tests.integration.test_e2e import Verify, ask, bot_device_id, run_ended_or_refused, verified_by_sas

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def cli(daemon: Daemon, *args: str, stdin: str = "") -> tuple[int, str]:
    """`aiagentchat ARGS` with the daemon's settings and environment: exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiagentchat", *args, "--config", str(daemon.config), env=daemon.env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await proc.communicate(stdin.encode())
    return proc.returncode, out.decode()


async def bot_identity(person: E2EUser, bot_id: str) -> tuple[str, dict[str, Any]]:
    """The bot's master key as the homeserver publishes it, and which of its devices that identity signed."""
    published = await query(person.client, [bot_id])
    identity = read_identity(published, bot_id)
    assert identity is not None, f"the bot has published no identity: {published}"
    devices = read_devices(published, bot_id)
    return identity.master, {
        device_id: identity.signs(keys, keys["keys"].get(f"ed25519:{device_id}")) for device_id, keys in devices.items()
    }


async def device_in(world: World, room_id: str, *, cross_signed: bool = True) -> E2EUser:
    """A new nio device of the world's user that has synced the room (the bot's join included)."""
    device = await world.device(cross_signed=cross_signed)
    await device.wait_for(lambda events: joined(events, world.bot_id), room_id=room_id)
    return device


def answered(bot_id: str, prompt_id: str):
    """A js person's predicate: the bot's event that ends the prompt's run, decrypted."""

    def matches(event: Event) -> bool:
        marker = (event["content"] or {}).get(MARKER) or {}
        return event["sender"] == bot_id and marker.get("prompt") == prompt_id and "final" in marker

    return matches


async def element_room(world: World, person: JsPerson, **room: Any) -> tuple[str, Daemon]:
    """An encrypted room the js person made and invited the bot to, served by a started daemon; returns once
    the person has seen the bot join (or the person would not share the room key with it)."""
    room_id = await person.create_room(invite=[world.bot_id])
    daemon = world.daemon([{"id": room_id} | room])
    await daemon.start()
    await person.wait_for_event(membership(room_id, world.bot_id))
    return room_id, daemon


async def element_asks(world: World, person: JsPerson, room_id: str, text: str) -> tuple[str, Event]:
    prompt = await person.send_text(room_id, text)
    return prompt, await person.wait_for_event(answered(world.bot_id, prompt), timeout=90)


async def test_a_person_on_element_reads_the_bots_answers_and_sees_its_device_signed(world, people):
    person = await people(world.user.user_id, world.user_password, "element")
    await person.bootstrap_cross_signing(world.user_password)
    room, daemon = await element_room(world, person)
    _, answer = await element_asks(world, person, room, "say hello to element")
    assert answer["decryption_failure"] is None and answer["encrypted"] is True
    assert "hello to element" in answer["content"]["body"]
    assert answer["content"][MARKER]["final"]["ok"] is True
    status = await person.device_status(world.bot_id, bot_device_id(world))
    assert status["signed_by_owner"] is True, status
    undecryptable = [e for e in person.events if e["sender"] == world.bot_id and e["decryption_failure"]]
    assert not [e for e in undecryptable if settled(e["event_id"])(e)], undecryptable
    assert daemon.logged("cross_signing_published", new=True)


async def test_a_bot_that_lost_its_login_keeps_its_identity_and_element_trusts_it_at_once(world, people):
    person = await people(world.user.user_id, world.user_password, "element")
    await person.bootstrap_cross_signing(world.user_password)
    room, daemon = await element_room(world, person)
    await element_asks(world, person, room, "say first device")
    first_device = bot_device_id(world)
    master = (await person.user_identity(world.bot_id))["master_key"]
    assert await daemon.stop() == 0

    (world.tmp_path / "data" / "credentials.json").unlink()  # lost login: the password makes a new device
    await daemon.start()
    await daemon.wait_for_log("cross_signing_ready", device_signed_now=True)
    second_device = bot_device_id(world)
    assert second_device != first_device
    _, answer = await element_asks(world, person, room, "say second device")
    assert answer["decryption_failure"] is None and "second device" in answer["content"]["body"]
    assert (await person.user_identity(world.bot_id))["master_key"] == master
    status = await person.wait_for_device(world.bot_id, second_device, lambda s: s["signed_by_owner"])
    assert status["signed_by_owner"] is True
    assert not daemon.logged("cross_signing_published", new=True)  # the same identity, not a new one


async def test_a_session_its_owner_has_not_signed_is_refused_until_it_is(world, people):
    first = await people(world.user.user_id, world.user_password, "element")
    await first.bootstrap_cross_signing(world.user_password)
    room, _ = await element_room(world, first)
    await element_asks(world, first, room, "say one signed session")
    second = await device_in(world, room, cross_signed=False)  # a js session that is not signed cannot even send

    refused = await second.send_text(room, "say from an unsigned session")
    notice = await first.wait_for_event(answered(world.bot_id, refused), timeout=90)
    assert notice["content"][MARKER]["final"]["ok"] is False
    assert "its owner has not cross-signed it" in notice["content"]["body"]
    assert "from an unsigned session" not in notice["content"]["body"]

    await first.cross_sign_device(second.client.device_id)
    prompt = await second.send_text(room, "say now the session is signed")
    answer = await first.wait_for_event(answered(world.bot_id, prompt), timeout=90)
    assert answer["content"][MARKER]["final"]["ok"] is True
    assert "now the session is signed" in answer["content"]["body"]


async def test_a_changed_identity_is_refused_until_an_operator_accepts_it(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    await ask(user, room, "say before the reset")
    assert (await cli(daemon, "trust", world.user.user_id))[1].startswith("Nothing to accept")

    await user.cross_sign(CrossSigningKeys.generate(world.user.user_id), world.user_password, replace=True)
    prompt = await user.send_text(room, "say after the reset")
    events = await user.wait_for(run_ended_or_refused(prompt), timeout=60, room_id=room)
    [notice] = [e for e in events if (e["content"].get(MARKER) or {}).get("prompt") == prompt]
    assert "identity changed since I first met them" in notice["content"]["body"]
    assert f"aiagentchat trust {world.user.user_id}" in notice["content"]["body"]
    await daemon.wait_for_log("identity_changed", user_id=world.user.user_id)

    code, output = await cli(daemon, "trust", world.user.user_id)  # while the daemon runs
    assert code == 0 and "Accepted" in output
    _, answer = await ask(user, room, "say accepted again")
    assert "accepted again" in "".join(e["content"]["body"] for e in answer)


async def stopped_after_an_answer(world: World) -> tuple[E2EUser, str, Daemon, str]:
    """A person, an encrypted room and its daemon, stopped after one answer; the bot's master key then."""
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    await ask(user, room, "say with the first identity")
    master, _ = await bot_identity(user, world.bot_id)
    assert await daemon.stop() == 0
    return user, room, daemon, master


async def test_keys_export_and_import_carry_the_identity_to_a_rebuilt_host(world):
    user, room, daemon, master = await stopped_after_an_answer(world)
    export = world.tmp_path / "bot-keys.json"
    code, output = await cli(daemon, "keys", "export", str(export))
    assert code == 0 and master[:4] in output
    recovery_key = re.search(r"Recovery key.*\n\s+(\S.*\S)\s*$", output, re.MULTILINE).group(1)
    assert recovery_key not in export.read_text()

    data = world.tmp_path / "data"
    for kept in data.rglob("*"):  # a rebuilt host: nothing of the old data dir
        if kept.is_file():
            kept.unlink()
    await daemon.start()
    missing = await daemon.wait_for_log("cross_signing_keys_missing")
    assert missing["master_key"] == master and "aiagentchat keys import" in missing["detail"]
    assert await daemon.stop() == 0

    mistyped = recovery_key[:-1] + ("x" if recovery_key[-1] != "x" else "y")
    wrong = await cli(daemon, "keys", "import", str(export), "--recovery-key", mistyped)
    assert wrong[0] == 1 and "recovery key" in wrong[1]
    code, output = await cli(daemon, "keys", "import", str(export), stdin=recovery_key + "\n")
    assert code == 0 and "Imported" in output
    await daemon.start()
    ready = await daemon.wait_for_log("cross_signing_ready")
    assert ready["master_key"] == master
    user = await device_in(world, room)  # a new session: the old one's room key never reaches a new bot device
    _, answer = await ask(user, room, "say on the new host")
    assert "on the new host" in "".join(e["content"]["body"] for e in answer)
    assert (await bot_identity(user, world.bot_id))[1][bot_device_id(world)] is True


async def test_keys_reset_makes_a_new_identity_that_signs_the_device(world):
    user, _, daemon, old = await stopped_after_an_answer(world)
    code, output = await cli(daemon, "keys", "reset")
    assert code == 0 and "New identity" in output
    new, signed = await bot_identity(user, world.bot_id)
    assert new != old and signed[bot_device_id(world)] is True
    await daemon.start()
    assert (await daemon.wait_for_log("cross_signing_ready"))["master_key"] == new


async def test_verifying_a_person_trusts_every_device_they_cross_sign(world):
    phone = await world.device()
    room, daemon = await encrypted_room(world, phone, trust="verified")
    refused = await phone.send_text(room, "say before verification")  # its notice is not shared with the phone
    entry = await daemon.wait_for_log("prompt_ignored", event_id=refused)
    assert f"{world.user.user_id}'s identity is not verified by me" in entry["reason"]
    bot_device = await phone.device_of(world.bot_id)
    assert await daemon.stop() == 0

    code, output = await verified_by_sas(daemon, phone, bot_device)
    assert code == 0 and f"✅ Verified {world.user.user_id}'s identity" in output

    laptop = await device_in(world, room)  # never verified by the bot on its own: its owner's identity signed it
    await daemon.start()
    prompt = await laptop.send_text(room, "say from the laptop")
    events = await laptop.wait_for(run_ended(prompt), timeout=60, room_id=room)
    assert "from the laptop" in "".join(e["content"]["body"] for e in events if e["content"].get(MARKER))


async def test_the_bot_verifies_a_person_on_element_who_then_counts_where_trust_is_verified(world, people):
    person = await people(world.user.user_id, world.user_password, "element")
    await person.bootstrap_cross_signing(world.user_password)
    room, daemon = await element_room(world, person, trust="verified")
    refused = await person.send_text(room, "say before verification")
    entry = await daemon.wait_for_log("prompt_ignored", event_id=refused)
    assert f"{world.user.user_id}'s identity is not verified by me" in entry["reason"]
    assert await daemon.stop() == 0

    other = await world.device(cross_signed=False)  # another session of theirs, which lets it ring
    await other.sync_once()  # uploads its keys: the bot's request reaches it too
    verify = await Verify.start(daemon, world.user.user_id)  # any of their sessions
    accepting = asyncio.create_task(person.accept_verification(world.bot_id))
    shown = await verify.read_until("numbers:")
    assert f"device {person.device_id}" in shown and "accepted" in shown
    await verify.answer("y")
    assert same_sas(await accepting, shown)  # Element showed the same emoji and numbers
    code, output = await verify.finish()
    assert code == 0 and f"✅ Verified {world.user.user_id}'s identity" in output

    def told_elsewhere(_: Any) -> bool:
        cancels = [e.source["content"] for e in other.to_device if e.source.get("type") == "m.key.verification.cancel"]
        return any(cancel.get("code") == "m.accepted" for cancel in cancels)

    await other.wait_for(told_elsewhere, timeout=30)
    # the bot's MAC carried its master key too: Element verified the bot's identity, not only its device
    bot_device = bot_device_id(world)
    status = await person.wait_for_device(world.bot_id, bot_device, lambda s: s["cross_signing_verified"])
    assert status["signed_by_owner"] is True and (await person.user_identity(world.bot_id))["verified"] is True

    await daemon.start()
    _, answer = await element_asks(world, person, room, "say verified on element")
    assert answer["content"][MARKER]["final"]["ok"] is True
    assert "verified on element" in answer["content"]["body"]
