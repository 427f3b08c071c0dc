"""End-to-end encryption for the daemon: the crypto store's secret and lock, the rooms' trust policies, and
prompts that wait for their room key.

nio shares a room key with every device of every member; it has no per-room device filter. `Crypto.attach`
wraps the Olm machine's sharing step so that each room's `trust` decides, at the moment a key is shared,
which devices are left out (nio's own outbound session keeps them in `users_ignored`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import aiohttp
import structlog
from nio import (
    AsyncClient,
    EncryptionError,
    ForwardedRoomKeyEvent,
    GroupEncryptionError,
    KeysQueryResponse,
    KeyVerificationStart,
    LocalProtocolError,
    MegolmEvent,
    OlmTrustError,
    ToDeviceMessage,
    UnknownToDeviceEvent,
)
from nio.crypto import OlmDevice

from aiagentchat.batcher import Batcher, Block, EndOfRun
from aiagentchat.device_keys import store_key, upkeep
from aiagentchat.identity import CrossSigningKeys, IdentityError, KeyFile, ensure_identity
from aiagentchat.private import read_private, write_private
from aiagentchat.settings import ConfigError, RoomSettings, Settings, Trust
from aiagentchat.trust import DeviceTrust

if TYPE_CHECKING:
    from aiagentchat.verify import Verification

log = structlog.get_logger(__name__)

NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)
KEYS_WAIT_S = 10.0  # how long a prompt waits for its sender's device list before it is judged on the devices known
CRYPTO_ERRORS = (LocalProtocolError, EncryptionError, GroupEncryptionError, OlmTrustError)  # room_send may raise


def crypto_dir(settings: Settings) -> Path:
    path = settings.paths.data_dir / "crypto"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def pickle_key(settings: Settings) -> str:
    """The secret that encrypts the daemon's crypto store: `matrix.pickle_key` (from the environment, say),
    else data_dir/pickle_key."""
    configured = settings.matrix.pickle_key
    key_file = settings.paths.data_dir / "pickle_key"
    return store_key(configured.get_secret_value() if configured else None, key_file, crypto_dir(settings))


def cross_signing_path(settings: Settings) -> Path:
    """The file of the bot's cross-signing keys (nothing made: `doctor` only reads it)."""
    return settings.paths.data_dir / "crypto" / "cross_signing.json"


def key_file(settings: Settings) -> KeyFile:
    """Where the bot's cross-signing keys are kept, sealed with the pickle key."""
    return KeyFile(cross_signing_path(settings), pickle_key(settings))


class DeviceLock:
    """One process at a time uses the bot's device and crypto store: the daemon or `aiagentchat verify`.
    Two would both advance the same Olm sessions and break them."""

    def __init__(self, settings: Settings) -> None:
        path = crypto_dir(settings) / "lock"
        self._file: TextIO = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the process' life
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(
                f"the bot's device is in use by pid {holder} (the daemon or `aiagentchat verify`, lock {path}); "
                "stop it first"
            ) from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        self._file.close()


def refused(event_id: str, text: str) -> EndOfRun:
    """The end of a message that was not run: refused, like a prompt its room's worker refuses (❌)."""
    return EndOfRun(event_id, {"ok": False, "result": text}, "refused")


def describe(device: OlmDevice) -> str:
    name = f" ({device.display_name})" if device.display_name else ""
    return f"{device.user_id}'s device {device.id}{name}"


@dataclass
class Waiting:
    """A prompt that could not be decrypted yet; its room key may still come until `deadline` (epoch s)."""

    room_id: str
    event: MegolmEvent
    deadline: float

    def to_json(self) -> dict[str, Any]:
        return {"room_id": self.room_id, "deadline": self.deadline, "event": self.event.source}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Waiting:
        event = MegolmEvent.from_dict(data["event"])
        event.room_id = data["room_id"]
        return cls(data["room_id"], event, data["deadline"])


Deliver = Callable[[str, RoomSettings, Any], Awaitable[None]]


