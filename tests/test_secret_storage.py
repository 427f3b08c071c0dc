"""Secret storage (SSSS) and recovery keys, without a homeserver: published vectors from matrix-js-sdk and
matrix-rust-sdk, round trips, refusals, and hostile account data (Hypothesis) that must end in a
SecretStorageError and nothing else. read_secret and write_secret run against account data kept by a fake
behind the module's one seam, `AsyncClient.send`."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Self
from urllib.parse import quote, unquote

import aiohttp
import base58
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiagentchat.secret_storage import (
    ALGORITHM,
    DEFAULT_KEY,
    KEY_PREFIX,
    SecretStorageError,
    decode_recovery_key,
    decrypt_secret,
    encode_recovery_key,
    encrypt_secret,
    key_description,
    key_matches,
    new_recovery_key,
    passphrase_key,
    read_secret,
    write_secret,
)

SELF_SIGNING = "m.cross_signing.self_signing"
NO_STORAGE = "no secret storage set up on this account (in Element: Settings → Encryption → Set up recovery)"
NOT_THIS_KEY = "this recovery key is not the one of the account's secret storage"

# Computed with matrix-js-sdk 37.5.0's own functions (lib/utils/encryptAESSecretStorageItem.js,
# lib/secret-storage.js calculateKeyCheck, lib/crypto-api/recovery-key.js encodeRecoveryKey,
# lib/crypto-api/key-passphrase.js deriveRecoveryKeyFromPassphrase) under node 20, with the IVs given.
JS_KEY = bytes(range(32))
JS_RECOVERY_KEY = "EsSz ykH7 LCZx 7Cae cmKD wcmY JRXi Ybtu 8iQ3 t8Ez nRwK pUY1"
JS_SECRET = "c2VsZi1zaWduaW5nIHNlZWQgZm9yIGEgdGVzdCB2ZWN0b3I"
JS_ENCRYPTED = {
    "iv": "oKGio6SlpqcoqaqrrK2urw==",
    "ciphertext": "VBhDZjof1rxDfk8gL3Xs1WxPU7cBA4icUI8xZb8W4HnTU4SVGkjvf5UJvFOlVbo=",
    "mac": "Yr9zZXYoIJssf+Vte0R/wW00dcthEvlAGgUa2BDX+64=",
}
JS_KEY_CHECK = {
    "algorithm": ALGORITHM,
    "iv": "oKGio6SlpqcoqaqrrK2urw==",
    "mac": "mR17ke0NX9DYg2vVAWmVosSM2ZRW0moI2UCgc/3mlfo=",
}
# Three and more AES blocks, a counter whose low 64 bits carry across bytes (7fff...fe → 8000...00), non-ASCII.
JS_KEY_2 = bytes(255 - i for i in range(32))
JS_SECRET_2 = "a secret that is longer than three AES blocks, so the counter carries: ünïcödé ✓"
JS_ENCRYPTED_2 = {
    "iv": "AQIDBAUGBwh//////////g==",
    "ciphertext": "Bgjt0XzwZ8eccyAZ5MgA7+n6Lprgm/u60Lmru2Ys0Q3/euZUkBZOJGM80uFnOYkyPRdTXq1CyzPY4jE5cDehdh/VDfZMZpPG"
    "+stubtphqmnyhOyH1yw=",
    "mac": "H3MgimplyAaL3DpbfdAfYWyn/ZawAeS03ZgCPA6GQCs=",
}
JS_PASSPHRASE_KEY = "d94be677bb025c56625bb57bd8bcc06966db15a6eeeb6517ba8a7babd9a9b6b7"  # salt "saltysalt", 1000

# From matrix-rust-sdk's crates/matrix-sdk-crypto/src/secret_storage.rs tests (from_account_data_and_base58,
# from_account_data_and_passphrase, base58_parsing): check values as clients wrote them, padded and unpadded.
RUST_RECOVERY_KEY = "EsTj 3yST y93F SLpB jJsz eAXc 2XzA ygD3 w69H fGaN TKBj jXEd"
RUST_KEY_CHECK = {
    "algorithm": ALGORITHM,
    "iv": "xv5b6/p3ExEw++wTyfSHEg==",
    "mac": "ujBBbXahnTAMkmPUX2/0+VTfUh63pGyVRuBcDMgmJC8=",
}
RUST_PASSPHRASE_CHECK = {
    "algorithm": ALGORITHM,
    "iv": "gH2iNpiETFhApvW6/FFEJQ",
    "mac": "9Lw12m5SKDipNghdQXKjgpfdj1/K7HFI2brO+UWAGoM",
    "passphrase": {"algorithm": "m.pbkdf2", "salt": "IuLnH7S85YtZmkkBJKwNUKxWF42g9O1H", "iterations": 10},
}
RUST_SPACED_KEY = "EsT           pRvZTnjck8    YrhRAtw XLS84Nr2r9S9LGAWDaExVAPBvLRK   "
RUST_DECODED = bytes(
    [159, 189, 70, 187, 52, 81, 113, 198, 246, 2, 44, 154, 37, 213, 104, 27]
    + [165, 78, 236, 106, 108, 73, 83, 243, 173, 192, 185, 110, 157, 145, 173, 163]
)


def unpadded(encrypted: dict[str, str]) -> dict[str, str]:
    return {field: value.rstrip("=") for field, value in encrypted.items()}


def flip(b64: str, index: int) -> str:
    data = bytearray(base64.b64decode(b64))
    data[index] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


# --- recovery keys ---------------------------------------------------------------------------------------------


def test_a_recovery_key_round_trips_in_groups_of_four():
    key = new_recovery_key()
    assert len(key) == 32 and key != new_recovery_key()
    text = encode_recovery_key(key)
    groups = text.split(" ")
    assert all(len(group) == 4 for group in groups[:-1]) and 1 <= len(groups[-1]) <= 4
    assert decode_recovery_key(text) == key
    assert decode_recovery_key(f"  {text.replace(' ', '')}\n") == key
    assert base58.b58decode(text.replace(" ", ""))[:2] == b"\x8b\x01"


def test_the_recovery_key_matches_matrix_js_sdk_and_rust_sdk():
    assert encode_recovery_key(JS_KEY) == JS_RECOVERY_KEY
    assert decode_recovery_key(JS_RECOVERY_KEY) == JS_KEY
    assert decode_recovery_key(RUST_SPACED_KEY) == RUST_DECODED
    assert key_matches(decode_recovery_key(RUST_RECOVERY_KEY), RUST_KEY_CHECK)


@pytest.mark.parametrize(
    ("typed", "why"),
    [
        ("EsTpRvZTnjck8YrhRAtwXLS84Nr2r9S9LGAWDaExVAPBvLRk", "check byte"),  # rust-sdk's: last K typed k
        (JS_RECOVERY_KEY.replace("cmKD", "cmKE"), "check byte"),  # one character in the middle
        ("AATpRvZTnjck8YrhRAtwXLS84Nr2r9S9LGAWDaExVAPBvLRk", "does not start"),
        ("AATpRvZTnjck8YrhRAtwXLS84Nr2r9S9", "too short or too long"),
        (JS_RECOVERY_KEY + " 1", "too short or too long"),
        ("", "too short or too long"),
        (JS_RECOVERY_KEY.replace("ykH7", "ykH0"), "not in a recovery key"),  # 0 is not base58
        (JS_RECOVERY_KEY.replace("E", "É"), "not in a recovery key"),
    ],
)
def test_a_mistyped_recovery_key_is_refused_saying_so(typed, why):
    with pytest.raises(SecretStorageError, match="the recovery key is mistyped") as refused:
        decode_recovery_key(typed)
    assert why in str(refused.value)


def test_a_passphrase_key_matches_matrix_js_sdk_and_rust_sdk():
    assert passphrase_key("correct horse battery staple", "saltysalt", 1000).hex() == JS_PASSPHRASE_KEY
    assert len(passphrase_key("p", "s", 1, bits=128)) == 16
    info = RUST_PASSPHRASE_CHECK["passphrase"]
    key = passphrase_key("It's a secret to everybody", info["salt"], info["iterations"])
    assert key_matches(key, RUST_PASSPHRASE_CHECK)
    assert not key_matches(
        passphrase_key("It's a secret to nobody", info["salt"], info["iterations"]), RUST_PASSPHRASE_CHECK
    )


@pytest.mark.parametrize(
    ("salt", "iterations", "bits"),
    [
        (None, 10, 256),
        ("s", 0, 256),
        ("s", "10", 256),
        ("s", True, 256),
        ("s", 10, 255),
        ("s", 10, None),
        ("\ud800", 1, 256),
    ],
)
def test_malformed_passphrase_settings_are_refused(salt, iterations, bits):
    with pytest.raises(SecretStorageError):
        passphrase_key("p", salt, iterations, bits)


# --- encryption ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "x", JS_SECRET, "ünïcödé ✓ " * 50])
def test_a_secret_round_trips(secret):
    key = new_recovery_key()
    encrypted = encrypt_secret(key, SELF_SIGNING, secret)
    assert set(encrypted) == {"iv", "ciphertext", "mac"}
    assert decrypt_secret(key, SELF_SIGNING, encrypted) == secret
    assert decrypt_secret(key, SELF_SIGNING, unpadded(encrypted)) == secret


def test_each_iv_is_fresh_with_bit_63_cleared():
    ivs = [base64.b64decode(encrypt_secret(JS_KEY, "n", "s")["iv"]) for _ in range(64)]
    assert len(set(ivs)) == 64
    assert all(len(iv) == 16 and iv[8] & 0x80 == 0 for iv in ivs)


@pytest.mark.parametrize(
    ("key", "name", "encrypted", "secret"),
    [
        (JS_KEY, SELF_SIGNING, JS_ENCRYPTED, JS_SECRET),
        (JS_KEY_2, "org.example.secret", JS_ENCRYPTED_2, JS_SECRET_2),
    ],
)
def test_secrets_matrix_js_sdk_encrypted_decrypt(key, name, encrypted, secret):
    assert decrypt_secret(key, name, encrypted) == secret
    assert decrypt_secret(key, name, unpadded(encrypted)) == secret


def test_the_key_check_matches_matrix_js_sdk():
    assert key_matches(JS_KEY, JS_KEY_CHECK)
    assert key_matches(JS_KEY, unpadded(JS_KEY_CHECK))
    assert not key_matches(JS_KEY_2, JS_KEY_CHECK)


def test_a_key_description_checks_its_key_only():
    key = new_recovery_key()
    description = key_description(key)
    assert set(description) == {"algorithm", "iv", "mac"} and description["algorithm"] == ALGORITHM
    assert key_description(key, "my key")["name"] == "my key"
    assert key_matches(key, description)
    assert not key_matches(new_recovery_key(), description)
    assert not key_matches(key, description | {"mac": flip(description["mac"], 0)})
    # the spec: a description without a check value matches any key
    assert key_matches(new_recovery_key(), {"algorithm": ALGORITHM, "name": "no check"})


def test_a_key_description_of_another_algorithm_is_refused():
    with pytest.raises(SecretStorageError, match="m.secret_storage.custom"):
        key_matches(JS_KEY, JS_KEY_CHECK | {"algorithm": "m.secret_storage.custom"})


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e | {"ciphertext": flip(e["ciphertext"], 0)},
        lambda e: e | {"ciphertext": flip(e["ciphertext"], -1)},
        lambda e: e | {"mac": flip(e["mac"], 5)},
        lambda e: e | {"iv": JS_ENCRYPTED_2["iv"], "ciphertext": JS_ENCRYPTED_2["ciphertext"]},
    ],
)
def test_altered_data_is_refused(tamper):
    with pytest.raises(SecretStorageError, match="does not decrypt with this key"):
        decrypt_secret(JS_KEY, SELF_SIGNING, tamper(JS_ENCRYPTED))


def test_a_wrong_key_or_name_is_refused():
    with pytest.raises(SecretStorageError, match="does not decrypt with this key"):
        decrypt_secret(JS_KEY_2, SELF_SIGNING, JS_ENCRYPTED)
    with pytest.raises(SecretStorageError, match="does not decrypt with this key"):
        decrypt_secret(JS_KEY, "m.cross_signing.master", JS_ENCRYPTED)


@pytest.mark.parametrize(
    "encrypted",
    [
        None,
        [],
        "iv",
        {},
        {k: v for k, v in JS_ENCRYPTED.items() if k != "mac"},
        JS_ENCRYPTED | {"iv": 16},
        JS_ENCRYPTED | {"iv": None},
        JS_ENCRYPTED | {"ciphertext": ["VBhD"]},
        JS_ENCRYPTED | {"mac": {"a": 1}},
        JS_ENCRYPTED | {"iv": "oKGio6Sl*pqcoqaqrrK2urw"},  # not base64
        JS_ENCRYPTED | {"iv": "oKGio6SlpqcoqaqrrK2u"},  # 15 bytes
        JS_ENCRYPTED | {"mac": "Yr9zZXYoIJssf+Vte0R/wW00dcthEvlAGgUa2BDX"},  # 30 bytes
        JS_ENCRYPTED | {"ciphertext": "VBhDZ"},  # impossible length
        JS_ENCRYPTED | {"ciphertext": "VBhDZé"},
        JS_ENCRYPTED | {"ciphertext": "VBhD\ud800"},
        JS_ENCRYPTED | {"iv": "oKGio6SlpqcoqaqrrK2urw=="[::-1]},
    ],
)
def test_a_malformed_entry_is_refused(encrypted):
    with pytest.raises(SecretStorageError):
        decrypt_secret(JS_KEY, SELF_SIGNING, encrypted)


@pytest.mark.parametrize(
    "description",
    [
        None,
        [],
        {},
        {"algorithm": 1},
        JS_KEY_CHECK | {"iv": 1},
        JS_KEY_CHECK | {"mac": "!!"},
        JS_KEY_CHECK | {"iv": "AAAA"},
    ],
)
def test_a_malformed_key_description_is_refused(description):
    with pytest.raises(SecretStorageError):
        key_matches(JS_KEY, description)


# --- hostile shapes (Hypothesis) -------------------------------------------------------------------------------

texts = st.text(st.characters(codec=None, categories=None), max_size=40)
# base64 that decodes, and near-base64: the alphabet with padding, url-safe letters, spaces and non-ASCII mixed in
b64ish = st.sampled_from(
    list(JS_ENCRYPTED.values()) + list(JS_ENCRYPTED_2.values()) + ["", "=", "AAAA", "A==="]
) | st.text(alphabet="AQIDBAUGBwhoKGi+/=-_ \n\x00é\ud800", max_size=60)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts | b64ish
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3))


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | junk


encrypted_entries = junk | st.fixed_dictionaries(
    {}, optional={"iv": maybe(b64ish), "ciphertext": maybe(b64ish), "mac": maybe(b64ish)}
)
descriptions = junk | st.fixed_dictionaries(
    {}, optional={"algorithm": maybe(st.just(ALGORITHM)), "iv": maybe(b64ish), "mac": maybe(b64ish), "name": junk}
)


@given(encrypted=encrypted_entries, name=st.sampled_from([SELF_SIGNING, "org.example.secret"]))
@settings(max_examples=400)
def test_any_json_as_an_encrypted_entry_decrypts_or_is_refused(encrypted, name):
    try:
        assert isinstance(decrypt_secret(JS_KEY, name, encrypted), str)
    except SecretStorageError:
        pass


@given(description=descriptions)
@settings(max_examples=300)
def test_any_json_as_a_key_description_matches_or_is_refused(description):
    try:
        assert isinstance(key_matches(JS_KEY, description), bool)
    except SecretStorageError:
        pass


@given(text=texts | st.text(alphabet=base58.BITCOIN_ALPHABET.decode() + " ", min_size=40, max_size=70))
def test_any_text_as_a_recovery_key_decodes_or_is_refused(text):
    try:
        assert len(decode_recovery_key(text)) == 32
    except SecretStorageError:
        pass


# --- account data, behind a fake homeserver -------------------------------------------------------------------


class Response:
    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self._text = text

    async def text(self) -> str:
        return self._text

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeClient:
    """What secret_storage uses of a logged-in nio AsyncClient: user_id, access_token and `send`, answered from
    account data kept here as the homeserver would (a str value is sent as is: a body that is not JSON)."""

    def __init__(self) -> None:
        self.user_id = "@alice:example.org"
        self.access_token = "secret-token"
        self.account_data: dict[str, Any] = {}
        self.fail: Response | Exception | None = None

    async def send(self, method: str, path: str, data: str | None = None, headers: dict | None = None) -> Response:
        prefix = f"/_matrix/client/v3/user/{quote(self.user_id, safe='')}/account_data/"
        assert path.startswith(prefix) and headers["Authorization"] == "Bearer secret-token"
        kind = unquote(path[len(prefix) :])
        if isinstance(self.fail, Exception):
            raise self.fail
        if self.fail is not None:
            return self.fail
        if method == "PUT":
            assert headers["Content-Type"] == "application/json"
            self.account_data[kind] = json.loads(data)
            return Response(200, "{}")
        assert method == "GET" and data is None
        if kind not in self.account_data:
            return Response(404, '{"errcode": "M_NOT_FOUND", "error": "Account data not found"}')
        value = self.account_data[kind]
        return Response(200, value if isinstance(value, str) else json.dumps(value))


def storage_as_element_leaves_it() -> FakeClient:
    client = FakeClient()
    client.account_data = {
        DEFAULT_KEY: {"key": "KEYID"},
        KEY_PREFIX + "KEYID": JS_KEY_CHECK | {"name": "m.default"},
        SELF_SIGNING: {"encrypted": {"KEYID": JS_ENCRYPTED}},
    }
    return client


@pytest.mark.anyio
async def test_read_secret_reads_what_element_stored():
    assert await read_secret(storage_as_element_leaves_it(), SELF_SIGNING, JS_KEY) == JS_SECRET


@pytest.mark.anyio
async def test_write_secret_sets_up_storage_and_read_secret_reads_it_back():
    client, key = FakeClient(), new_recovery_key()
    key_id = await write_secret(client, SELF_SIGNING, "seed", key)
    assert client.account_data[DEFAULT_KEY] == {"key": key_id}
    assert key_matches(key, client.account_data[KEY_PREFIX + key_id])
    assert await read_secret(client, SELF_SIGNING, key) == "seed"
    # a second secret goes under the same default key; a rewrite drops encryptions under other keys
    client.account_data["m.cross_signing.master"] = {"encrypted": {"OLD": JS_ENCRYPTED}}
    assert await write_secret(client, "m.cross_signing.master", "master", key) == key_id
    assert list(client.account_data["m.cross_signing.master"]["encrypted"]) == [key_id]
    assert await read_secret(client, "m.cross_signing.master", key) == "master"
    # another recovery key may neither read nor overwrite
    with pytest.raises(SecretStorageError, match=NOT_THIS_KEY):
        await read_secret(client, SELF_SIGNING, new_recovery_key())
    with pytest.raises(SecretStorageError, match=NOT_THIS_KEY):
        await write_secret(client, SELF_SIGNING, "other", new_recovery_key())
    assert await read_secret(client, SELF_SIGNING, key) == "seed"


@pytest.mark.anyio
async def test_write_secret_under_a_named_key_leaves_the_default_alone():
    client, key = storage_as_element_leaves_it(), new_recovery_key()
    assert await write_secret(client, "org.example.secret", "x", key, key_id="MINE") == "MINE"
    assert client.account_data[DEFAULT_KEY] == {"key": "KEYID"}
    assert key_matches(key, client.account_data[KEY_PREFIX + "MINE"])
    with pytest.raises(SecretStorageError, match=NOT_THIS_KEY):
        await write_secret(client, "org.example.secret", "x", key, key_id="KEYID")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.clear(), NO_STORAGE),
        (lambda d: d.update({DEFAULT_KEY: {}}), NO_STORAGE),  # what a client leaves when it turns storage off
        (lambda d: d.pop(SELF_SIGNING), f"secret storage has no {SELF_SIGNING}"),
        (lambda d: d.update({SELF_SIGNING: {}}), f"secret storage has no {SELF_SIGNING}"),
        (lambda d: d.update({SELF_SIGNING: {"encrypted": {"OTHER": JS_ENCRYPTED}}}), "under its default key KEYID"),
        (lambda d: d.pop(KEY_PREFIX + "KEYID"), "has no description"),
        (lambda d: d.update({KEY_PREFIX + "KEYID": JS_KEY_CHECK | {"algorithm": "m.custom"}}), "m.custom"),
        (lambda d: d.update({KEY_PREFIX + "KEYID": {"algorithm": ALGORITHM}}), None),  # no check value: MAC refuses
        (lambda d: d.update({DEFAULT_KEY: {"key": 7}}), "malformed"),
        (lambda d: d.update({DEFAULT_KEY: {"key": "\ud800"}}), "malformed"),  # found by Hypothesis: no URL holds it
        (lambda d: d.update({DEFAULT_KEY: "not json"}), "malformed"),
        (lambda d: d.update({DEFAULT_KEY: ["KEYID"]}), "malformed"),
        (lambda d: d.update({SELF_SIGNING: {"encrypted": "x"}}), "malformed"),
        (lambda d: d.update({SELF_SIGNING: {"encrypted": {"KEYID": JS_ENCRYPTED | {"mac": None}}}}), "malformed"),
    ],
)
@pytest.mark.anyio
async def test_missing_or_malformed_account_data_is_named(change, message):
    client = storage_as_element_leaves_it()
    change(client.account_data)
    key = JS_KEY if message is not None else JS_KEY_2
    with pytest.raises(SecretStorageError) as refused:
        await read_secret(client, SELF_SIGNING, key)
    assert message is None or message in str(refused.value)


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        (Response(500, '{"errcode": "M_UNKNOWN", "error": "boom"}'), "refused to read the account data"),
        (Response(404, "<html>not found</html>"), "404"),  # a 404 that is not Matrix's M_NOT_FOUND
        (Response(401, '{"errcode": "M_UNKNOWN_TOKEN", "error": "gone"}'), "M_UNKNOWN_TOKEN"),
        (aiohttp.ClientConnectionError("connection refused"), "could not read"),
        (TimeoutError(), "TimeoutError"),
    ],
)
@pytest.mark.anyio
async def test_a_homeserver_failure_is_a_secret_storage_error(fail, message):
    client = storage_as_element_leaves_it()
    client.fail = fail
    with pytest.raises(SecretStorageError, match=message):
        await read_secret(client, SELF_SIGNING, JS_KEY)
    with pytest.raises(SecretStorageError):
        await write_secret(client, SELF_SIGNING, "x", JS_KEY)


@given(default=maybe(st.fixed_dictionaries({"key": maybe(st.just("KEYID"))})), description=descriptions,
       secret=maybe(st.fixed_dictionaries({}, optional={"encrypted": maybe(st.fixed_dictionaries({}, optional={"KEYID": encrypted_entries}))})))  # fmt: skip
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_account_data_reads_or_is_refused(default, description, secret):
    client = FakeClient()
    client.account_data = {DEFAULT_KEY: default, KEY_PREFIX + "KEYID": description, SELF_SIGNING: secret}
    try:
        assert isinstance(asyncio.run(read_secret(client, SELF_SIGNING, JS_KEY)), str)
    except SecretStorageError:
        pass
