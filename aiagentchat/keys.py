"""`aiagentchat keys export | import | reset` and `aiagentchat trust`: the bot's cross-signing identity carried to
a rebuilt host or replaced, and a person's changed identity accepted.

An export file holds the three private keys encrypted under a fresh recovery key, the way Element keeps them
in secret storage (m.secret_storage.v1.aes-hmac-sha2, one entry per `m.cross_signing.*` secret); the recovery
key is shown once, on the terminal, and is never written anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from aiagentchat.crypto import DeviceLock, crypto_dir, key_file
from aiagentchat.identity import (
    SECRET_NAMES,
    CrossSigningKeys,
    IdentityError,
    fingerprint,
    query,
    sign_own_device,
    upload_identity,
)
from aiagentchat.private import write_private
from aiagentchat.secret_storage import (
    SecretStorageError,
    decode_recovery_key,
    decrypt_secret,
    encode_recovery_key,
    encrypt_secret,
    new_recovery_key,
)
from aiagentchat.settings import Settings
from aiagentchat.transport import login, make_client
from aiagentchat.trust import Pins

log = structlog.get_logger(__name__)

EXPORT_FORMAT = "aiagentchat cross-signing keys 1"


def export_keys(settings: Settings, path: Path) -> tuple[CrossSigningKeys, str]:
    """Write the bot's keys to `path` (0600), encrypted; the keys and the recovery key that opens the file."""
    keys = key_file(settings).load_stored()
    if keys is None:
        raise IdentityError("this data dir has no cross-signing keys yet: start the daemon once to make them")
    recovery = new_recovery_key()
    secrets = {SECRET_NAMES[usage]: encrypt_secret(recovery, SECRET_NAMES[usage], seed)
               for usage, seed in keys.seeds().items()}  # fmt: skip
    body = {"format": EXPORT_FORMAT, "user_id": keys.user_id, "master_key": keys.master_key, "secrets": secrets}
    write_private(path, json.dumps(body, indent=2))
    return keys, encode_recovery_key(recovery)


def import_keys(settings: Settings, path: Path, recovery_key: str) -> CrossSigningKeys:
    """Keep the keys of an export file (opened with its recovery key) as the bot's; the daemon signs its device
    with them on its next start."""
    try:
        body: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != EXPORT_FORMAT or not isinstance(body.get("secrets"), dict):
        raise IdentityError(f"{path} is not a file written by `aiagentchat keys export`")
    key = decode_recovery_key(recovery_key)
    seeds = {}
    for usage, name in SECRET_NAMES.items():
        encrypted = body["secrets"].get(name)
        if not isinstance(encrypted, dict):
            raise IdentityError(f"{path} has no {name}")
        try:
            seeds[usage] = decrypt_secret(key, name, encrypted)
        except SecretStorageError as exc:
            raise IdentityError(f"this recovery key does not open {path}: {exc}") from None
    keys = CrossSigningKeys.from_seeds(str(body.get("user_id")), seeds)
    if keys.master_key != body.get("master_key"):
        raise IdentityError(f"{path}'s keys do not match the master key it names")
    key_file(settings).save(keys)
    return keys


async def reset_keys(settings: Settings) -> CrossSigningKeys:
    """Make and publish a new identity for the bot (its password is needed: the homeserver asks for it before
    replacing one), keep it, and sign the device with it. Runs while the daemon is stopped."""
    lock = DeviceLock(settings)
    client = make_client(settings)
    try:
        await login(client, settings)
        if client.should_upload_keys:
            await client.keys_upload()
        keys = CrossSigningKeys.generate(client.user_id)
        password = settings.matrix.password
        await upload_identity(client, keys, password.get_secret_value() if password else None)
        key_file(settings).save(keys)
        await sign_own_device(client, keys.self_signing, await query(client, [client.user_id]))
        log.info("cross_signing_reset", master_key=keys.master_key, device_id=client.device_id)
        return keys
    finally:
        await client.close()
        lock.release()


def accept_identity(settings: Settings, user_id: str) -> str:
    """Pin the identity the daemon last saw for `user_id`; what happened, for the terminal."""
    accepted = Pins(crypto_dir(settings) / "identities.json").accept(user_id)
    if accepted is None:
        return f"Nothing to accept: the daemon has not seen {user_id}'s identity change."
    old, new = accepted
    return (
        f"✅ Accepted {user_id}'s new identity (master key {fingerprint(new)}; it was {fingerprint(old)}). "
        "Their devices it signed are trusted again from now on."
    )
