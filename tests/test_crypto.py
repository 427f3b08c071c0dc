"""The daemon's encryption helpers against a real nio Olm machine and crypto store (no homeserver needed)."""

import asyncio
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from nio import AsyncClient, AsyncClientConfig, GroupEncryptionError, MegolmEvent
from nio.crypto import OlmDevice
from structlog.testing import capture_logs

from aiagentchat import crypto as crypto_module
from aiagentchat.crypto import Crypto, DeviceLock, Waiting, pickle_key
from aiagentchat.outbox import SendFailed
from aiagentchat.settings import ConfigError, RoomSettings, Settings
from aiagentchat.transport import MatrixSender
from aiagentchat.trust import DeviceTrust
from tests.test_batcher import FakeRoom, close, kinds, running

ALICE = "@alice:localhost"
ROOM = "!room:localhost"


def settings_for(tmp_path: Path, **matrix: str) -> Settings:
    return Settings(paths={"data_dir": tmp_path / "data"}, matrix=matrix)


def bot_client(tmp_path: Path) -> AsyncClient:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    config = AsyncClientConfig(encryption_enabled=True, pickle_key="test")
    client = AsyncClient("http://127.0.0.1:9", "@bot:localhost", store_path=str(store), config=config)
    client.restore_login("@bot:localhost", "BOTDEVICE", "token")
    return client


def device(device_id: str, key: str | None = None) -> OlmDevice:
    return OlmDevice(ALICE, device_id, {"ed25519": key or f"ed-{device_id}", "curve25519": f"cu-{device_id}"})


def known(client: AsyncClient, *devices: OlmDevice) -> None:
    """As after a keys query: the devices are in the store and their user's list is up to date."""
    for each in devices:
        client.olm.device_store.add(each)
    client.olm.tracked_users.add(ALICE)
    client.olm.users_for_key_query.discard(ALICE)


def test_pickle_key_is_generated_once_private_and_the_environment_wins(tmp_path):
    settings = settings_for(tmp_path)
    first = pickle_key(settings)
    assert first == pickle_key(settings) and len(first) >= 32
    assert stat.S_IMODE((tmp_path / "data" / "pickle_key").stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="not the one that encrypted the crypto store"):
        pickle_key(settings_for(tmp_path, pickle_key="from-the-environment"))
    other = tmp_path / "other"
    assert pickle_key(settings_for(other, pickle_key="from-the-environment")) == "from-the-environment"
    assert not (other / "data" / "pickle_key").exists()


def test_one_process_at_a_time_holds_the_device(tmp_path):
    settings = settings_for(tmp_path)
    lock = DeviceLock(settings)
    with pytest.raises(ConfigError, match=r"in use by pid \d+"):
        DeviceLock(settings)
    lock.release()
    DeviceLock(settings).release()


def test_trust_policies(tmp_path):
    client = bot_client(tmp_path)
    phone, laptop = device("PHONE"), device("LAPTOP")
    known(client, phone)
    trust = DeviceTrust(client, tmp_path)
    assert trust.accepts("tofu", phone)  # first use: the devices alice has now are pinned
    known(client, laptop)
    assert trust.accepts("all", laptop) and not trust.accepts("tofu", laptop) and not trust.accepts("verified", laptop)
    assert "appeared after" in trust.why_not("tofu", laptop).reason
    client.verify_device(laptop)
    assert trust.accepts("tofu", laptop) and trust.accepts("verified", laptop)
    assert not trust.accepts("verified", phone)
    impostor = device("PHONE", key="another-signing-key")
    assert not DeviceTrust(client, tmp_path).accepts("tofu", impostor)  # pins survive a restart
    client.blacklist_device(phone)
    assert not trust.accepts("all", phone)
    assert "blacklisted" in trust.why_not("all", phone).reason


def test_tofu_pins_nothing_before_the_users_devices_are_known(tmp_path):
    client = bot_client(tmp_path)
    phone = device("PHONE")
    client.olm.device_store.add(phone)
    client.olm.users_for_key_query.add(ALICE)
    trust = DeviceTrust(client, tmp_path)
    assert not trust.accepts("tofu", phone)
    known(client)
    assert trust.accepts("tofu", phone)


@pytest.mark.parametrize(("trust", "left_out"), [("all", set()), ("verified", {(ALICE, "PHONE")})])
def test_room_keys_leave_out_the_devices_the_room_does_not_trust(tmp_path, trust, left_out):
    client = bot_client(tmp_path)
    known(client, device("PHONE"))
    rooms = {ROOM: RoomSettings(id=ROOM, trust=trust, allowed_users=[ALICE])}
    crypto = Crypto(client, settings_for(tmp_path), rooms, lambda _: None, None)
    crypto.attach()
    with capture_logs() as logs:
        assert list(client.olm.share_group_session_parallel(ROOM, [ALICE])) == []  # no Olm session: nothing sent
    assert client.olm.outbound_group_sessions[ROOM].users_ignored == left_out
    unreadable = [entry for entry in logs if entry["event"] == "no_allowed_user_can_read"]
    assert len(unreadable) == len(left_out)  # alice's only device left out: the operator is warned


def encrypted_event(event_id: str) -> MegolmEvent:
    source = {
        "type": "m.room.encrypted",
        "event_id": event_id,
        "sender": ALICE,
        "origin_server_ts": 1,
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "sender_key": "k", "ciphertext": "c", "session_id": "s",
                    "device_id": "PHONE"},
    }  # fmt: skip
    return MegolmEvent.from_dict(source)


