"""A room's slow chores (an upload to download and save, a file to copy for `!get`), done one at a time in the
room's own task, so the sync loop never waits for them and `!stop` or 🛑 stay instant while a big file
arrives. A prompt waits for the chores its room was given before it (`settled`), so a file uploaded before a
prompt is always told to that prompt."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

Chore = Callable[[], Awaitable[None]]


class Desk:
    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self._chores: asyncio.Queue[tuple[str, Chore]] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, what: str, chore: Chore) -> None:
        """Queue a chore; `what` names it in the log (e.g. the event it answers)."""
        self._idle.clear()
        self._chores.put_nowait((what, chore))

    async def settled(self) -> None:
        """Wait until every chore added so far is done."""
        await self._idle.wait()

    async def run(self) -> None:
        """Do the chores in order; one that fails is logged with its traceback and the next one runs."""
        while True:
            what, chore = await self._chores.get()
            try:
                await chore()
            except Exception:
                log.exception("chore_failed", room_id=self.room_id, chore=what)
            finally:
                if self._chores.empty():
                    self._idle.set()
