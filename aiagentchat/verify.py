"""`aiagentchat verify`: SAS emoji verification between the bot's device and a person's device, from a terminal,
or from the console while the daemon runs (the control socket's `verify` ops; the same flow, fed by the daemon's
sync instead of its own).

The command runs while the daemon is stopped (they share the device and its crypto store; `DeviceLock` refuses
the second one). With USER and DEVICE it starts the verification; without, it waits for one that a room's
allowed user starts from their client, whether with a request first (as Element does) or with a start. The
emoji are shown here, the owner says whether they match, and a match is recorded in the crypto store, where
the daemon finds it on its next start (or at once, when it ran the verification). When the verified device is
cross-signed by its owner's identity, the bot also signs that identity with its user-signing key: the person is
verified, every device they cross-sign is trusted by `trust = "verified"`, and their clients show the bot's
signature.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from nio import (
    AsyncClient,
    KeyVerificationCancel,
    KeyVerificationStart,
    LocalProtocolError,
    SyncError,
    ToDeviceMessage,
    UnknownToDeviceEvent,
)
from nio.crypto import OlmDevice, Sas

from aiagentchat.crypto import NETWORK_ERRORS, DeviceLock, describe, key_file
from aiagentchat.device_keys import upkeep
from aiagentchat.identity import IdentityError, KeyFile, query, read_devices, read_identity, upload_signatures
from aiagentchat.identity import fingerprint as key_fingerprint
from aiagentchat.sas import use_spec_sas
from aiagentchat.settings import Settings
from aiagentchat.transport import login, make_client

log = structlog.get_logger(__name__)

VERIFIED, NOT_VERIFIED = 0, 1
Decide = Callable[[Sas], Awaitable[bool]]  # shown the emoji of an established SAS: whether its owner says they match
SYNC_FILTER = {"room": {"rooms": [], "timeline": {"limit": 0}}, "presence": {"types": []}}
POLL_MS = 1_000
ABANDON_S = 5.0  # for telling the other device that a verification the daemon ran is over


@dataclass(frozen=True)
class Target:
    user_id: str | None  # None: wait for any allowed user
    device_id: str | None
    key: str | None = None  # the device's ed25519 key, read from the device itself: compare instead of SAS


def fingerprint(key: str) -> str:
    return " ".join(key[i : i + 4] for i in range(0, len(key), 4))


class Verification:
    """The bot's device running one SAS verification: its to-device events come through the client's callbacks,
    from `sync` (the command's own loop) or the daemon's; whoever syncs calls `synced` after each sync."""

    def __init__(self, client: AsyncClient, allowed: set[str], target: Target, say: Callable[[str], None]) -> None:
        use_spec_sas()
        self.client = client
        self.allowed = allowed
        self.target = target
        self.say = say
        self.sas: Sas | None = None
        self.verified: OlmDevice | None = None  # the device the owner confirmed
        self.master_key: str | None = None  # our identity's, to be verified along with the device
        self.cancelled = ""
        self._requested: str | None = None  # the transaction of the request we sent
        self._asked: set[str] = set()  # ... of these devices
        self._requests: list[OlmDevice] = []  # ... those devices
        self._ready = ""  # ... and the one that accepted it first
        self._synced = asyncio.Event()
        client.add_to_device_callback(self._on_event, (UnknownToDeviceEvent, KeyVerificationStart))
        client.add_to_device_callback(self._on_cancel, (KeyVerificationCancel,))
        self._callbacks = client.to_device_callbacks[-2:]

    def detach(self) -> None:
        """Stop taking the client's to-device events (the daemon's client outlives the verification)."""
        for callback in self._callbacks:
            self.client.to_device_callbacks.remove(callback)

    def synced(self) -> None:
        self._synced.set()

    def claims(self, event: Any) -> bool:
        """Whether this verification takes the event (a request or start that the daemon would decline)."""
        content = event.source.get("content", {})
        transaction_id = content.get("transaction_id")
        if transaction_id is not None and transaction_id in (self._requested, self.transaction_id()):
            return True
        device_id = content.get("from_device")
        return self.sas is None and isinstance(device_id, str) and self._expected(event.sender, device_id)

    def transaction_id(self) -> str | None:
        return self.sas.transaction_id if self.sas is not None else None

    async def sync(self) -> None:
        while True:
            try:
                response = await self.client.sync(timeout=POLL_MS, sync_filter=SYNC_FILTER)
                if isinstance(response, SyncError):
                    raise ConnectionError(response.message)
                await upkeep(self.client)
            except (*NETWORK_ERRORS, ConnectionError) as exc:
                log.warning("sync_failing", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
            self.synced()

    async def until_async(self, done: Callable[[], Awaitable[bool]], deadline: float, what: str) -> None:
        """`until`, for a condition that asks the homeserver."""
        while not await done():
            await self._next_sync(deadline, what)

    async def until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        """Wait, sync after sync, until `done()`; Cancelled when the other side cancels or time runs out."""
        while not done():
            await self._next_sync(deadline, what)

    async def _next_sync(self, deadline: float, what: str) -> None:
        if self.cancelled:
            raise Cancelled(self.cancelled)
        if self.sas is not None and self.sas.canceled:
            raise Cancelled(f"the verification was cancelled: {self.sas.cancel_reason}")
        self._synced.clear()
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await self._synced.wait()
        except TimeoutError:
            raise Cancelled(f"no {what} before the time limit") from None

    def _expected(self, user_id: str, device_id: str) -> bool:
        if self.target.user_id is None:
            return user_id in self.allowed
        return user_id == self.target.user_id and self.target.device_id in (None, device_id)

    async def _on_event(self, event: Any) -> None:
        """nio's to-device callback. What fails here must not reach nio, whose sync would abandon the whole batch
        (every room's events in it): a failure ends this verification instead."""
        try:
            await self._take(event)
        except (*NETWORK_ERRORS, LocalProtocolError) as exc:
            log.warning("verification_failed", error=f"{type(exc).__name__}: {exc}")
            self.cancelled = f"it failed here: {type(exc).__name__}: {exc}"

    async def _take(self, event: Any) -> None:
        content = event.source.get("content")
        if not isinstance(content, dict):
            return
        device_id = content.get("from_device")
        if self.sas is not None or not isinstance(device_id, str) or not self._expected(event.sender, device_id):
            return
        if isinstance(event, KeyVerificationStart):
            sas = self.client.key_verifications.get(event.transaction_id)
            if sas is not None and not sas.canceled:
                self.sas = sas
                self.say(f"{event.sender}'s device {device_id} started a verification; accepting it.")
                await self.client.accept_key_verification(event.transaction_id)
        elif event.type == "m.key.verification.ready" and content.get("transaction_id") == self._requested:
            self._ready = self._ready or (device_id if device_id in self._asked else "")
        elif event.type == "m.key.verification.request" and _offers_sas(content.get("methods")):
            self.say(f"{event.sender}'s device {device_id} asks for a verification; answering it.")
            self.client.olm.users_for_key_query.add(event.sender)
            await self.client.keys_query()
            ready = {"from_device": self.client.device_id, "methods": ["m.sas.v1"],
                     "transaction_id": content.get("transaction_id")}  # fmt: skip
            await self.client.to_device(ToDeviceMessage("m.key.verification.ready", event.sender, device_id, ready))

    async def _on_cancel(self, event: KeyVerificationCancel) -> None:  # nio has checked its fields
        if event.transaction_id in (self._requested, self.transaction_id()):
            self.cancelled = f"the other device cancelled: {event.reason} ({event.code})"

    async def start(self, devices: list[OlmDevice], deadline: float) -> OlmDevice:
        """Start as Element does: a request to `devices` (one person's), and with the first that accepts it, the
        emoji verification; the others are told it was answered elsewhere. The device that accepted."""
        transaction_id = uuid.uuid4().hex
        self._requested, self._asked, self._requests = transaction_id, {device.id for device in devices}, devices
        request = {"from_device": self.client.device_id, "methods": ["m.sas.v1"],
                   "timestamp": int(time.time() * 1000), "transaction_id": transaction_id}  # fmt: skip
        for device in devices:
            await self.client.to_device(ToDeviceMessage("m.key.verification.request", device.user_id, device.id,
                                                        request))  # fmt: skip
        await self.until(lambda: self._ready != "", deadline, "answer to the verification request")
        device = next(device for device in devices if device.id == self._ready)
        accepted = {"transaction_id": transaction_id, "code": "m.accepted", "reason": "accepted on another device"}
        for other in devices:
            if other is not device:
                await self.client.to_device(ToDeviceMessage("m.key.verification.cancel", other.user_id, other.id,
                                                            accepted))  # fmt: skip
        olm = self.client.olm
        own_key = olm.account.identity_keys["ed25519"]
        sas = Sas(self.client.user_id, self.client.device_id, own_key, device, transaction_id)
        olm.key_verifications[transaction_id] = sas
        await self.client.to_device(sas.start_verification())
        self.sas = sas
        return device

    async def devices(self, user_id: str) -> list[OlmDevice]:
        """`user_id`'s devices as their keys are published now; Cancelled if there are none."""
        self.client.olm.users_for_key_query.add(user_id)
        await self.client.keys_query()
        devices = list(self.client.olm.device_store.active_user_devices(user_id))
        if not devices:
            raise Cancelled(f"{user_id} has no device with published keys")
        return devices

    async def device(self, user_id: str, device_id: str) -> OlmDevice:
        """The device as its keys are published now; Cancelled if it has none."""
        self.client.olm.users_for_key_query.add(user_id)
        await self.client.keys_query()
        devices = {device.id: device for device in self.client.olm.device_store.active_user_devices(user_id)}
        if device_id not in devices:
            raise Cancelled(f"{user_id} has no device {device_id} with published keys (they have: "
                            f"{', '.join(sorted(devices)) or 'none'})")  # fmt: skip
        return devices[device_id]

    async def finish(self, sas: Sas, match: bool, deadline: float) -> None:
        if not match:
            await self.client.cancel_key_verification(sas.transaction_id, reject=True)
            raise Cancelled("you said the emoji do not match; nothing was recorded")
        sas.own_master_key = self.master_key
        await self.client.confirm_short_auth_string(sas.transaction_id)
        await self.until(lambda: sas.verified, deadline, "confirmation from the other device")
        done = {"transaction_id": sas.transaction_id}
        other = sas.other_olm_device
        await self.client.to_device(ToDeviceMessage("m.key.verification.done", other.user_id, other.id, done))


def _offers_sas(methods: Any) -> bool:
    """Whether a request's `methods` (any type: whoever sent the event chose it) lists emoji verification."""
    return isinstance(methods, list) and "m.sas.v1" in methods


class Cancelled(Exception):
    """The verification ended without a match."""


def show(sas: Sas) -> str:
    emoji = sas.get_emoji()
    return "\n".join(
        [
            "Compare these with the other device:",
            "  " + "   ".join(symbol for symbol, _ in emoji),
            "  " + " | ".join(name for _, name in emoji),
            "  numbers: " + " ".join(str(number) for number in sas.get_decimals()),
        ]
    )


def in_terminal(say: Callable[[str], None]) -> Decide:
    """The owner's decision at a terminal: the emoji shown with `say`, then a yes or no."""

    async def decide(sas: Sas) -> bool:
        say(show(sas))
        return await ask("Do they match? [y/N] ")

    return decide


async def ask(question: str) -> bool:
    """A yes or no from the terminal, without stalling the sync running meanwhile."""
    try:
        answer = await asyncio.to_thread(input, question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def say_now(text: str) -> None:
    print(text, flush=True)


async def verify(settings: Settings, target: Target, timeout_s: float, say: Callable[[str], None] = say_now) -> int:
    """Run one verification as the bot's device; VERIFIED or NOT_VERIFIED."""
    lock = DeviceLock(settings)
    client = make_client(settings)
    try:
        code = await _verify_as(client, settings, target, time.monotonic() + timeout_s, say)
    finally:
        await client.close()
        lock.release()
    if code == VERIFIED:
        say("The daemon trusts it from its next start.")
    return code


async def _verify_as(
    client: AsyncClient, settings: Settings, target: Target, deadline: float, say: Callable[[str], None]
) -> int:
    await login(client, settings)
    say(f"Bot {client.user_id}, device {client.device_id}")
    say(f"  fingerprint (ed25519): {fingerprint(client.olm.account.identity_keys['ed25519'])}")
    allowed = {user for room in settings.rooms for user in room.allowed_users}
    session = Verification(client, allowed, target, say)
    keys = key_file(settings)
    try:
        own = keys.load(client.user_id)
    except IdentityError as exc:
        say(f"(Only the bot's device can be verified: {exc})")
        own = None
    session.master_key = own.master_key if own is not None else None
    syncing = asyncio.create_task(session.sync())
    try:
        return await conduct(session, deadline, in_terminal(say), keys)
    finally:
        syncing.cancel()
        await asyncio.gather(syncing, return_exceptions=True)


async def conduct(session: Verification, deadline: float, decide: Decide, keys: KeyFile) -> int:
    """The whole verification of `session.target`, the command's and the daemon's alike: VERIFIED (the device
    verified in the crypto store, and its owner's identity signed when it cross-signed the device) or
    NOT_VERIFIED, each said through `session.say`."""
    code = await _run(session, deadline, decide)
    device = session.verified
    if code == VERIFIED and device is not None:
        await _sign_identity(session.client, keys, device, session.say)
        session.client.olm.users_for_key_query.add(device.user_id)  # learn what is signed now (the daemon's trust)
        try:
            await session.client.keys_query()
        except NETWORK_ERRORS as exc:
            log.warning("keys_query_failed", error=f"{type(exc).__name__}: {exc}")
    return code


async def _run(session: Verification, deadline: float, decide: Decide) -> int:
    target, say = session.target, session.say
    try:
        if target.user_id is not None and target.device_id is not None:
            device = await session.device(target.user_id, target.device_id)
            if target.key is not None:
                code = _compare_key(session.client, device, target.key, say)
                session.verified = device if code == VERIFIED else None
                return code
            say(f"Starting a verification with {describe(device)}; accept it there.")
            await session.start([device], deadline)
        elif target.user_id is not None:
            say(f"Asking every device of {target.user_id} for a verification; accept it on one of them.")
            device = await session.start(await session.devices(target.user_id), deadline)
            say(f"{describe(device)} accepted.")
        else:
            say("Waiting for an allowed user to start a verification of this device from their client...")
    except Cancelled as exc:
        say(f"❌ Not verified: {exc}")
        return NOT_VERIFIED
    code = await compare_emoji(session, deadline, decide)
    return _verified(session.verified, say) if session.verified is not None else code


async def compare_emoji(session: Verification, deadline: float, decide: Decide) -> int:
    """Once a verification has started: show the emoji, ask whether they match (`decide`), finish it; VERIFIED
    (with `session.verified` set) or NOT_VERIFIED."""
    try:
        await session.until(lambda: session.sas is not None, deadline, "verification")
        sas = session.sas
        await session.until(lambda: sas.established_sas is not None, deadline, "keys from the other device")
        match = await decide(sas)
        await session.finish(sas, match, deadline)
    except Cancelled as exc:
        session.say(f"❌ Not verified: {exc}")
        return NOT_VERIFIED
    session.verified = sas.other_olm_device
    return VERIFIED


async def _sign_identity(client: AsyncClient, key_file: KeyFile, device: OlmDevice, say: Callable[[str], None]) -> None:
    """Sign the identity that cross-signed the verified device with the bot's user-signing key."""
    user_id = device.user_id
    try:
        keys = key_file.load(client.user_id)
        published = await query(client, [user_id])
        identity = read_identity(published, user_id)
        device_keys = read_devices(published, user_id).get(device.id)
        if keys is None or identity is None or not identity.signs(device_keys, device.ed25519):
            why = "the bot has no cross-signing keys yet" if keys is None else f"{user_id} did not cross-sign it"
            say(f"Only this device is verified: {why}.")
            return
        await upload_signatures(client, {user_id: {identity.master: keys.sign_identity(identity.master_object)}})
    except (IdentityError, *NETWORK_ERRORS) as exc:
        say(f"Only this device is verified: signing {user_id}'s identity failed: {exc}")
        return
    say(f"✅ Verified {user_id}'s identity (master key {key_fingerprint(identity.master)}): every device they "
        'cross-sign is trusted where trust = "verified".')  # fmt: skip


def _compare_key(client: AsyncClient, device: OlmDevice, key: str, say: Callable[[str], None]) -> int:
    """Verification by comparing the key the device shows (Element: its session key) with the one the
    homeserver published for it."""
    if "".join(key.split()) != device.ed25519:
        say(f"❌ Not verified: {describe(device)} has the key {fingerprint(device.ed25519)}, not the one given.")
        return NOT_VERIFIED
    client.verify_device(device)
    return _verified(device, say)


def _verified(device: OlmDevice, say: Callable[[str], None]) -> int:
    say(f"✅ Verified {describe(device)}.")
    return VERIFIED


class InDaemon:
    """One verification inside the running daemon, driven through the control socket: the daemon's sync feeds
    it (the daemon calls `session.synced` after each sync and lets `session` claim the events it would decline),
    its progress goes to `report` as `state` (docs/control.md), and the operator's answer comes in `answer`."""

    def __init__(
        self,
        client: AsyncClient,
        keys: KeyFile,
        master_key: str | None,
        allowed: set[str],
        target: Target,
        timeout_s: float,
        report: Callable[[dict[str, Any]], None],
    ) -> None:
        self.session = Verification(client, allowed, target, self._say)
        self.session.master_key = master_key
        self._keys = keys
        self._deadline = time.monotonic() + timeout_s
        self._report = report
        self._answer: asyncio.Future[bool] | None = None
        self.state: dict[str, Any] = {
            "user": target.user_id, "device": target.device_id, "phase": "waiting", "lines": [],
            "emoji": None, "decimals": None, "timeout_s": timeout_s,
        }  # fmt: skip

    def _say(self, text: str) -> None:
        self.state["lines"] = [*self.state["lines"], text]
        self._report(self.state)

    async def _decide(self, sas: Sas) -> bool:
        self._answer = asyncio.get_running_loop().create_future()
        emoji = [[symbol, name] for symbol, name in sas.get_emoji()]
        self.state |= {"phase": "comparing", "emoji": emoji, "decimals": list(sas.get_decimals())}
        self._say(f"Compare the emoji with {describe(sas.other_olm_device)}.")
        try:
            async with asyncio.timeout(max(self._deadline - time.monotonic(), 0)):
                return await self._answer
        except TimeoutError:
            raise Cancelled("no answer from the operator before the time limit") from None
        finally:
            self._answer = None
            self.state["phase"] = "confirming"

    def answer(self, match: bool) -> bool:
        """The operator's word on the emoji shown; False when none are waiting for it."""
        if self._answer is None or self._answer.done():
            return False
        self._answer.set_result(match)
        return True

    async def run(self) -> int:
        """VERIFIED or NOT_VERIFIED; cancelled (the operator's cancel), it tells the other device so."""
        code = NOT_VERIFIED
        try:
            code = await conduct(self.session, self._deadline, self._decide, self._keys)
        except asyncio.CancelledError:
            self._say("❌ Not verified: cancelled by the operator")
            raise
        except (*NETWORK_ERRORS, LocalProtocolError) as exc:
            self._say(f"❌ Not verified: the homeserver did not answer ({type(exc).__name__}: {exc})")
        finally:
            self.session.detach()
            await self._abandon()
            self.state["phase"] = "verified" if code == VERIFIED else "failed"
            self._report(self.state)
        return code

    async def _abandon(self) -> None:
        """Tell the other device a verification that did not finish is over (so it stops waiting)."""
        if self.session.client.client_session is None:  # the daemon stopped and closed its connection
            return
        try:
            async with asyncio.timeout(ABANDON_S):
                await self._tell_abandoned()
        except (*NETWORK_ERRORS, LocalProtocolError) as exc:
            log.warning("verification_cancel_not_sent", error=f"{type(exc).__name__}: {exc}")

    async def _tell_abandoned(self) -> None:
        session, client = self.session, self.session.client
        sas = session.sas
        if sas is not None and not sas.canceled and not sas.verified:
            await client.cancel_key_verification(sas.transaction_id)
        elif sas is None and session._requested is not None:
            cancel = {"transaction_id": session._requested, "code": "m.user", "reason": "cancelled"}
            for device in session._requests:
                message = ToDeviceMessage("m.key.verification.cancel", device.user_id, device.id, cancel)
                await client.to_device(message)
