"""Cross-signing: the bot's own identity, and reading other users' identities from `/keys/query`.

Today's Element shares room keys only with devices their owner has cross-signed (MSC4153). The bot's identity
is three Ed25519 keys: the master key (the identity itself), the self-signing key (signs the bot's devices)
and the user-signing key (signs the identities of people the bot has verified), the last two signed by the
master key. Their private halves live in data_dir/crypto/cross_signing.json, encrypted under the pickle key.
Signing and checking use matrix-org's `signedjson` over `canonicaljson`, exactly as Synapse checks them.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.secret
import nacl.utils
import structlog
from nio import AsyncClient
from signedjson.key import (
    decode_signing_key_base64,
    decode_verify_key_base64,
    encode_signing_key_base64,
    encode_verify_key_base64,
    get_verify_key,
)
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey

from aiagentchat.api import call
from aiagentchat.private import read_private, write_private
from aiagentchat.secret_storage import read_secret

log = structlog.get_logger(__name__)

USAGES = ("master", "self_signing", "user_signing")
SECRET_NAMES = {usage: f"m.cross_signing.{usage}" for usage in USAGES}  # as Element names them in secret storage
RESET_HINT = (
    "import its keys with `aiagentchat keys import FILE` (written by `aiagentchat keys export` on the old host), "
    "or make a new identity with `aiagentchat keys reset` (people who verified the bot must verify it again)"
)


class IdentityError(Exception):
    """A cross-signing step failed in a way a person must act on; the message says how."""


def signing_key(seed_b64: str) -> SigningKey:
    """A cross-signing key from its 32-byte seed; its key id is `ed25519:<public key>`, as the spec wants."""
    key = decode_signing_key_base64("ed25519", "_", seed_b64)
    key.version = encode_verify_key_base64(get_verify_key(key))
    return key


def public(key: SigningKey) -> str:
    return encode_verify_key_base64(get_verify_key(key))


@dataclass(frozen=True)
class CrossSigningKeys:
    """The private halves of one user's cross-signing identity."""

    user_id: str
    master: SigningKey
    self_signing: SigningKey
    user_signing: SigningKey

    @classmethod
    def generate(cls, user_id: str) -> CrossSigningKeys:
        seeds = {usage: _b64(nacl.utils.random(32)) for usage in USAGES}
        return cls.from_seeds(user_id, seeds)

    @classmethod
    def from_seeds(cls, user_id: str, seeds: dict[str, str]) -> CrossSigningKeys:
        return cls(user_id, *(signing_key(seeds[usage]) for usage in USAGES))

    def seeds(self) -> dict[str, str]:
        return {usage: encode_signing_key_base64(getattr(self, usage)) for usage in USAGES}

    @property
    def master_key(self) -> str:
        return public(self.master)

    @property
    def user_signing_key(self) -> str:
        return public(self.user_signing)

    def upload_body(self) -> dict[str, Any]:
        """The body of `/keys/device_signing/upload`: the three public keys, the other two signed by the master."""
        master = key_object(self.user_id, "master", self.master_key)
        signed = {
            usage: sign_json(key_object(self.user_id, usage, public(getattr(self, usage))), self.user_id, self.master)
            for usage in ("self_signing", "user_signing")
        }
        return {
            "master_key": master,
            "self_signing_key": signed["self_signing"],
            "user_signing_key": signed["user_signing"],
        }

    def sign_identity(self, master: dict[str, Any]) -> dict[str, Any]:
        """Another user's master key object with our user-signing key's signature: we verified them."""
        return sign_json(_unsigned_copy(master), self.user_id, self.user_signing)


def sign_device(device: dict[str, Any], user_id: str, self_signing: SigningKey) -> dict[str, Any]:
    """`device` (its keys as the homeserver publishes them) with the self-signing key's signature added."""
    return sign_json(_unsigned_copy(device), user_id, self_signing)


def key_object(user_id: str, usage: str, key: str) -> dict[str, Any]:
    return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{key}": key}}


