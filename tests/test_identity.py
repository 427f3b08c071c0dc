"""Cross-signing without a homeserver: the bot's keys, their signatures, other users' identities as
`/keys/query` publishes them, and the `cross_signed` and `verified` policies that judge devices by them."""

import stat

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nio.crypto import OlmDevice
from signedjson.key import encode_verify_key_base64
from signedjson.sign import sign_json

from aiagentchat.crypto import Crypto
from aiagentchat.identity import (
    CrossSigningKeys,
    IdentityError,
    KeyFile,
    key_of,
    read_identity,
    sign_device,
    signed_by,
)
from aiagentchat.settings import RoomSettings
from aiagentchat.trust import DeviceTrust, Pins
from tests.test_crypto import ALICE, ROOM, bot_client, known, settings_for

BOT = "@bot:localhost"


def person_device(keys: CrossSigningKeys | None, device_id: str) -> tuple[OlmDevice, dict]:
    """A device of alice with a real Ed25519 key; its published keys signed by `keys`' self-signing key."""
    device_key = nacl.signing.SigningKey.generate()
    ed25519 = encode_verify_key_base64(device_key.verify_key)
    published = {
        "user_id": ALICE,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {f"ed25519:{device_id}": ed25519, f"curve25519:{device_id}": f"cu-{device_id}"},
    }
    if keys is not None:
        published = sign_device(published, ALICE, keys.self_signing)
    return OlmDevice(ALICE, device_id, {"ed25519": ed25519, "curve25519": f"cu-{device_id}"}), published


def answer(keys: CrossSigningKeys, devices: dict[str, dict], **extra: dict) -> dict:
    """A `/keys/query` answer for alice, as Synapse gives it."""
    body = keys.upload_body()
    return {
        "device_keys": {ALICE: devices},
        "master_keys": {ALICE: body["master_key"]},
        "self_signing_keys": {ALICE: body["self_signing_key"]},
    } | extra


def test_the_bots_keys_are_signed_by_its_master_key_and_sign_its_device():
    keys = CrossSigningKeys.generate(BOT)
    body = keys.upload_body()
    master = key_of(body["master_key"], BOT, "master")
    assert master == keys.master_key
    for usage in ("self_signing", "user_signing"):
        assert signed_by(body[f"{usage}_key"], BOT, master)
        assert not signed_by(body[f"{usage}_key"], BOT, CrossSigningKeys.generate(BOT).master_key)
    assert key_of(body["master_key"], "@mallory:localhost", "master") is None
    for key in ("\ud800" * 43, "not base64 at all", keys.master_key[:-4]):
        assert key_of({"user_id": BOT, "usage": ["master"], "keys": {f"ed25519:{key}": key}}, BOT, "master") is None
    assert key_of(body["self_signing_key"], BOT, "master") is None
    again = CrossSigningKeys.from_seeds(BOT, keys.seeds())
    assert again.master_key == keys.master_key and again.user_signing_key == keys.user_signing_key


def test_a_device_counts_only_when_every_signature_in_the_chain_checks_out():
    keys = CrossSigningKeys.generate(ALICE)
    phone, signed = person_device(keys, "PHONE")
    laptop, unsigned = person_device(None, "LAPTOP")
    identity = read_identity(answer(keys, {"PHONE": signed, "LAPTOP": unsigned}), ALICE)
    assert identity.master == keys.master_key
    assert identity.signs(signed, phone.ed25519)
    assert not identity.signs(unsigned, laptop.ed25519)
    assert not identity.signs(signed, laptop.ed25519)  # the signed object is another device's
    tampered = dict(signed, keys=dict(signed["keys"], **{"curve25519:PHONE": "swapped"}))
    assert not identity.signs(tampered, phone.ed25519)
    forged = CrossSigningKeys.generate(ALICE)  # a self-signing key the master key never signed
    published = answer(keys, {"PHONE": sign_device(signed, ALICE, forged.self_signing)})
    published["self_signing_keys"][ALICE] = forged.upload_body()["self_signing_key"]
    assert read_identity(published, ALICE).self_signing is None
    assert not read_identity(published, ALICE).signs(signed, phone.ed25519)


def containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8), containers, max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(master=json_values, self_signing=json_values, device=json_values)
def test_any_shape_from_the_homeserver_is_judged_never_raises(master, self_signing, device):
    published = {"device_keys": {ALICE: {"D": device}}, "master_keys": {ALICE: master},
                 "self_signing_keys": {ALICE: self_signing}}  # fmt: skip
    identity = read_identity(published, ALICE)
    assert identity is None or not identity.signs(device, "key")


