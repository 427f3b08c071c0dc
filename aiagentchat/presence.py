"""A room's signs of life that are not timeline events: the read receipt on each accepted prompt and the bot
typing while its agent works. Neither is stored nor counted by the homeserver's message rate limit, so they
cost the room nothing; one that fails is dropped (a receipt) or tried again a little later (typing), and after
a restart the typing notification ends by its own timeout."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

TYPING_TIMEOUT_MS = 30_000  # how long the homeserver shows the bot typing without a refresh
TYPING_REFRESH_S = 20.0
RETRY_S = 5.0  # after a failed typing request
REQUEST_TIMEOUT_S = 5.0  # a signal is never worth holding up the room's output for longer


class Signals(Protocol):
    async def typing(self, room_id: str, typing: bool, timeout_ms: int) -> bool: ...

    async def receipt(self, room_id: str, event_id: str) -> bool: ...


class Presence:
    """What one room should show, and when the next request is due. The room's batcher calls `send` from its
    own task when `due` says so: no task of its own, and nothing to wait for while nothing changes."""

    def __init__(self, room_id: str, signals: Signals, clock: Callable[[], float]) -> None:
        self.room_id = room_id
        self._signals = signals
        self._clock = clock
        self._unread: str | None = None  # the latest accepted prompt, not marked read yet
        self.working = False  # wanted: the bot typing
        self._typing = False  # as the homeserver last heard it
        self._typing_at = -math.inf
        self._retry_at = -math.inf

    def read(self, event_id: str) -> None:
        """Mark `event_id` read (a later one covers the earlier ones)."""
        self._unread = event_id

    def due(self, *, idle: bool) -> float | None:
        """When `send` has something to do; None while nothing. The typing notification ends only once the room
        is `idle` (its output delivered), so the answer never comes after a gap with no sign of life."""
        if self._unread is not None:
            return -math.inf
        if self.working:
            return max(self._retry_at, self._typing_at + TYPING_REFRESH_S) if self._typing else self._retry_at
        return -math.inf if self._typing and idle else None

    async def send(self) -> None:
        if (event_id := self._unread) is not None:
            self._unread = None
            if not await self._signal(self._signals.receipt(self.room_id, event_id)):
                log.info("receipt_failed", room_id=self.room_id, event_id=event_id)
            return
        want = self.working
        sent = await self._signal(self._signals.typing(self.room_id, want, TYPING_TIMEOUT_MS))
        if sent or not want:  # an end that failed is left to the typing timeout
            self._typing, self._typing_at = want, self._clock()
        else:
            self._retry_at = self._clock() + RETRY_S

    @staticmethod
    async def _signal(request: Awaitable[bool]) -> bool:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await request
        except TimeoutError:
            return False
