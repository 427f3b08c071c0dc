"""Durable state in SQLite: sync position, rooms seen, handled events, Claude session per room."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite


async def _v1(db: aiosqlite.Connection) -> None:
    await db.executescript(
        """
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE rooms_seen (room_id TEXT PRIMARY KEY, first_seen_ms INTEGER NOT NULL);
        CREATE TABLE handled_events (
            event_id TEXT PRIMARY KEY,
            room_id TEXT NOT NULL,
            handled_ms INTEGER NOT NULL
        );
        CREATE TABLE sessions (
            room_id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            updated_ms INTEGER NOT NULL
        );
        """
    )


MIGRATIONS: list[Callable[[aiosqlite.Connection], Awaitable[None]]] = [_v1]


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        store = cls(db)
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cursor:
            (version,) = await cursor.fetchone()
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            await migration(self._db)
            await self._db.execute(f"PRAGMA user_version = {number}")
            await self._db.commit()

    async def _get(self, key: str) -> str | None:
        async with self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def _put(self, key: str, value: str) -> None:
        await self._db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
        await self._db.commit()

    async def sync_token(self) -> str | None:
        return await self._get("sync_token")

    async def set_sync_token(self, token: str) -> None:
        await self._put("sync_token", token)

    async def mark_room_seen(self, room_id: str) -> bool:
        """Record that the daemon now watches this room; True if it had never seen it before."""
        cursor = await self._db.execute(
            "INSERT OR IGNORE INTO rooms_seen (room_id, first_seen_ms) VALUES (?, ?)", (room_id, _now_ms())
        )
        await self._db.commit()
        return cursor.rowcount == 1

    async def claim_event(self, room_id: str, event_id: str) -> bool:
        """Mark an event handled; False if it already was (never handle one twice)."""
        cursor = await self._db.execute(
            "INSERT OR IGNORE INTO handled_events (event_id, room_id, handled_ms) VALUES (?, ?, ?)",
            (event_id, room_id, _now_ms()),
        )
        await self._db.commit()
        return cursor.rowcount == 1

    async def session_id(self, room_id: str) -> str | None:
        async with self._db.execute("SELECT session_id FROM sessions WHERE room_id = ?", (room_id,)) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def set_session_id(self, room_id: str, session_id: str | None) -> None:
        if session_id is None:
            await self._db.execute("DELETE FROM sessions WHERE room_id = ?", (room_id,))
        else:
            await self._db.execute(
                "INSERT INTO sessions (room_id, session_id, updated_ms) VALUES (?, ?, ?) "
                "ON CONFLICT(room_id) DO UPDATE SET session_id = excluded.session_id, "
                "updated_ms = excluded.updated_ms",
                (room_id, session_id, _now_ms()),
            )
        await self._db.commit()