@pytest.mark.anyio
@pytest.mark.parametrize("live_status", [False, True])
async def test_a_message_not_run_ends_with_a_cross_and_a_notice_about_no_message_gets_no_reaction(
    tmp_path, live_status
):
    client = bot_client(tmp_path)
    known(client, device("PHONE"))
    rooms = {ROOM: RoomSettings(id=ROOM, trust="verified", allowed_users=[ALICE], key_wait_s=0.01)}
    room = FakeRoom()
    async with running(room, reactions=True, live_status=live_status) as batcher:
        crypto = Crypto(client, settings_for(tmp_path), rooms, lambda _: batcher, None)
        crypto.attach()
        untrusted = SimpleNamespace(
            decrypted=True, sender=ALICE, sender_key="cu-UNKNOWN", session_id="s", event_id="$untrusted"
        )
        assert await crypto.refusal(ROOM, rooms[ROOM], untrusted) == "sent from a device whose keys I do not know"
        crypto.hold(ROOM, rooms[ROOM], encrypted_event("$undecryptable"))  # its key never comes
        list(client.olm.share_group_session_parallel(ROOM, [ALICE]))  # alice's PHONE is left out: the room is told
        upkeep = asyncio.create_task(crypto.run())
        try:
            await room.until(lambda: sum(call.event_type == "m.room.message" for call in room.calls) == 3)
        finally:
            upkeep.cancel()
            await asyncio.gather(upkeep, return_exceptions=True)
        await close(room, batcher)
    notices = "\n".join(call.body for call in room.calls if call.event_type == "m.room.message")
    for start in ("🔐 I did not run the message", "🔒 I could not decrypt the message", "🔐 These devices cannot"):
        assert notices.count(start) == 1
    assert [kind for kind in kinds(room.calls) if kind.startswith("react")] == [
        "react ❌ to $untrusted",
        "react ❌ to $undecryptable",
    ]


def test_a_waiting_event_survives_a_restart():
    source = {
        "type": "m.room.encrypted",
        "event_id": "$e",
        "sender": ALICE,
        "origin_server_ts": 1,
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "sender_key": "k", "ciphertext": "c", "session_id": "s",
                    "device_id": "PHONE"},
    }  # fmt: skip
    waiting = Waiting(ROOM, MegolmEvent.from_dict(source), 123.0)
    again = Waiting.from_json(waiting.to_json())
    assert (again.room_id, again.deadline, again.event.session_id, again.event.room_id) == (ROOM, 123.0, "s", ROOM)


@pytest.mark.anyio
async def test_a_send_that_cannot_be_encrypted_yet_is_retried_not_lost():
    class Client:
        rooms = {ROOM: object()}

        async def room_send(self, *args: object, **kwargs: object) -> None:
            raise GroupEncryptionError(f"Group session for room {ROOM} not shared.")

    ready = asyncio.Event()
    ready.set()
    outcome = await MatrixSender(Client(), ready).send(ROOM, {"body": "x"}, "txn")
    assert isinstance(outcome, SendFailed) and outcome.retryable and "GroupEncryptionError" in outcome.reason


@pytest.mark.anyio
async def test_a_send_to_a_room_the_bot_is_not_in_fails_for_good():
    class Client:
        rooms: dict[str, object] = {}

        async def room_send(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("nothing is sent to a room the bot is not in")

    ready = asyncio.Event()
    ready.set()
    outcome = await MatrixSender(Client(), ready).send(ROOM, {"body": "x"}, "txn")
    assert outcome == SendFailed("the bot is not in this room", retryable=False)


@pytest.mark.anyio
async def test_a_prompt_waits_for_its_senders_device_list_outside_the_sync_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(crypto_module, "KEYS_WAIT_S", 0.2)

    async def key_query(client: AsyncClient) -> None:
        known(client)  # as after the upkeep's key query, with no homeserver

    monkeypatch.setattr(crypto_module, "upkeep", key_query)
    client = bot_client(tmp_path)
    client.olm.users_for_key_query.add(ALICE)  # alice has a new device: her device list is out of date
    room = RoomSettings(id=ROOM, trust="tofu", allowed_users=[ALICE])
    delivered: asyncio.Queue[str] = asyncio.Queue()
    crypto: Crypto

    async def deliver(room_id: str, settings: RoomSettings, event) -> None:
        assert not crypto.await_keys(room_id, settings, event)  # taken up now, never held twice
        delivered.put_nowait(event.event_id)

    crypto = Crypto(client, settings_for(tmp_path), {ROOM: room}, lambda _: None, deliver)
    first, second, later = (SimpleNamespace(decrypted=True, sender=ALICE, event_id=e) for e in ("$1", "$2", "$3"))
    assert crypto.await_keys(ROOM, room, first) and crypto.await_keys(ROOM, room, second)
    assert not crypto.await_keys(ROOM, room.model_copy(update={"trust": "all"}), later)
    task = asyncio.create_task(crypto.run())
    try:
        await crypto.upkeep()
        async with asyncio.timeout(5):
            assert [await delivered.get(), await delivered.get()] == ["$1", "$2"]
        client.olm.users_for_key_query.add(ALICE)
        assert crypto.await_keys(ROOM, room, later)  # the query never comes: judged on the devices known
        async with asyncio.timeout(5):
            assert await delivered.get() == "$3"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
