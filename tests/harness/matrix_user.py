"""A real Matrix client (matrix-nio) acting as the human user in integration tests; with a `store_dir` it is
an end-to-end encrypted device (keys uploaded, queried and claimed after each sync, like nio's sync_forever).

    user = MatrixUser()
    await user.login(synapse.base_url, "@alice:localhost", "pw")
    room = await user.create_room(invite=[bot_mxid], name="work")
    prompt = await user.send_text(room, "say hello")
    events = await user.wait_for(lambda evs: any(body(e) == "hello" for e in evs), timeout=30,
                                 room_id=room, after=prompt)
    await user.close()

Syncing happens only inside `wait_for` / `sync_once`, with short long-polls. Every timeline event seen is kept
(`event.source` dicts, decrypted when the device could, de-duplicated by event_id, in arrival order, with
`room_id` filled in), so a predicate never misses an event that arrived in the same sync batch as an earlier
one. To-device events seen are kept in `to_device` (nio objects).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinError,
    LoginError,
    ReceiptEvent,
    RoomCreateError,
    RoomMessagesError,
    RoomSendError,
    SyncError,
    ToDeviceEvent,
    TypingNoticeEvent,
)

from aiagentchat.device_keys import upkeep

Event = dict[str, Any]
Predicate = Callable[[list[Event]], bool]

SYNC_FILTER = {"room": {"timeline": {"limit": 500}}, "presence": {"types": []}}
LONG_POLL_MS = 300


def body(event: Event) -> str | None:
    """The `content.body` of an event, or None."""
    content = event.get("content") or {}
    value = content.get("body")
    return value if isinstance(value, str) else None


def flat_signs(ephemeral: Iterable[Any]) -> list[Event]:
    """A room's ephemeral events as nio parsed them, one dict each: `{"type": "m.typing", "user_ids"}` (who types
    now), `{"type": "m.receipt", "event_id", "user_id", "receipt_type"}` (one per receipt)."""
    signs: list[Event] = []
    for event in ephemeral:
        if isinstance(event, TypingNoticeEvent):
            signs.append({"type": "m.typing", "user_ids": list(event.users)})
        elif isinstance(event, ReceiptEvent):
            signs += [
                {"type": "m.receipt", "event_id": r.event_id, "user_id": r.user_id, "receipt_type": r.receipt_type}
                for r in event.receipts
            ]
    return signs


def messages(events: Iterable[Event], sender: str | None = None) -> list[Event]:
    """The `m.room.message` events among `events`, optionally only those of `sender`."""
    return [e for e in events if e.get("type") == "m.room.message" and (sender is None or e.get("sender") == sender)]


def summarize(event: Event, width: int = 160) -> str:
    text = body(event)
    if text is None:
        text = json.dumps(event.get("content", {}), sort_keys=True)
    text = text.replace("\n", "\\n")
    if len(text) > width:
        text = text[:width] + "..."
    return f"{event.get('event_id')} {event.get('sender')} {event.get('type')}: {text}"


class SyncFailed(AssertionError):
    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class MatrixUser:
    def __init__(self, store_dir: Path | None = None) -> None:
        self.client: AsyncClient | None = None
        self.store_dir = store_dir  # set: an encrypted device whose crypto store lives there
        self.user_id = ""
        self.to_device: list[ToDeviceEvent] = []
        self.events: list[Event] = []  # every timeline event seen, all rooms, in arrival order
        self.signs: list[Event] = []  # typing notifications and read receipts seen, flattened (see sync_once)
        self.invites: set[str] = set()  # rooms this user is invited to (and has not joined)
        self._event_ids: set[str] = set()
        self._next_batch: str | None = None

    # --- session ---------------------------------------------------------------------------------------------

    async def login(self, base_url: str, mxid: str, password: str, device_id: str | None = None) -> None:
        config = AsyncClientConfig(
            encryption_enabled=self.store_dir is not None,
            store_sync_tokens=False,
            max_limit_exceeded=20,
            max_timeouts=2,
            request_timeout=15,
        )
        store_path = ""
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            store_path = str(self.store_dir)
        self.client = AsyncClient(base_url, mxid, device_id=device_id or "", store_path=store_path, config=config)
        response = await self.client.login(password, device_name="aiagentchat test user")
        if isinstance(response, LoginError):
            await self.client.close()
            self.client = None
            raise AssertionError(f"login of {mxid} at {base_url} failed: {response.status_code} {response.message}")
        self.user_id = response.user_id

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def __aenter__(self) -> MatrixUser:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _client(self) -> AsyncClient:
        if self.client is None:
            raise AssertionError("MatrixUser is not logged in")
        return self.client

    # --- rooms and messages ----------------------------------------------------------------------------------

    async def create_room(self, invite: Iterable[str] = (), name: str | None = None, **kwargs: Any) -> str:
        response = await self._client().room_create(name=name, invite=list(invite), **kwargs)
        if isinstance(response, RoomCreateError):
            raise AssertionError(f"{self.user_id} could not create a room: {response.status_code} {response.message}")
        return response.room_id

    async def join(self, room_id: str) -> None:
        response = await self._client().join(room_id)
        if isinstance(response, JoinError):
            raise AssertionError(f"{self.user_id} could not join {room_id}: {response.status_code} {response.message}")
        self.invites.discard(room_id)

    async def send(self, room_id: str, event_type: str, content: dict[str, Any], tx_id: str | None = None) -> str:
        """Send any room event; returns its event_id."""
        response = await self._client().room_send(
            room_id, event_type, content, tx_id=tx_id, ignore_unverified_devices=True
        )
        if isinstance(response, RoomSendError):
            raise AssertionError(
                f"{self.user_id} could not send {event_type} to {room_id}: {response.status_code} {response.message}"
            )
        return response.event_id

    async def send_text(self, room_id: str, text: str, **content: Any) -> str:
        """Send an `m.text` message (extra `content` keys such as `m.relates_to` are merged in)."""
        return await self.send(room_id, "m.room.message", {"msgtype": "m.text", "body": text, **content})

    # --- syncing ---------------------------------------------------------------------------------------------

    async def sync_once(self, timeout_ms: int = LONG_POLL_MS) -> list[Event]:
        """One /sync; returns the timeline events that were new."""
        client = self._client()
        response = await client.sync(
            timeout=timeout_ms, sync_filter=SYNC_FILTER, since=self._next_batch, full_state=False
        )
        if isinstance(response, SyncError):
            status = response.status_code
            transient = status is None or str(status).startswith("5") or status == "M_LIMIT_EXCEEDED"
            raise SyncFailed(f"sync of {self.user_id} failed: {status} {response.message}", transient)
        self._next_batch = response.next_batch
        self.to_device.extend(response.to_device_events)
        await upkeep(client)
        new: list[Event] = []
        for room_id in response.rooms.invite:
            self.invites.add(room_id)
        for room_id, room in response.rooms.join.items():
            self.invites.discard(room_id)
            self.signs += [sign | {"room_id": room_id} for sign in flat_signs(room.ephemeral)]
            batch = [dict(e.source) for e in room.timeline.events]
            if room.timeline.limited and room.timeline.prev_batch:
                batch = await self._backfill(room_id, room.timeline.prev_batch) + batch
            for event in batch:
                event.setdefault("room_id", room_id)
                event_id = event.get("event_id")
                if event_id in self._event_ids:
                    continue
                if event_id:
                    self._event_ids.add(event_id)
                self.events.append(event)
                new.append(event)
        return new

    async def _backfill(self, room_id: str, token: str) -> list[Event]:
        """Events a limited timeline skipped: page back from `token` until an event already seen."""
        older: list[Event] = []
        for _ in range(20):
            response = await self._client().room_messages(room_id, start=token, limit=100)
            if isinstance(response, RoomMessagesError) or not response.chunk:
                break
            for event in response.chunk:  # newest first
                if event.source.get("event_id") in self._event_ids:
                    return list(reversed(older))
                older.append(dict(event.source))
            if not response.end:
                break
            token = response.end
        return list(reversed(older))

    def room_events(self, room_id: str | None = None, after: str | None = None) -> list[Event]:
        """Events seen so far (of `room_id` if given), only those after event `after` if given (empty while
        `after` itself has not been seen)."""
        events = [e for e in self.events if room_id is None or e.get("room_id") == room_id]
        if after is not None:
            ids = [e.get("event_id") for e in events]
            if after not in ids:
                return []
            events = events[ids.index(after) + 1 :]
        return events

    def messages_since(self, room_id: str, event_id: str) -> list[Event]:
        """The `m.room.message` events of the room seen after `event_id` (empty while it has not been seen)."""
        return messages(self.room_events(room_id, after=event_id))

    async def wait_for(
        self,
        predicate: Predicate,
        timeout: float = 30.0,
        room_id: str | None = None,
        after: str | None = None,
    ) -> list[Event]:
        """Sync until `predicate(events)` is true; returns those events.

        `events` are all timeline events seen so far (of `room_id` if given; only those after event `after` if
        given). Connection errors and 5xx answers (a homeserver restarting) are retried until the deadline.
        On timeout, fails with the events collected."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            events = self.room_events(room_id, after)
            if predicate(events):
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                shown = self.room_events(room_id)[-40:]
                where = f" in {room_id}" if room_id else ""
                since = f" after {after}" if after else ""
                error = f" (last sync error: {last_error})" if last_error else ""
                raise AssertionError(
                    f"{self.user_id}: condition not met within {timeout} s{where}{since}{error}; "
                    f"last {len(shown)} events seen{where}:\n" + "\n".join(summarize(e) for e in shown)
                )
            try:
                await self.sync_once(timeout_ms=int(min(LONG_POLL_MS, remaining * 1000)))
                last_error = ""
            except SyncFailed as exc:
                if not exc.transient:
                    raise
                last_error = str(exc)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last_error = repr(exc)
            if last_error:
                await asyncio.sleep(0.2)  # retry interval while the homeserver is unreachable