def test_the_private_keys_are_kept_under_the_pickle_key(tmp_path):
    path = tmp_path / "crypto" / "cross_signing.json"
    keys = CrossSigningKeys.generate(BOT)
    KeyFile(path, "pickle").save(keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.seeds()["master"] not in path.read_text()
    assert KeyFile(path, "pickle").load(BOT).master_key == keys.master_key
    with pytest.raises(IdentityError, match="not written with this pickle key"):
        KeyFile(path, "another").load(BOT)
    with pytest.raises(IdentityError, match="not @other:localhost"):
        KeyFile(path, "pickle").load("@other:localhost")
    assert KeyFile(tmp_path / "none.json", "pickle").load(BOT) is None
    path.write_text('{"user_id": "@bot:localhost", "box": "not base64!"}')
    with pytest.raises(IdentityError, match="is damaged"):
        KeyFile(path, "pickle").load(BOT)


def trust_with(tmp_path, published: dict) -> DeviceTrust:
    trust = DeviceTrust(bot_client(tmp_path), tmp_path)
    trust.learn(published)
    return trust


def test_cross_signed_accepts_signed_devices_and_pins_the_identity(tmp_path):
    keys = CrossSigningKeys.generate(ALICE)
    phone, signed = person_device(keys, "PHONE")
    laptop, unsigned = person_device(None, "LAPTOP")
    trust = trust_with(tmp_path, answer(keys, {"PHONE": signed, "LAPTOP": unsigned}))
    assert trust.accepts("cross_signed", phone)
    assert trust.why_not("cross_signed", laptop).reason == "its owner has not cross-signed it"
    assert trust.accepts("all", laptop)

    reset = CrossSigningKeys.generate(ALICE)  # alice (or someone with her password) made a new identity
    new_phone, new_signed = person_device(reset, "NEWPHONE")
    trust.learn(answer(reset, {"NEWPHONE": new_signed}))
    verdict = trust.why_not("cross_signed", new_phone)
    assert "identity changed since I first met them" in verdict.reason
    assert f"aiagentchat trust {ALICE}" in verdict.fix
    assert Pins(tmp_path / "identities.json").accept(ALICE) == (keys.master_key, reset.master_key)  # the CLI
    assert trust.accepts("cross_signed", new_phone)  # the daemon sees it at once
    assert Pins(tmp_path / "identities.json").accept(ALICE) is None  # nothing left to accept

    bot = CrossSigningKeys.generate(BOT)  # the bot's own identity is never pinned: `keys reset` may replace it
    trust.learn({"device_keys": {BOT: {}}, "master_keys": {BOT: bot.upload_body()["master_key"]}})
    assert Pins(tmp_path / "identities.json").get(BOT) == {}


def test_cross_signed_refuses_users_without_an_identity_or_not_queried_yet(tmp_path):
    phone, unsigned = person_device(None, "PHONE")
    trust = DeviceTrust(bot_client(tmp_path), tmp_path)
    assert "could not fetch" in trust.why_not("cross_signed", phone).reason
    trust.learn({"device_keys": {ALICE: {"PHONE": unsigned}}})
    assert "has no cross-signing identity" in trust.why_not("cross_signed", phone).reason


def test_verified_means_an_identity_the_bot_signed(tmp_path):
    keys = CrossSigningKeys.generate(ALICE)
    bot = CrossSigningKeys.generate("@bot:localhost")
    phone, signed = person_device(keys, "PHONE")
    published = answer(keys, {"PHONE": signed})
    trust = trust_with(tmp_path, published)
    trust.user_signing = bot.user_signing_key
    assert "not verified by me" in trust.why_not("verified", phone).reason
    published["master_keys"][ALICE] = bot.sign_identity(published["master_keys"][ALICE])
    trust.learn(published)
    assert trust.accepts("verified", phone)
    forged = sign_json(dict(published["master_keys"][ALICE], signatures={}), "@bot:localhost",
                       CrossSigningKeys.generate("@bot:localhost").user_signing)  # fmt: skip
    published["master_keys"][ALICE] = forged
    trust.learn(published)
    assert not trust.accepts("verified", phone)


def test_a_room_key_is_rotated_when_a_device_it_left_out_becomes_trusted(tmp_path):
    keys = CrossSigningKeys.generate(ALICE)
    phone, unsigned = person_device(None, "PHONE")
    client = bot_client(tmp_path)
    known(client, phone)
    rooms = {ROOM: RoomSettings(id=ROOM, allowed_users=[ALICE])}  # the default trust: cross_signed
    crypto = Crypto(client, settings_for(tmp_path), rooms, lambda _: None, None)
    crypto.attach()
    crypto.trust.learn(answer(keys, {"PHONE": unsigned}))
    list(client.olm.share_group_session_parallel(ROOM, [ALICE]))
    assert client.olm.outbound_group_sessions[ROOM].users_ignored == {(ALICE, "PHONE")}
    crypto._rotate_for_newly_trusted()
    assert ROOM in client.olm.outbound_group_sessions  # still left out: the session stays

    crypto.trust.learn(answer(keys, {"PHONE": sign_device(unsigned, ALICE, keys.self_signing)}))  # alice signed her phone
    crypto._rotate_for_newly_trusted()
    assert ROOM not in client.olm.outbound_group_sessions  # the next message gets a new key, shared with it
    list(client.olm.share_group_session_parallel(ROOM, [ALICE]))
    assert client.olm.outbound_group_sessions[ROOM].users_ignored == set()