class Crypto:
    """The daemon's encryption helper: trust when sharing room keys and accepting prompts, undecryptable
    prompts held until their key arrives (or a notice after the room's `key_wait_s`), and verification
    requests declined with a pointer to `aiagentchat verify`, except those of the one the console runs."""

    def __init__(
        self,
        client: AsyncClient,
        settings: Settings,
        rooms: Mapping[str, RoomSettings],
        batcher_of: Callable[[str], Batcher | None],
        deliver: Deliver,
    ) -> None:
        self.client = client
        self.rooms = rooms
        self._batcher_of = batcher_of
        self._deliver = deliver
        folder = crypto_dir(settings)
        self.trust = DeviceTrust(client, folder)
        self.key_file = key_file(settings)
        self.identity: CrossSigningKeys | None = None
        self._password = settings.matrix.password.get_secret_value() if settings.matrix.password else None
        self._waiting_path = folder / "waiting.json"
        self._waiting: dict[str, Waiting] = {}
        self._told: set[tuple[str, str, str]] = set()  # (room, user, device) the room heard is left out
        self._left_out: dict[str, list[OlmDevice]] = {}
        self._kicked = asyncio.Event()
        self.identity_settled = False  # the identity is published and the device signed, or that failed for good
        self._unkeyed: list[tuple[str, RoomSettings, Any, float]] = []  # prompts waiting for a device list
        self._keys_checked: set[str] = set()  # the ids of those released from that wait, considered now
        self.verification: Verification | None = None  # the one the console runs: fed after each sync, not declined

    # --- wiring ---------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """After login (the Olm machine exists): filter key sharing by trust, accept a forwarded key from
        the device that made it, decline verification while the daemon runs, and take up the prompts that
        were waiting for their key when the daemon last stopped."""
        olm = self.client.olm
        if olm is None:
            return
        share = olm.share_group_session_parallel
        query = self.client.keys_query
        accept_forward = olm._should_accept_forward
        decrypt = olm._decrypt_megolm_no_error

        def share_trusted(room_id: str, users: list[str], ignore_unverified_devices: bool = False) -> Any:
            session = olm.outbound_group_sessions.get(room_id)
            if session is None or session.shared:
                olm.create_outbound_group_session(room_id)
                session = olm.outbound_group_sessions[room_id]
            session.users_ignored.update(self._leave_out(room_id, users))
            return share(room_id, users, ignore_unverified_devices=True)

        def accept_own_forward(sender: str, sender_key: str, event: ForwardedRoomKeyEvent) -> bool:
            return self._forwarded_by_owner(sender, sender_key, event) or accept_forward(sender, sender_key, event)

        def decrypt_or_none(event: MegolmEvent, room_id: str | None = None) -> Any:
            """nio asserts that an encrypted event names its session and sender key: an event from any room
            member without them would raise in the middle of nio's sync handling. Left undecrypted, it goes
            to the intake, which calls it malformed."""
            if not event.session_id or not event.sender_key:
                return None
            return decrypt(event, room_id)

        async def query_and_learn() -> Any:
            """nio keeps only the device keys of a `/keys/query` answer; the trust policies need all of it."""
            response = await query()
            if isinstance(response, KeysQueryResponse) and response.transport_response is not None:
                self.trust.learn(await response.transport_response.json(content_type=None))
                self._rotate_for_newly_trusted()
            return response

        self.client.keys_query = query_and_learn
        olm.users_for_key_query.update(olm.tracked_users)  # their identities, for the policies, on the first upkeep
        olm.share_group_session_parallel = share_trusted
        olm._should_accept_forward = accept_own_forward
        olm._decrypt_megolm_no_error = decrypt_or_none
        self.client.add_to_device_callback(self._decline_verification, (KeyVerificationStart, UnknownToDeviceEvent))
        if self._waiting_path.exists():
            for data in json.loads(read_private(self._waiting_path)):
                waiting = Waiting.from_json(data)
                self._waiting[waiting.event.event_id] = waiting

    async def upkeep(self) -> None:
        """After each sync: nio's key upkeep (retried after the next sync if the homeserver is unreachable),
        then a look at the prompts waiting for a key."""
        try:
            await upkeep(self.client)
        except NETWORK_ERRORS as exc:
            log.warning("key_upkeep_failed", error=f"{type(exc).__name__}: {exc}")
        if self.verification is not None:
            self.verification.synced()
        self._kicked.set()

    async def run(self) -> None:
        """Retry waiting prompts when keys arrive, give up on them at their deadline, post notices."""
        while True:
            deadlines = [*(w.deadline for w in self._waiting.values()), *(held[-1] for held in self._unkeyed)]
            due = min(deadlines, default=None)
            try:
                async with asyncio.timeout(None if due is None else max(due - time.time(), 0)):
                    await self._kicked.wait()
            except TimeoutError:
                pass
            self._kicked.clear()
            await self._release_unkeyed()
            await self._retry_waiting()
            await self._post_left_out()

    async def publish_identity(self, *, retry: bool = True) -> None:
        """Upload the device's keys and cross-sign it with the bot's identity (made on the first start). The
        daemon does it before it joins a room or syncs, so a person's client never meets the device unsigned.
        With `retry`, it tries again while the homeserver is unreachable. A refusal is reported, not fatal:
        unencrypted rooms work without it."""
        delay = 1.0
        while not self.identity_settled:
            try:
                self.identity = await ensure_identity(self.client, self.key_file, self._password)
            except NETWORK_ERRORS as exc:
                log.warning("cross_signing_retry", error=f"{type(exc).__name__}: {exc}", retry_in_s=delay)
                if not retry:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            except IdentityError as exc:
                log.error("cross_signing_failed", reason=str(exc))
            self.identity_settled = True
        if self.identity is not None:
            self.trust.user_signing = self.identity.user_signing_key

    def unverified(self, room_id: str) -> list[str] | None:
        """For the console's trust column: the room's allowed users none of whose known devices its `trust`
        accepts (from what the daemon knows; nothing asked of the homeserver, nothing pinned); None for a room
        that is not encrypted."""
        matrix_room = self.client.rooms.get(room_id)
        room = self.rooms.get(room_id)
        if matrix_room is None or not matrix_room.encrypted or room is None or self.client.olm is None:
            return None
        return [user for user in room.allowed_users if not self._accepted_somewhere(room.trust, user)]

    def _accepted_somewhere(self, trust: Trust, user_id: str) -> bool:
        olm = self.client.olm
        for device in olm.device_store.active_user_devices(user_id):
            if trust == "tofu":  # judged without pinning: a user not pinned yet has these pinned at first need
                pinned = self.trust.tofu.get(user_id)
                if pinned is None or olm.is_device_verified(device) or pinned.get(device.id) == device.ed25519:
                    return True
            elif self.trust.accepts(trust, device):
                return True
        return False

    # --- sending: which devices get a room's key ------------------------------------------------------------

    def _leave_out(self, room_id: str, users: Iterable[str]) -> set[tuple[str, str]]:
        room = self.rooms.get(room_id)
        trust: Trust = room.trust if room is not None else "all"
        members = [
            device
            for user_id in users
            for device in self.client.olm.device_store.active_user_devices(user_id)
            if device.id != self.client.device_id
        ]
        devices = [device for device in members if not self.trust.accepts(trust, device)]
        readers = [d for d in members if d not in devices and room is not None and d.user_id in room.allowed_users]
        if devices and not readers:
            log.warning("no_allowed_user_can_read", room_id=room_id, trust=trust)
        news = [  # the bot's own stale devices are left out without telling the room
            d for d in devices if (room_id, d.user_id, d.id) not in self._told and d.user_id != self.client.user_id
        ]
        if news:
            self._told.update((room_id, d.user_id, d.id) for d in news)
            self._left_out.setdefault(room_id, []).extend(news)
            self._kicked.set()
        log.info("room_key_shared", room_id=room_id, trust=trust, left_out=[f"{d.user_id}/{d.id}" for d in devices])
        return {(d.user_id, d.id) for d in devices}

    def _rotate_for_newly_trusted(self) -> None:
        """A device left out of a room's key that the room's trust accepts now (its owner cross-signed it, say)
        gets the room's next messages: the room's outbound session is dropped, so the next send makes and
        shares a new one (nio never shares a session again with a device it left out)."""
        olm = self.client.olm
        for room_id, user_id, device_id in list(self._told):
            room = self.rooms.get(room_id)
            device = olm.device_store[user_id].get(device_id) if user_id in olm.device_store.users else None
            if room is None or device is None or not self.trust.accepts(room.trust, device):
                continue
            self._told.discard((room_id, user_id, device_id))
            if olm.outbound_group_sessions.pop(room_id, None) is not None:
                log.info("room_key_rotated", room_id=room_id, now_trusted=f"{user_id}/{device_id}")

    async def _post_left_out(self) -> None:
        while self._left_out:
            room_id, devices = self._left_out.popitem()
            room = self.rooms.get(room_id)
            if room is None:
                continue
            verdicts = [(d, self.trust.why_not(room.trust, d)) for d in devices]
            lines = [
                f"- {describe(d)}: {verdict.reason}; to let it read along, {verdict.fix}"
                for d, verdict in verdicts
                if verdict is not None
            ]
            if not lines:
                continue
            heading = f'🔐 These devices cannot read my messages in this room (trust = "{room.trust}"):'
            text = "\n".join([heading, *lines])
            await self._notice(room_id, text, EndOfRun(f"trust-{secrets.token_hex(4)}", react=False))

    # --- receiving: whose prompts count ---------------------------------------------------------------------

    def await_keys(self, room_id: str, room: RoomSettings, event: Any) -> bool:
        """True when the room's trust policy must judge the sending device of this decrypted event but its
        sender's device list is out of date: the event waits for the key query the upkeep after this sync
        makes (up to KEYS_WAIT_S; then it is judged on the devices known), so the sync loop never waits for one."""
        if room.trust == "all" or not getattr(event, "decrypted", False) or event.event_id in self._keys_checked:
            return False
        if room.trust in ("cross_signed", "verified") and not self.trust.learned(event.sender):
            self.client.olm.users_for_key_query.add(event.sender)
        if event.sender not in self.client.olm.users_for_key_query:
            return False
        self._unkeyed.append((room_id, room, event, time.time() + KEYS_WAIT_S))
        log.info("waiting_for_device_list", room_id=room_id, event_id=event.event_id, sender=event.sender)
        self._kicked.set()  # its deadline counts from now
        return True

    async def _release_unkeyed(self) -> None:
        """Take up, in order, the events whose sender's device list is known now or that waited long enough."""
        held, self._unkeyed = self._unkeyed, []
        for room_id, room, event, deadline in held:
            if event.sender in self.client.olm.users_for_key_query and deadline > time.time():
                self._unkeyed.append((room_id, room, event, deadline))
                continue
            self._keys_checked.add(event.event_id)
            try:
                await self._deliver(room_id, room, event)
            finally:
                self._keys_checked.discard(event.event_id)

    async def refusal(self, room_id: str, room: RoomSettings, event: Any) -> str | None:
        """Why this decrypted prompt must not run under the room's trust policy, or None; the room is told."""
        if room.trust == "all" or not getattr(event, "decrypted", False):
            return None
        device = self._sending_device(room_id, event)
        verdict = None if device is None else self.trust.why_not(room.trust, device)
        if device is None:
            reason = "sent from a device whose keys I do not know"
            fix = "send it again from a device this room trusts"
        elif verdict is None:
            return None
        else:
            reason = f'sent from {describe(device)}, which trust = "{room.trust}" does not accept: {verdict.reason}'
            fix = verdict.fix
        text = f"🔐 I did not run the message {event.sender} sent: it was {reason}. To fix this, {fix}."
        await self._notice(room_id, text, refused(event.event_id, text))
        return reason

    def _sending_device(self, room_id: str, event: Any) -> OlmDevice | None:
        """The device whose room key decrypted `event`, when the key really came from that device."""
        olm = self.client.olm
        device = olm.device_store.device_from_sender_key(event.sender, event.sender_key)
        session = olm.inbound_group_store.get(room_id, event.sender_key, event.session_id)
        if device is None or session is None or session.ed25519 != device.ed25519:
            return None
        if any(key != event.sender_key for key in session.forwarding_chain):
            return None
        return device

    def _forwarded_by_owner(self, sender: str, sender_key: str, event: ForwardedRoomKeyEvent) -> bool:
        """A key we asked for, forwarded by the very device that created it: as good as its m.room_key."""
        content = event.source.get("content", {})
        request = self.client.olm.outgoing_key_requests.get(event.session_id)
        device = self.client.olm.device_store.device_from_sender_key(sender, sender_key)
        return (
            request is not None
            and request.room_id == event.room_id
            and content.get("sender_key") == sender_key
            and not content.get("forwarding_curve25519_key_chain")
            and device is not None
            and content.get("sender_claimed_ed25519_key") == device.ed25519
        )

    # --- prompts waiting for their room key -----------------------------------------------------------------

    def hold(self, room_id: str, room: RoomSettings, event: MegolmEvent) -> None:
        """An event we cannot decrypt yet: ask the sender's devices for its key and wait `key_wait_s`."""
        if event.sender == self.client.user_id or event.sender not in [*room.allowed_users, *room.allowed_bots]:
            log.info("undecryptable_event_ignored", room_id=room_id, event_id=event.event_id, sender=event.sender)
            return
        event.room_id = room_id
        self._waiting[event.event_id] = Waiting(room_id, event, time.time() + room.key_wait_s)
        self._save_waiting()
        olm = self.client.olm
        if event.session_id not in olm.outgoing_key_requests:
            olm.outgoing_to_device_messages.append(event.as_key_request(event.sender, self.client.device_id))
        log.warning(
            "waiting_for_room_key", room_id=room_id, event_id=event.event_id, sender=event.sender,
            session_id=event.session_id, wait_s=room.key_wait_s,
        )  # fmt: skip
        self._kicked.set()

    async def _retry_waiting(self) -> None:
        for waiting in list(self._waiting.values()):
            decrypted = self._decrypt(waiting)
            if decrypted is None and waiting.deadline > time.time():
                continue
            del self._waiting[waiting.event.event_id]
            self._save_waiting()
            room = self.rooms.get(waiting.room_id)
            if decrypted is None:
                await self._give_up(waiting)
            elif room is not None:
                log.info("room_key_arrived", room_id=waiting.room_id, event_id=waiting.event.event_id)
                await self._deliver(waiting.room_id, room, decrypted)

    def _decrypt(self, waiting: Waiting) -> Any | None:
        """The decrypted event once its room key is here, else None."""
        event = waiting.event
        if self.client.olm.inbound_group_store.get(waiting.room_id, event.sender_key, event.session_id) is None:
            return None
        try:
            return self.client.decrypt_event(event)
        except EncryptionError as exc:
            log.warning("undecryptable_with_key", room_id=waiting.room_id, event_id=event.event_id, error=str(exc))
            return None

    async def _give_up(self, waiting: Waiting) -> None:
        event = waiting.event
        room = self.rooms.get(waiting.room_id)
        wait_s = f"{room.key_wait_s:g} s" if room is not None else "the time limit"
        sent = datetime.fromtimestamp(event.server_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        device = f" (device {event.device_id})" if event.device_id else ""
        text = (
            f"🔒 I could not decrypt the message {event.sender} sent at {sent}{device}, so I did not run it: "
            f"its room key did not reach my device {self.client.device_id} within {wait_s}. Please send it again. "
            "If this keeps happening, your client is not sharing room keys with my device: it must not be set "
            'to send only to verified devices (in Element: "Never send encrypted messages to unverified '
            'sessions" off), or verify my device with `aiagentchat verify`.'
        )
        log.warning("room_key_never_arrived", room_id=waiting.room_id, event_id=event.event_id, sender=event.sender)
        await self._notice(waiting.room_id, text, refused(event.event_id, text))

    def _save_waiting(self) -> None:
        write_private(self._waiting_path, json.dumps([w.to_json() for w in self._waiting.values()]))

    # --- the room and the requester hear about it -----------------------------------------------------------

    async def _notice(self, room_id: str, text: str, end: EndOfRun) -> None:
        """Tell the room `text` as the whole output of `end`'s prompt."""
        batcher = self._batcher_of(room_id)
        if batcher is None:
            log.warning("notice_dropped", room_id=room_id, text=text)
            return
        await batcher.put(Block(end.prompt_id, text))
        await batcher.put(end)

    async def _decline_verification(self, event: Any) -> None:
        """The daemon cannot show emoji to anyone: cancel, saying what to run instead (sent at upkeep)."""
        if isinstance(event, UnknownToDeviceEvent) and event.type != "m.key.verification.request":
            return
        if self.verification is not None and self.verification.claims(event):
            return
        content = event.source.get("content", {})
        device_id = content.get("from_device") or getattr(event, "from_device", None)
        transaction_id = content.get("transaction_id")
        if not isinstance(device_id, str) or not isinstance(transaction_id, str):
            return
        if isinstance(event, KeyVerificationStart) and transaction_id in self.client.key_verifications:
            self.client.key_verifications[transaction_id].cancel()
        reason = (
            "The aiagentchat daemon is running; its owner verifies from `aiagentchat console` (v), or with "
            "`aiagentchat verify` while it is stopped."
        )
        cancel = {"transaction_id": transaction_id, "code": "m.user", "reason": reason}
        self.client.olm.outgoing_to_device_messages.append(
            ToDeviceMessage("m.key.verification.cancel", event.sender, device_id, cancel)
        )
        log.warning("verification_declined", sender=event.sender, device_id=device_id, hint=reason)
