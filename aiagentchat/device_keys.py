"""A matrix-nio device's end-to-end keys, for the daemon (crypto.py) and `cchat` alike, without the daemon's
pipeline: the crypto store's pickle key, and the key upkeep after each sync."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from aiagentchat.errors import ConfigError
from aiagentchat.private import read_private, write_private

if TYPE_CHECKING:
    from nio import AsyncClient


def store_key(configured: str | None, key_file: Path, store: Path) -> str:
    """A crypto store's pickle key: `configured`, else the 0600 `key_file` (generated on first use). A key
    other than the one the store was made with is refused (ConfigError); nio would fail deep inside login."""
    if configured is not None:
        key = configured
    else:
        if not key_file.exists():
            write_private(key_file, secrets.token_urlsafe(32))
        key = read_private(key_file).strip()
    check = store / "pickle_key.check"
    digest = hashlib.sha256(b"aiagentchat pickle key\0" + key.encode()).hexdigest()
    if not check.exists():
        write_private(check, digest)
    elif read_private(check).strip() != digest:
        raise ConfigError(
            f"the pickle key ({key_file} or its environment variable) is not the one that encrypted the crypto "
            f"store in {store}: restore that key, or move the store away to start over as a new device"
        )
    return key


async def upkeep(client: AsyncClient) -> None:
    """What nio's sync_forever does after each sync: keys uploaded, queried and claimed, to-device sent."""
    if not client.olm:
        return
    if client.should_upload_keys:
        await client.keys_upload()
    if client.should_query_keys:
        await client.keys_query()
    if client.should_claim_keys:
        await client.keys_claim(client.get_users_for_key_claiming())
    await client.send_to_device_messages()
