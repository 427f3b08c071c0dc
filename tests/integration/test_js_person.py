"""The js person (tests/harness/js_person.py): matrix-js-sdk's Rust crypto in Element's "exclude insecure devices"
mode, against a real Synapse. These tests prove the harness itself, and show what such a person does with a
device that its owner has not cross-signed (a nio device, as our bot's was)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from tests.harness.e2e import E2EUser
from tests.harness.js_person import JsPerson
from tests.integration.conftest import joined, membership, settled

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def account(synapse, name: str) -> tuple[str, str]:
    password = secrets.token_urlsafe(12)
    return await synapse.register(f"{name}{secrets.token_hex(4)}", password), password


@pytest.fixture
async def nio_devices() -> AsyncIterator[list[E2EUser]]:
    """nio devices a test logs in; every one is closed after the test."""
    devices: list[E2EUser] = []
    yield devices
    for device in devices:
        await device.close()


async def shared_room(owner: JsPerson, guests: list[JsPerson]) -> str:
    """An encrypted room of `owner` that `guests` joined; returns once the owner has seen every join."""
    room = await owner.create_room(invite=[guest.user_id for guest in guests])
    for guest in guests:
        await guest.join(room)
        await owner.wait_for_event(membership(room, guest.user_id))
    return room


async def test_two_cross_signed_people_read_each_other_and_see_signed_devices(synapse, people):
    alice_id, alice_password = await account(synapse, "alice")
    bob_id, bob_password = await account(synapse, "bob")
    alice = await people(alice_id, alice_password, "alice")
    bob = await people(bob_id, bob_password, "bob")
    alice_master = await alice.bootstrap_cross_signing(alice_password)
    bob_master = await bob.bootstrap_cross_signing(bob_password)
    room = await shared_room(alice, [bob])
    await bob.wait_for_event(membership(room, alice_id))
    assert await alice.room_encrypted(room) and await bob.room_encrypted(room)

    to_bob = await alice.send_text(room, "hello bob")
    received = await bob.wait_for_event(settled(to_bob))
    assert received["decryption_failure"] is None, received
    assert received["encrypted"] and received["type"] == "m.room.message"
    assert received["content"]["body"] == "hello bob" and received["sender"] == alice_id
    to_alice = await bob.send_text(room, "hello alice")
    received = await alice.wait_for_event(settled(to_alice))
    assert received["decryption_failure"] is None and received["content"]["body"] == "hello alice", received

    assert (await alice.device_status(bob_id, bob.device_id))["signed_by_owner"] is True
    assert (await bob.device_status(alice_id, alice.device_id))["signed_by_owner"] is True
    assert await alice.user_identity(bob_id) == {"master_key": bob_master, "verified": False}
    assert await bob.user_identity(alice_id) == {"master_key": alice_master, "verified": False}
    assert await alice.user_identity(alice_id) == {"master_key": alice_master, "verified": True}


async def test_a_device_without_cross_signing_is_excluded(synapse, people, nio_devices, tmp_path):
    alice_id, alice_password = await account(synapse, "alice")
    carol_id, carol_password = await account(synapse, "carol")
    alice = await people(alice_id, alice_password, "alice")
    await alice.bootstrap_cross_signing(alice_password)
    carol = E2EUser(tmp_path / "carol")
    nio_devices.append(carol)
    await carol.login(synapse.base_url, carol_id, carol_password)
    carol_device = carol.client.device_id
    room = await alice.create_room(invite=[carol_id])
    await carol.join(room)
    await alice.wait_for_event(membership(room, carol_id))
    await carol.wait_for(lambda events: joined(events, alice_id), room_id=room)

    from_carol = await carol.send_text(room, "from a device nobody signed")
    received = await alice.wait_for_event(settled(from_carol))
    assert received["decryption_failure"] == "UNSIGNED_SENDER_DEVICE", received
    assert received["content"] is None and received["encrypted"]
    status = await alice.device_status(carol_id, carol_device)
    assert status == {"known": True, "signed_by_owner": False, "cross_signing_verified": False,
                      "locally_verified": False}  # fmt: skip
    assert (await alice.user_identity(carol_id))["master_key"] is None

    # The other way, the room key is withheld from the unsigned device, and it says so.
    to_carol = await alice.send_text(room, "not for unsigned devices")

    def withheld(_events: object) -> bool:
        return any(
            event.source.get("type") == "m.room_key.withheld" and event.source["content"].get("code") == "m.unverified"
            for event in carol.to_device
        )

    events = await carol.wait_for(withheld, room_id=room)
    seen = [event for event in events if event.get("event_id") == to_carol]
    assert seen and seen[0]["type"] == "m.room.encrypted" and "body" not in seen[0]["content"], seen


async def test_a_new_device_counts_once_its_owner_cross_signs_it(synapse, people):
    alice_id, alice_password = await account(synapse, "alice")
    bob_id, bob_password = await account(synapse, "bob")
    alice = await people(alice_id, alice_password, "alice")
    bob = await people(bob_id, bob_password, "bob")
    await alice.bootstrap_cross_signing(alice_password)
    await bob.bootstrap_cross_signing(bob_password)
    await shared_room(alice, [bob])

    def known(status: dict[str, bool]) -> bool:
        return status["known"]

    second = await people(alice_id, alice_password, "alice's second device")
    status = await bob.wait_for_device(alice_id, second.device_id, known)
    assert status["signed_by_owner"] is False, status
    await alice.wait_for_device(alice_id, second.device_id, known)
    await alice.cross_sign_device(second.device_id)
    status = await bob.wait_for_device(alice_id, second.device_id, lambda status: status["signed_by_owner"])
    assert status["signed_by_owner"] is True
    assert (await second.device_status(alice_id, second.device_id))["signed_by_owner"] is True
