"""Which devices a room's `trust` accepts, for its room keys and for its prompts.

- all: every device (except one blacklisted in nio's store, which no aiagentchat command does).
- tofu: verified devices, and the devices a user had when the bot first needed to trust one of them (pinned
  with their signing keys in data_dir/crypto/tofu.json); a device added later must be verified.
- cross_signed: devices their owner's cross-signing identity has signed (every signature checked), that
  identity pinned on first sight (data_dir/crypto/identities.json); after it changes, none of the user's
  devices until an operator runs `aiagentchat trust @user`. What today's Element itself requires.
- verified: devices cross-signed by an identity the bot has verified (`aiagentchat verify` or the console, which
  sign it with the bot's user-signing key), or a device verified on its own (for clients without cross-signing).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from nio import AsyncClient
from nio.crypto import OlmDevice

from aiagentchat.identity import Identity, fingerprint, read_devices, read_identity
from aiagentchat.private import read_private, write_private
from aiagentchat.settings import Trust

log = structlog.get_logger(__name__)

VERIFY_HINT = (
    "the operator verifies it from `aiagentchat console` (v: `{user} {device}`), or runs `aiagentchat verify {user} "
    "{device}` with the daemon stopped"
)
CROSS_SIGN_HINT = (
    "{user} verifies that session from one they already trust (in Element: Settings → Sessions → Verify "
    "session) or with their recovery key"
)
ACCEPT_HINT = (
    "if {user} reset their identity on purpose, an operator runs `aiagentchat trust {user}` on the daemon's machine"
)


@dataclass(frozen=True)
class Verdict:
    """Why a device is not accepted, and what a person does about it."""

    reason: str
    fix: str


class Pins:
    """data_dir/crypto/identities.json: {user: {"pinned": master key, "seen": master key}}. The daemon pins a
    user's identity on first sight and records a different one as seen; `aiagentchat trust` makes the seen one
    pinned, while the daemon runs (a lock file orders the writers; every judgement reads the file, a few
    hundred bytes, so the daemon sees an accepted identity at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = path.with_suffix(".lock")

    def get(self, user_id: str) -> dict[str, str]:
        return self._read().get(user_id, {})

    def see(self, user_id: str, master: str) -> bool:
        """Record `master` as `user_id`'s identity now: pinned if it is the first; whether it is the pinned one."""
        pin = self.get(user_id)
        if pin.get("pinned") == master and pin.get("seen") == master:
            return True
        with self._editing() as pins:
            pin = pins.setdefault(user_id, {"pinned": master})
            pin["seen"] = master
        if pin["pinned"] == master:
            log.info("identity_pinned", user_id=user_id, master_key=master)
            return True
        log.warning("identity_changed", user_id=user_id, pinned=pin["pinned"], seen=master, hint=ACCEPT_HINT)
        return False

    def accept(self, user_id: str) -> tuple[str, str] | None:
        """Pin the identity last seen for `user_id`: (old, new), or None when there is nothing to accept."""
        with self._editing() as pins:
            pin = pins.get(user_id)
            if pin is None or pin.get("seen") in (None, pin.get("pinned")):
                return None
            old, pin["pinned"] = pin["pinned"], pin["seen"]
        return old, pin["pinned"]

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(read_private(self.path))
        except FileNotFoundError:
            return {}

    @contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, str]]]:
        fd = os.open(self._lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            pins = self._read()
            yield pins
            write_private(self.path, json.dumps(pins))
        finally:
            os.close(fd)


class DeviceTrust:
    """The policies above, judged on nio's device store and the identities learned from `/keys/query`."""

    def __init__(self, client: AsyncClient, folder: Path) -> None:
        self.client = client
        self.tofu_path = folder / "tofu.json"
        self.tofu: dict[str, dict[str, str]] = (
            json.loads(read_private(self.tofu_path)) if self.tofu_path.exists() else {}
        )
        self.pins = Pins(folder / "identities.json")
        self.identities: dict[str, Identity | None] = {}  # per user queried: their identity, or None (they have none)
        self.devices: dict[str, dict[str, dict[str, Any]]] = {}  # user → device id → device keys as published
        self.user_signing: str | None = None  # the bot's user-signing key, once its identity is ready

    def learn(self, published: dict[str, Any]) -> None:
        """Take in a `/keys/query` answer (the homeserver's, not yet trusted: every signature is checked when
        a device is judged)."""
        device_keys = published.get("device_keys")
        for user_id in device_keys if isinstance(device_keys, dict) else ():
            identity = read_identity(published, user_id)
            self.identities[user_id] = identity
            self.devices[user_id] = read_devices(published, user_id)
            if identity is not None and user_id != self.client.user_id:  # the bot's own: its key file says
                self.pins.see(user_id, identity.master)

    def learned(self, user_id: str) -> bool:
        return user_id in self.identities

    def accepts(self, trust: Trust, device: OlmDevice) -> bool:
        return self.why_not(trust, device) is None

    def why_not(self, trust: Trust, device: OlmDevice) -> Verdict | None:
        """None when `trust` accepts `device`, else why not and what to do."""
        olm = self.client.olm
        if olm is None or olm.is_device_blacklisted(device):
            return Verdict("it is blacklisted in my crypto store", "remove it from the blacklist")
        if trust == "all":
            return None
        if trust == "tofu":
            if olm.is_device_verified(device) or self._first_seen(device):
                return None
            return Verdict(
                f"it appeared after I first met {device.user_id}'s devices and is not verified",
                VERIFY_HINT.format(user=device.user_id, device=device.id),
            )
        if trust == "verified" and olm.is_device_verified(device):
            return None
        problem = self._cross_signing_problem(device)
        if problem is not None or trust == "cross_signed":
            return problem
        identity = self.identities[device.user_id]
        if self.user_signing is not None and identity.verified_by(self.client.user_id, self.user_signing):
            return None
        return Verdict(
            f"{device.user_id}'s identity is not verified by me",
            f"the operator verifies {device.user_id} from `aiagentchat console` (v: `{device.user_id}`), or runs "
            f"`aiagentchat verify {device.user_id}` with the daemon stopped",
        )

    def _cross_signing_problem(self, device: OlmDevice) -> Verdict | None:
        user = device.user_id
        identity = self.identities.get(user)
        cross_sign = CROSS_SIGN_HINT.format(user=user)
        if identity is None and user not in self.identities:
            return Verdict(
                f"I could not fetch {user}'s cross-signing keys from the homeserver",
                "send it again once my homeserver answers (its log shows `key_upkeep_failed` meanwhile)",
            )
        if identity is None:
            return Verdict(
                f"{user} has no cross-signing identity",
                f"{user} sets up cross-signing (in Element: Settings → Encryption → Set up recovery)",
            )
        pin = self.pins.get(user)
        if pin.get("pinned") not in (None, identity.master):
            return Verdict(
                f"{user}'s identity changed since I first met them (master key {fingerprint(pin['pinned'])} then, "
                f"{fingerprint(identity.master)} now)",
                ACCEPT_HINT.format(user=user),
            )
        if not identity.signs(self.devices.get(user, {}).get(device.id), device.ed25519):
            return Verdict("its owner has not cross-signed it", cross_sign)
        return None

    def _first_seen(self, device: OlmDevice) -> bool:
        pinned = self.tofu.get(device.user_id)
        if pinned is None:
            if not self._devices_known(device.user_id):
                return False
            devices = self.client.olm.device_store.active_user_devices(device.user_id)
            pinned = self.tofu[device.user_id] = {known.id: known.ed25519 for known in devices}
            write_private(self.tofu_path, json.dumps(self.tofu))
            log.info("devices_pinned", user_id=device.user_id, devices=sorted(pinned))
        return pinned.get(device.id) == device.ed25519

    def _devices_known(self, user_id: str) -> bool:
        olm = self.client.olm
        return user_id in olm.tracked_users and user_id not in olm.users_for_key_query
