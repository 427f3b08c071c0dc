"""Matrix secret storage ("SSSS", spec: Client-Server API, Secrets → Storage) with the algorithm
`m.secret_storage.v1.aes-hmac-sha2`, and recovery keys (spec: Appendices, cryptographic key representation).

A secret is a string kept in the user's account data under its own name (`m.cross_signing.self_signing`, ...),
encrypted under one or more secret storage keys. Each key has an id and a description in the account data
`m.secret_storage.key.<id>` (its algorithm and a check value: the MAC of 32 zero bytes encrypted under it);
`m.secret_storage.default_key` names the key clients use. Element shows the default key to the person as a
recovery key: the 32 key bytes behind a prefix and a parity byte, in base58, in groups of four.

The cryptography is pycryptodome's (HKDF-SHA-256, AES-256-CTR, HMAC-SHA-256), hashlib's PBKDF2 and the base58
package's Bitcoin alphabet; this module only arranges them as the spec says. Everything read from the account
data is checked here, where it enters: a wrong type, a missing field or bad base64 is a SecretStorageError,
never another exception. `read_secret` and `write_secret` reach the homeserver through `AsyncClient.send`,
since nio 0.26 has no getter for arbitrary account data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import string
from functools import reduce
from operator import xor
from typing import Any

import aiohttp
import base58
import nio
from Crypto.Cipher import AES
from Crypto.Hash import HMAC, SHA256
from Crypto.Protocol.KDF import HKDF

from aiagentchat.api import call, segment

ALGORITHM = "m.secret_storage.v1.aes-hmac-sha2"
DEFAULT_KEY = "m.secret_storage.default_key"
KEY_PREFIX = "m.secret_storage.key."

_RECOVERY_PREFIX = b"\x8b\x01"
_KEY_BYTES = 32
_IV_BYTES = 16
_MAC_BYTES = 32
_KEY_ID_ALPHABET = string.ascii_letters + string.digits
_MISTYPED = "the recovery key is mistyped"
_NOT_THIS_KEY = "this recovery key is not the one of the account's secret storage"
_NO_STORAGE = "no secret storage set up on this account (in Element: Settings → Encryption → Set up recovery)"


class SecretStorageError(Exception):
    """Secret storage cannot be read or written; the message says why, in words a person can act on."""


# --- recovery keys ---------------------------------------------------------------------------------------------


def new_recovery_key() -> bytes:
    """A fresh secret storage key: 32 random bytes."""
    return secrets.token_bytes(_KEY_BYTES)


def encode_recovery_key(key: bytes) -> str:
    """The key as a person sees it: 0x8B 0x01, the key, a parity byte (all bytes before it XORed), in base58
    (Bitcoin alphabet), in groups of four characters separated by spaces."""
    if len(key) != _KEY_BYTES:
        raise ValueError(f"a recovery key holds {_KEY_BYTES} bytes, not {len(key)}")
    data = _RECOVERY_PREFIX + key
    text = base58.b58encode(data + bytes([reduce(xor, data, 0)])).decode("ascii")
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def decode_recovery_key(text: str) -> bytes:
    """The 32 key bytes of a recovery key as a person typed it (whitespace anywhere is ignored)."""
    compact = "".join(text.split())
    try:
        data = base58.b58decode(compact)
    except ValueError:  # a character outside the alphabet (0, O, I, l, punctuation, non-ASCII)
        raise SecretStorageError(f"{_MISTYPED}: it has a character that is not in a recovery key") from None
    if len(data) != len(_RECOVERY_PREFIX) + _KEY_BYTES + 1:
        raise SecretStorageError(f"{_MISTYPED}: it is too short or too long")
    if data[: len(_RECOVERY_PREFIX)] != _RECOVERY_PREFIX:
        raise SecretStorageError(f"{_MISTYPED}: it does not start as a recovery key does")
    if reduce(xor, data, 0) != 0:
        raise SecretStorageError(f"{_MISTYPED}: its check byte does not match (one of its characters is wrong)")
    return data[len(_RECOVERY_PREFIX) : -1]


def passphrase_key(passphrase: str, salt: str, iterations: int, bits: int = 256) -> bytes:
    """The key derived from a passphrase by `m.pbkdf2`: PBKDF2 with HMAC-SHA-512 over the UTF-8 passphrase and
    salt. The parameters come from the key description's `passphrase` object, so they are checked."""
    if not isinstance(passphrase, str):
        raise SecretStorageError("the passphrase is not text")
    if not isinstance(salt, str):
        raise SecretStorageError("the key's passphrase settings are malformed (salt is not a string)")
    if not _is_int(iterations) or iterations < 1:
        raise SecretStorageError("the key's passphrase settings are malformed (iterations is not a positive integer)")
    if not _is_int(bits) or bits < 8 or bits % 8:
        raise SecretStorageError("the key's passphrase settings are malformed (bits is not a multiple of 8)")
    try:
        passphrase_bytes, salt_bytes = passphrase.encode(), salt.encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON can carry one, UTF-8 cannot
        raise SecretStorageError("the passphrase or its salt is not valid text") from None
    return hashlib.pbkdf2_hmac("sha512", passphrase_bytes, salt_bytes, iterations, dklen=bits // 8)


# --- m.secret_storage.v1.aes-hmac-sha2 --------------------------------------------------------------------------


def encrypt_secret(key: bytes, name: str, secret: str) -> dict[str, str]:
    """`secret` encrypted under `key` for the account data `name`: {"iv", "ciphertext", "mac"}, in padded base64
    as Element writes them (the spec asks for unpadded, and every reader must accept both)."""
    iv, ciphertext, mac = _encrypt(key, name, secret.encode())
    return {"iv": _b64(iv), "ciphertext": _b64(ciphertext), "mac": _b64(mac)}


def decrypt_secret(key: bytes, name: str, encrypted: dict) -> str:
    """The secret in `encrypted` (one entry of an account data event's `encrypted` map), after checking its MAC.
    A wrong key, altered data or a malformed entry is a SecretStorageError."""
    if not isinstance(encrypted, dict):
        raise SecretStorageError(f"the stored {name} is malformed (not an object)")
    iv = _field(encrypted, "iv", f"the stored {name}", _IV_BYTES)
    ciphertext = _field(encrypted, "ciphertext", f"the stored {name}")
    mac = _field(encrypted, "mac", f"the stored {name}", _MAC_BYTES)
    aes_key, mac_key = _derive(key, name)
    try:
        HMAC.new(mac_key, ciphertext, digestmod=SHA256).verify(mac)
    except ValueError:
        raise SecretStorageError(
            f"{name} does not decrypt with this key: the key is not the one it was stored with, "
            "or the stored data was altered"
        ) from None
    plaintext = AES.new(aes_key, AES.MODE_CTR, nonce=b"", initial_value=iv).decrypt(ciphertext)
    try:
        return plaintext.decode()
    except UnicodeDecodeError:
        raise SecretStorageError(f"the stored {name} is not text (it was written by a faulty client)") from None


def key_description(key: bytes, name: str = "") -> dict:
    """The content of the account data `m.secret_storage.key.<id>` for `key`: its algorithm and check value
    (the IV and MAC of 32 zero bytes encrypted under the key with the secret name ""), and `name` if given."""
    iv, _, mac = _encrypt(key, "", bytes(32))
    description = {"algorithm": ALGORITHM, "iv": _b64(iv), "mac": _b64(mac)}
    if name:
        description["name"] = name
    return description


def key_matches(key: bytes, description: dict) -> bool:
    """Whether `key` is the key `description` (account data `m.secret_storage.key.<id>`) describes: the spec's
    check, 32 zero bytes encrypted with its IV and the secret name "", MACs compared in constant time. A
    description without a check value matches any key, as the spec says (a wrong key then fails each secret's
    own MAC). A description of another algorithm, or a malformed one, is a SecretStorageError."""
    if not isinstance(description, dict):
        raise SecretStorageError("the secret storage key's description is malformed (not an object)")
    algorithm = description.get("algorithm")
    if algorithm != ALGORITHM:
        shown = json.dumps(algorithm)[:80]
        raise SecretStorageError(
            f"the account's secret storage key uses the algorithm {shown}, which is not supported (only {ALGORITHM} is)"
        )
    if description.get("iv") is None or description.get("mac") is None:
        return True
    where = "the secret storage key's description"
    iv = _field(description, "iv", where, _IV_BYTES)
    expected = _field(description, "mac", where, _MAC_BYTES)
    _, _, mac = _encrypt(key, "", bytes(32), iv)
    return hmac.compare_digest(mac, expected)


def _derive(key: bytes, name: str) -> tuple[bytes, bytes]:
    """HKDF-SHA-256 of the key with 32 zero bytes of salt and the secret's name as info: 64 bytes, the first 32
    the AES key and the last 32 the HMAC key."""
    aes_key, mac_key = HKDF(key, 32, bytes(32), SHA256, num_keys=2, context=name.encode())
    return aes_key, mac_key


def _encrypt(key: bytes, name: str, plaintext: bytes, iv: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """(iv, ciphertext, mac): AES-256-CTR with the whole 16-byte IV as the first counter block, then
    HMAC-SHA-256 of the ciphertext. A fresh IV has bit 63 cleared, so the low 64 bits of the counter never wrap
    (implementations that count in 64 bits and those that count in 128 agree)."""
    if iv is None:
        fresh = bytearray(secrets.token_bytes(_IV_BYTES))
        fresh[8] &= 0x7F
        iv = bytes(fresh)
    aes_key, mac_key = _derive(key, name)
    ciphertext = AES.new(aes_key, AES.MODE_CTR, nonce=b"", initial_value=iv).encrypt(plaintext)
    return iv, ciphertext, HMAC.new(mac_key, ciphertext, digestmod=SHA256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(content: dict, field: str, where: str, size: int | None = None) -> bytes:
    """The bytes of a base64 string field (padded or unpadded, standard alphabet), of `size` bytes if given."""
    value = content.get(field)
    if not isinstance(value, str):
        problem = "missing" if value is None else "not a string"
        raise SecretStorageError(f"{where} is malformed ({field} is {problem})")
    try:
        unpadded = value.rstrip("=")
        data = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretStorageError(f"{where} is malformed ({field} is not base64)") from None
    if size is not None and len(data) != size:
        raise SecretStorageError(f"{where} is malformed ({field} has {len(data)} bytes, not {size})")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- account data ----------------------------------------------------------------------------------------------


async def read_secret(client: nio.AsyncClient, name: str, key: bytes) -> str:
    """The secret `name` from the logged-in client's own account data, decrypted with `key` (the default secret
    storage key, e.g. from `decode_recovery_key`)."""
    key_id = await _default_key_id(client)
    if key_id is None:
        raise SecretStorageError(_NO_STORAGE)
    description = await _account_data(client, KEY_PREFIX + key_id)
    if description is None:
        raise SecretStorageError(
            f"the account's secret storage is incomplete: its default key {key_id} has no description "
            f"(account data {KEY_PREFIX}{key_id}); set up recovery again in Element"
        )
    if not key_matches(key, description):
        raise SecretStorageError(_NOT_THIS_KEY)
    content = await _account_data(client, name)
    encrypted = (content or {}).get("encrypted")
    if encrypted is None:
        raise SecretStorageError(f"secret storage has no {name}")
    if not isinstance(encrypted, dict):
        raise SecretStorageError(f"the stored {name} is malformed (encrypted is not an object)")
    if key_id not in encrypted:
        raise SecretStorageError(f"secret storage has no {name} under its default key {key_id}")
    return decrypt_secret(key, name, encrypted[key_id])


async def write_secret(client: nio.AsyncClient, name: str, secret: str, key: bytes, key_id: str | None = None) -> str:
    """Store `secret` as the account data `name`, encrypted under `key`, and return the key's id.

    With no `key_id`, the key is the account's default key: `key` must match it, or, when the account has none,
    a new key description is written for `key` and made the default. With a `key_id`, that key's description is
    written if there is none, and must match `key` if there is one. Encryptions of `name` under other keys are
    dropped, since they would hold the old value."""
    if key_id is None:
        key_id = await _default_key_id(client)
        make_default = key_id is None
        if key_id is None:
            key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(32))
    else:
        make_default = False
    description = await _account_data(client, KEY_PREFIX + key_id)
    if description is None:
        await _account_data(client, KEY_PREFIX + key_id, key_description(key))
    elif not key_matches(key, description):
        raise SecretStorageError(_NOT_THIS_KEY)
    if make_default:
        await _account_data(client, DEFAULT_KEY, {"key": key_id})
    await _account_data(client, name, {"encrypted": {key_id: encrypt_secret(key, name, secret)}})
    return key_id


async def _default_key_id(client: nio.AsyncClient) -> str | None:
    """The id of the account's default secret storage key; None if there is none (an empty content, as some
    clients leave when they turn secret storage off, counts as none)."""
    content = await _account_data(client, DEFAULT_KEY)
    if content is None or "key" not in content:
        return None
    key_id = content["key"]
    if not isinstance(key_id, str) or not key_id or not key_id.isprintable() or not _is_unicode(key_id):
        raise SecretStorageError(f"the account data {DEFAULT_KEY} is malformed (key is not a key id)")
    return key_id


def _is_unicode(text: str) -> bool:
    """False for a string with a lone surrogate (JSON allows one; no URL or UTF-8 file can hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _account_data(client: nio.AsyncClient, kind: str, content: dict | None = None) -> dict | None:
    """GET (content None) or PUT the account data `kind` of the client's user. A GET returns the content, or
    None when the homeserver has none (404 M_NOT_FOUND)."""
    verb, method = ("read", "GET") if content is None else ("write", "PUT")
    try:
        reply = await call(client, method, f"/user/{segment(client.user_id)}/account_data/{segment(kind)}", content)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise SecretStorageError(
            f"could not {verb} the account data {kind}: {str(error) or type(error).__name__}"
        ) from error
    if reply.status == 404 and method == "GET" and reply.body.get("errcode") == "M_NOT_FOUND":
        return None
    if not reply.ok:
        raise SecretStorageError(f"the homeserver refused to {verb} the account data {kind}: {reply.error()}")
    if method == "PUT":
        return None
    if not reply.is_object:
        raise SecretStorageError(f"the account data {kind} is malformed (not a JSON object)")
    return reply.body
