"""An encrypted Matrix device for tests, with the few things a test needs that a polite client never does:
withholding a message's room key from one device and handing it over later, answering a key request, sending a
reaction encrypted (as Element does), and running SAS verification (started by it, Element-style with a request
first, or accepted).

    user = E2EUser(tmp_path / "store")
    await user.login(base_url, mxid, password)
    bot_device = await user.device_of(bot_mxid)
    withheld = await user.send_withholding(room, "say hi", bot_device)
    ...
    await user.send_room_key(withheld, bot_device)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from nio import Api, RoomKeyRequest, RoomSendResponse, ToDeviceError, ToDeviceMessage
from nio.crypto import OlmDevice, Sas

from aiagentchat.identity import CrossSigningKeys, query, sign_own_device, upload_identity
from aiagentchat.sas import use_spec_sas
from tests.harness.matrix_user import MatrixUser

MEGOLM = "m.megolm.v1.aes-sha2"
use_spec_sas()  # this device verifies the way the bot does, and Element


@dataclass(frozen=True)
class Withheld:
    """A message sent with a room key that one device did not get."""

    room_id: str
    event_id: str
    session_id: str
    session_key: str  # the key as an m.room_key carries it, from the session's first message


class E2EUser(MatrixUser):
    # --- devices ---------------------------------------------------------------------------------------------

    async def cross_sign(self, keys: CrossSigningKeys, password: str, *, replace: bool = False) -> None:
        """Sign this device with the user's identity `keys`, publishing the identity first if the account has
        none (or, with `replace`, in place of the one it has): what Element does when a person sets up or
        verifies a session, or resets their identity."""
        client = self._client()
        if client.should_upload_keys:
            await client.keys_upload()
        published = await query(client, [client.user_id])
        if replace or client.user_id not in published.get("master_keys", {}):
            await upload_identity(client, keys, password)
            published = await query(client, [client.user_id])
        await sign_own_device(client, keys.self_signing, published)

    async def device_of(self, user_id: str, device_id: str | None = None, timeout: float = 30) -> OlmDevice:
        """A device of `user_id` (the only one when `device_id` is None), once this device knows its keys."""
        client = self._client()

        def known() -> list[OlmDevice]:
            devices = client.olm.device_store.active_user_devices(user_id)
            return [d for d in devices if device_id in (None, d.id)]

        client.olm.users_for_key_query.add(user_id)
        await self.wait_for(lambda _: len(known()) == 1, timeout=timeout)
        return known()[0]

    async def send_encrypted(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        """Send any event encrypted, as Element does; nio's `room_send` leaves reactions in the clear."""
        client = self._client()
        if client.olm.should_share_group_session(room_id):
            await client.share_group_session(room_id, ignore_unverified_devices=True)
        kind, payload = client.encrypt(room_id, event_type, content)
        method, path, data = Api.room_send(client.access_token, room_id, kind, payload, uuid.uuid4())
        response = await client._send(RoomSendResponse, method, path, data, (room_id,))
        assert isinstance(response, RoomSendResponse), response
        return response.event_id

    async def raw_event(self, room_id: str, event_id: str) -> dict[str, Any]:
        """The event exactly as the homeserver holds it (what went over the wire)."""
        client = self._client()
        url = f"{client.homeserver}/_matrix/client/v3/rooms/{room_id}/event/{event_id}"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"Authorization": f"Bearer {client.access_token}"}) as response:
                assert response.status == 200, await response.text()
                return await response.json()

    async def _send_to_device(self, message: ToDeviceMessage) -> None:
        response = await self._client().to_device(message, tx_id=uuid.uuid4().hex)
        if isinstance(response, ToDeviceError):
            raise AssertionError(f"to-device {message.type} failed: {response.message}")

    # --- room keys -------------------------------------------------------------------------------------------

    async def send_withholding(self, room_id: str, text: str, device: OlmDevice) -> Withheld:
        """Send `text` with a fresh room key that every device in the room gets except `device`."""
        client = self._client()
        olm = client.olm
        if not client.rooms[room_id].members_synced:
            await client.joined_members(room_id)
        if client.should_query_keys:
            await client.keys_query()
        client.blacklist_device(device)
        try:
            olm.create_outbound_group_session(room_id)
            session = olm.outbound_group_sessions[room_id]
            withheld_key = session.session_key
            event_id = await self.send_text(room_id, text)
        finally:
            client.unblacklist_device(device)  # also drops the session: the next message gets a fresh key
        return Withheld(room_id, event_id, session.id, withheld_key)

    async def send_room_key(self, withheld: Withheld, device: OlmDevice) -> None:
        """Deliver the withheld key late, as the m.room_key it should have been."""
        content = {
            "algorithm": MEGOLM,
            "room_id": withheld.room_id,
            "session_id": withheld.session_id,
            "session_key": withheld.session_key,
        }
        olm = self._client().olm
        session = olm.session_store.get(device.curve25519)
        assert session is not None, f"no Olm session with {device.user_id}/{device.id}"
        payload = olm._olm_encrypt(session, device, "m.room_key", content)
        await self._send_to_device(ToDeviceMessage("m.room.encrypted", device.user_id, device.id, payload))

    def key_requests(self, session_id: str) -> list[RoomKeyRequest]:
        """The room key requests this device received for `session_id`."""
        return [e for e in self.to_device if isinstance(e, RoomKeyRequest) and e.session_id == session_id]

    async def forward_room_key(self, withheld: Withheld, device: OlmDevice) -> None:
        """Answer a key request from `device`: forward our own copy of the withheld session to it."""
        olm = self._client().olm
        inbound = olm.inbound_group_store.get(withheld.room_id, olm.account.identity_keys["curve25519"],
                                              withheld.session_id)  # fmt: skip
        session = olm.session_store.get(device.curve25519)
        assert inbound is not None and session is not None
        await self._send_to_device(olm._encrypt_forwarding_key(withheld.room_id, inbound, session, device))

    # --- SAS verification ------------------------------------------------------------------------------------

    async def send_verification_request(self, device: OlmDevice) -> str:
        """The first step of a verification as Element starts it; its transaction id."""
        client = self._client()
        transaction_id = uuid.uuid4().hex
        request = {
            "from_device": client.device_id,
            "methods": ["m.sas.v1"],
            "timestamp": int(time.time() * 1000),
            "transaction_id": transaction_id,
        }
        await self._send_to_device(ToDeviceMessage("m.key.verification.request", device.user_id, device.id, request))
        return transaction_id

    def verification_events(self, event_type: str, transaction_id: str) -> list[dict[str, Any]]:
        """The contents of the to-device verification events of one transaction, parsed by nio or not."""
        contents = [e.source.get("content", {}) for e in self.to_device if e.source.get("type") == event_type]
        return [content for content in contents if content.get("transaction_id") == transaction_id]

    async def request_sas(self, device: OlmDevice, timeout: float = 60) -> Sas:
        """Start verification as Element does: a request, then (after `ready`) a start; returns at the emoji."""
        client = self._client()
        transaction_id = await self.send_verification_request(device)
        ready = "m.key.verification.ready"
        await self.wait_for(lambda _: self.verification_events(ready, transaction_id) != [], timeout=timeout)
        own_key = client.olm.account.identity_keys["ed25519"]
        sas = Sas(client.user_id, client.device_id, own_key, device, transaction_id)
        client.olm.key_verifications[transaction_id] = sas
        await self._send_to_device(sas.start_verification())
        await self.wait_for(lambda _: sas.established_sas is not None or sas.canceled, timeout=timeout)
        return sas

    async def accept_sas(self, device: OlmDevice, timeout: float = 60) -> Sas:
        """Wait for `device` to request a verification, answer it ready, accept the start that follows, as Element
        does; returns once the emoji can be shown."""
        client = self._client()

        def requests() -> list[dict[str, Any]]:
            contents = [e.source.get("content", {}) for e in self.to_device
                        if e.source.get("type") == "m.key.verification.request"]  # fmt: skip
            return [content for content in contents if content.get("from_device") == device.id]

        await self.wait_for(lambda _: requests() != [], timeout=timeout)
        ready = {"from_device": client.device_id, "methods": ["m.sas.v1"],
                 "transaction_id": requests()[-1]["transaction_id"]}  # fmt: skip
        await self._send_to_device(ToDeviceMessage("m.key.verification.ready", device.user_id, device.id, ready))

        def started() -> Sas | None:
            return client.olm.get_active_sas(device.user_id, device.id)

        await self.wait_for(lambda _: started() is not None, timeout=timeout)
        sas = started()
        await client.accept_key_verification(sas.transaction_id)
        await self.wait_for(lambda _: sas.established_sas is not None or sas.canceled, timeout=timeout)
        return sas

    async def confirm_sas(self, sas: Sas, timeout: float = 60) -> None:
        """Say the emoji match, and wait until both sides have sent their MAC."""
        await self._client().confirm_short_auth_string(sas.transaction_id)
        await self.wait_for(lambda _: sas.verified or sas.canceled, timeout=timeout)
