"""cchat's Matrix client for rooms without end-to-end encryption: the five client-server calls cchat makes there,
over aiohttp, answered in the shapes of matrix-nio's responses (the attributes cchat reads). matrix-nio loads its
crypto whenever it is imported, which takes longer than all these requests; cchat loads it only for an encrypted
room, a login or a verification."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

API = "/_matrix/client/v3"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class Event:
    source: dict[str, Any]


@dataclass(frozen=True)
class Timeline:
    events: list[Event]
    limited: bool


@dataclass(frozen=True)
class JoinedRoom:
    timeline: Timeline


@dataclass(frozen=True)
class Rooms:
    join: dict[str, JoinedRoom]


def _events(value: Any) -> list[Event]:
    return [Event(event) for event in _list(value) if isinstance(event, dict)]


@dataclass(frozen=True)
class Response:
    """One answer of the homeserver. A success carries the fields of its call (`room_id`, `event_id`,
    `next_batch` and `rooms`, `chunk` and `end`, or a state event's `content`); an error carries none of them but
    `status_code` (its errcode), `message` and `retry_after_ms`, as nio's error responses do."""

    transport_response: aiohttp.ClientResponse
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.transport_response.status == 200

    def _field(self, key: str) -> Any:
        return self.body.get(key) if self.ok else None

    @property
    def status_code(self) -> str | None:
        return None if self.ok else str(self.body.get("errcode") or "") or None

    @property
    def message(self) -> str:
        return str(self.body.get("error") or "")

    @property
    def retry_after_ms(self) -> int | None:
        value = self.body.get("retry_after_ms")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def content(self) -> dict[str, Any]:
        return self.body

    @property
    def room_id(self) -> str | None:
        return self._field("room_id")

    @property
    def event_id(self) -> str | None:
        return self._field("event_id")

    @property
    def next_batch(self) -> str | None:
        return self._field("next_batch")

    @property
    def end(self) -> str | None:
        return self._field("end")

    @property
    def chunk(self) -> list[Event] | None:
        return _events(self.body.get("chunk")) if self.ok else None

    @property
    def rooms(self) -> Rooms:
        joined = _dict(_dict(self._field("rooms")).get("join"))
        return Rooms(
            {
                room_id: JoinedRoom(Timeline(_events(timeline.get("events")), timeline.get("limited") is True))
                for room_id, room in joined.items()
                for timeline in [_dict(_dict(room).get("timeline"))]
            }
        )


class PlainClient:
    """A saved login talking to its homeserver without end-to-end encryption."""

    olm = None  # nothing to decrypt, no keys to keep up

    def __init__(self, homeserver: str, user_id: str, device_id: str, access_token: str) -> None:
        self.homeserver = homeserver
        self.user_id = user_id
        self.device_id = device_id
        self._token = access_token
        self._session: aiohttp.ClientSession | None = None
        self.request_timeout_s = 60.0

    async def _request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, payload: Any = None, wait_s: float = 0
    ) -> Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self._token}"})
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s + wait_s)
        url = self.homeserver + API + path
        async with self._session.request(method, url, params=params, json=payload, timeout=timeout) as response:
            try:
                body = await response.json(content_type=None)
            except ValueError:  # not JSON: a proxy's error page, say
                body = {}
        return Response(response, _dict(body))

    async def room_resolve_alias(self, alias: str) -> Response:
        return await self._request("GET", f"/directory/room/{quote(alias, safe='')}")

    async def room_get_state_event(self, room_id: str, event_type: str) -> Response:
        return await self._request("GET", f"/rooms/{quote(room_id, safe='')}/state/{quote(event_type, safe='')}")

    async def room_send(
        self, room_id: str, message_type: str, content: dict[str, Any], tx_id: str, ignore_unverified_devices: bool
    ) -> Response:
        path = f"/rooms/{quote(room_id, safe='')}/send/{quote(message_type, safe='')}/{quote(tx_id, safe='')}"
        return await self._request("PUT", path, payload=content)

    async def sync(self, timeout: int, sync_filter: dict[str, Any], since: str | None = None) -> Response:
        params = {"timeout": str(timeout), "filter": json.dumps(sync_filter, separators=(",", ":"))}
        if since is not None:
            params["since"] = since
        return await self._request("GET", "/sync", params=params, wait_s=timeout / 1000)

    async def room_messages(self, room_id: str, start: str, direction: str, limit: int) -> Response:
        params = {"from": start, "dir": direction, "limit": str(limit)}
        return await self._request("GET", f"/rooms/{quote(room_id, safe='')}/messages", params=params)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