def _unsigned_copy(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without `unsigned` (which is not signed), keeping the signatures others made."""
    result = copy.deepcopy(obj)
    result.pop("unsigned", None)
    return result


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


# --- reading what the homeserver publishes --------------------------------------------------------------------


def key_of(obj: Any, user_id: str, usage: str) -> str | None:
    """The public key in a cross-signing key object, if it is well formed, belongs to `user_id` and has `usage`."""
    if not isinstance(obj, dict) or obj.get("user_id") != user_id:
        return None
    usages, keys = obj.get("usage"), obj.get("keys")
    if not isinstance(usages, list) or usage not in usages or not isinstance(keys, dict) or len(keys) != 1:
        return None
    ((key_id, key),) = keys.items()
    return key if isinstance(key, str) and key_id == f"ed25519:{key}" and _is_ed25519_key(key) else None


def _is_ed25519_key(text: str) -> bool:
    """An Ed25519 public key in unpadded base64: 32 bytes, nothing else (no stray characters, no surrogates)."""
    try:
        return len(base64.b64decode(text + "=" * (-len(text) % 4), validate=True)) == 32
    except ValueError:
        return False


def signed_by(obj: Any, user_id: str, key: str) -> bool:
    """Whether `obj` carries a valid signature by `user_id`'s Ed25519 key `key` (any malformation: False)."""
    if not isinstance(obj, dict):
        return False
    try:
        verify_signed_json(obj, user_id, decode_verify_key_base64("ed25519", key, key))
    except (SignatureVerifyException, nacl.exceptions.CryptoError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A user's cross-signing identity as `/keys/query` published it, with every signature checked."""

    user_id: str
    master: str
    self_signing: str | None  # None: absent, or not signed by the master key
    master_object: dict[str, Any]

    def signs(self, device: Any, ed25519: str) -> bool:
        """Whether `device` (the raw device keys object) is this user's device with Ed25519 key `ed25519`,
        signed by their self-signing key."""
        if self.self_signing is None or not isinstance(device, dict) or device.get("user_id") != self.user_id:
            return False
        keys = device.get("keys")
        device_id = device.get("device_id")
        if not isinstance(keys, dict) or not isinstance(device_id, str) or keys.get(f"ed25519:{device_id}") != ed25519:
            return False
        return signed_by(device, self.user_id, self.self_signing)

    def verified_by(self, user_id: str, user_signing: str) -> bool:
        """Whether `user_id`'s user-signing key has signed this identity (they verified this user)."""
        return signed_by(self.master_object, user_id, user_signing)


def read_identity(published: dict[str, Any], user_id: str) -> Identity | None:
    """`user_id`'s identity from a `/keys/query` answer, or None when it has no well-formed master key."""
    master_object = _entry(published, "master_keys", user_id)
    master = key_of(master_object, user_id, "master")
    if master is None:
        return None
    self_signing_object = _entry(published, "self_signing_keys", user_id)
    self_signing = key_of(self_signing_object, user_id, "self_signing")
    if self_signing is not None and not signed_by(self_signing_object, user_id, master):
        self_signing = None
    return Identity(user_id, master, self_signing, master_object)


def read_devices(published: dict[str, Any], user_id: str) -> dict[str, dict[str, Any]]:
    """`user_id`'s raw device keys objects by device id from a `/keys/query` answer (malformed ones left out)."""
    devices = _entry(published, "device_keys", user_id)
    if not isinstance(devices, dict):
        return {}
    return {device_id: obj for device_id, obj in devices.items() if isinstance(obj, dict)}


def _entry(published: dict[str, Any], field: str, user_id: str) -> Any:
    table = published.get(field)
    return table.get(user_id) if isinstance(table, dict) else None


def fingerprint(key: str) -> str:
    return " ".join(key[i : i + 4] for i in range(0, min(len(key), 24), 4)) + ("…" if len(key) > 24 else "")


# --- the homeserver ---------------------------------------------------------------------------------------------


async def query(client: AsyncClient, users: list[str]) -> dict[str, Any]:
    reply = await call(client, "POST", "/keys/query", {"device_keys": {user: [] for user in users}})
    if not reply.ok:
        raise IdentityError(f"the homeserver refused a key query: {reply.error()}")
    return reply.body


async def upload_identity(client: AsyncClient, keys: CrossSigningKeys, password: str | None) -> None:
    """Publish the identity. A first upload needs no password on current Synapse (MSC3967); replacing one
    does (user-interactive auth with the password flow)."""
    body = keys.upload_body()
    reply = await call(client, "POST", "/keys/device_signing/upload", body)
    if reply.status == 401 and "flows" in reply.body:
        if password is None:
            raise IdentityError(
                "the homeserver wants the bot's password to replace its cross-signing identity: run this again "
                "with AIAGENTCHAT_MATRIX__PASSWORD set"
            )
        identifier = {"type": "m.id.user", "user": client.user_id}
        body["auth"] = {"type": "m.login.password", "identifier": identifier, "password": password}
        if isinstance(reply.body.get("session"), str):
            body["auth"]["session"] = reply.body["session"]
        reply = await call(client, "POST", "/keys/device_signing/upload", body)
    if not reply.ok:
        raise IdentityError(f"the homeserver refused the bot's cross-signing keys: {reply.error()}")


async def upload_signatures(client: AsyncClient, signed: dict[str, dict[str, Any]]) -> None:
    """`/keys/signatures/upload` for {user id: {device id or master key: signed object}}."""
    reply = await call(client, "POST", "/keys/signatures/upload", signed)
    failures = reply.body.get("failures")
    if not reply.ok or failures:
        detail = reply.error() if not reply.ok else json.dumps(failures)[:300]
        raise IdentityError(f"the homeserver refused a cross-signing signature: {detail}")


async def sign_own_device(client: AsyncClient, self_signing: SigningKey, published: dict[str, Any]) -> bool:
    """Sign the client's device with `self_signing` unless the homeserver (`published`, a `/keys/query` answer)
    already has that signature; whether a signature was uploaded."""
    device = read_devices(published, client.user_id).get(client.device_id)
    if device is None:
        raise IdentityError(f"the homeserver has no keys for the device {client.device_id} yet")
    if signed_by(device, client.user_id, public(self_signing)):
        return False
    await upload_signatures(
        client, {client.user_id: {client.device_id: sign_device(device, client.user_id, self_signing)}}
    )
    return True


async def own_device_signed(client: AsyncClient) -> bool:
    """Whether the client's own identity has cross-signed the client's device (what Element requires)."""
    published = await query(client, [client.user_id])
    identity = read_identity(published, client.user_id)
    device = read_devices(published, client.user_id).get(client.device_id)
    ed25519 = client.olm.account.identity_keys["ed25519"] if client.olm is not None else ""
    return identity is not None and identity.signs(device, ed25519)


async def sign_with_secret_storage(client: AsyncClient, recovery_key: bytes) -> Identity:
    """Sign the client's device with the user's self-signing key, read from their secret storage with their
    recovery key (what Element does when a person verifies a new session with the recovery key)."""
    seed = await read_secret(client, SECRET_NAMES["self_signing"], recovery_key)
    try:
        self_signing = signing_key(seed)
    except (ValueError, TypeError, nacl.exceptions.CryptoError):
        raise IdentityError("the self-signing key in your secret storage is not a key") from None
    published = await query(client, [client.user_id])
    identity = read_identity(published, client.user_id)
    if identity is None:
        raise IdentityError("your account has no cross-signing identity: set one up in Element (Settings → Encryption)")
    if identity.self_signing != public(self_signing):
        raise IdentityError(
            "the self-signing key in your secret storage is not the one your identity publishes: "
            "set up recovery again in Element (Settings → Encryption)"
        )
    await sign_own_device(client, self_signing, published)
    return identity


# --- the bot's private keys on disk -----------------------------------------------------------------------------


class KeyFile:
    """data_dir/crypto/cross_signing.json (0600): the master public key in the clear, the seeds in a secret
    box whose key is derived from the pickle key."""

    def __init__(self, path: Path, pickle_key: str) -> None:
        self.path = path
        self._box = nacl.secret.SecretBox(hashlib.sha256(b"aiagentchat cross-signing\0" + pickle_key.encode()).digest())

    def load(self, user_id: str) -> CrossSigningKeys | None:
        keys = self.load_stored()
        if keys is not None and keys.user_id != user_id:
            raise IdentityError(f"{self.path} holds the cross-signing keys of {keys.user_id}, not {user_id}")
        return keys

    def load_stored(self) -> CrossSigningKeys | None:
        """The keys kept here, whoever they belong to; None when there are none."""
        if not self.path.exists():
            return None
        try:
            stored = json.loads(read_private(self.path))
            seeds = json.loads(self._box.decrypt(base64.b64decode(stored["box"])))
            return CrossSigningKeys.from_seeds(stored["user_id"], seeds)
        except nacl.exceptions.CryptoError:
            raise IdentityError(f"{self.path} was not written with this pickle key") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise IdentityError(
                f"{self.path} is damaged ({type(exc).__name__}: {exc}); restore it from "
                "`aiagentchat keys export`, or `aiagentchat keys reset`"
            ) from None

    def save(self, keys: CrossSigningKeys) -> None:
        box = base64.b64encode(self._box.encrypt(json.dumps(keys.seeds()).encode())).decode()
        write_private(self.path, json.dumps({"user_id": keys.user_id, "master_key": keys.master_key, "box": box}))


async def ensure_identity(client: AsyncClient, key_file: KeyFile, password: str | None) -> CrossSigningKeys | None:
    """At start: make and publish the bot's identity if the account has none, and sign this device with it.
    An identity published without its private keys here is reported (one line: what to do) and None returned;
    the daemon then runs with an unsigned device."""
    if client.should_upload_keys:
        await client.keys_upload()
    published = await query(client, [client.user_id])
    ours = key_file.load(client.user_id)
    theirs = read_identity(published, client.user_id)
    if theirs is None:
        keys = ours or CrossSigningKeys.generate(client.user_id)
        key_file.save(keys)  # before publishing: a crash in between must not leave an identity we lack
        await upload_identity(client, keys, password)
        published = await query(client, [client.user_id])
        log.info("cross_signing_published", master_key=keys.master_key, new=ours is None)
    elif ours is None or ours.master_key != theirs.master or theirs.self_signing != public(ours.self_signing):
        log.error(
            "cross_signing_keys_missing",
            master_key=theirs.master,
            detail="the bot's account has a cross-signing identity whose private keys this daemon does not have, "
            "so its device stays unsigned and today's Element will not share room keys with it: " + RESET_HINT,
        )
        return None
    else:
        keys = ours
    signed = await sign_own_device(client, keys.self_signing, published)
    log.info("cross_signing_ready", master_key=keys.master_key, device_id=client.device_id, device_signed_now=signed)
    return keys
