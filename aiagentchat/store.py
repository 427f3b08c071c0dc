"""Durable state in SQLite: sync position, rooms seen, Claude session per room, the inbox of prompts (with
their state) and the outbox of events not yet delivered (with their transaction ids)."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

PromptState = Literal["queued", "running", "done", "failed", "interrupted", "refused", "dropped"]


@dataclass(frozen=True)
class Prompt:
    room_id: str
    event_id: str
    sender: str
    text: str
    hops: int = 0  # how many agents this prompt has passed through (agent-to-agent chains)
    note: str = ""  # what the agent is told along with the prompt (where the files uploaded before it are)
    thread: str = ""  # the root of the thread it was posted in; "" for a message in the room's main timeline
    images: tuple[str, ...] = ()  # uploaded images (paths in the working directory) the agent is shown with it

    def output_thread(self, reply_mode: str) -> str | None:
        """The thread its run's output goes in: the one it was posted in, or with `reply_mode = "thread"` one
        rooted at the prompt itself; None for the main timeline."""
        return self.thread or (self.event_id if reply_mode == "thread" else None)

    def conversation(self, session_scope: str) -> str:
        """The key of the Claude conversation it belongs to: the room's, or its thread's."""
        return self.room_id if session_scope == "room" else f"{self.room_id} {self.thread or self.event_id}"


@dataclass(frozen=True)
class Approval:
    what: str  # the tool and its command, or the agent's question
    verdict: str  # allow, deny, always
    by: str  # who answered; empty when nobody did in time or the run was stopped
    reason: str
    at: float  # seconds since the epoch


@dataclass(frozen=True)
class OutboxRow:
    """An event accepted for sending: its transaction id is fixed before the first attempt."""

    txn_id: str
    content: dict[str, Any]
    prompt_id: str | None


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


async def _v2(db: aiosqlite.Connection) -> None:
    await db.executescript(
        """
        CREATE TABLE prompts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            room_id TEXT NOT NULL,
            sender TEXT NOT NULL,
            body TEXT NOT NULL,
            hops INTEGER NOT NULL,
            state TEXT NOT NULL,
            events_sent INTEGER NOT NULL DEFAULT 0,
            received_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL
        );
        CREATE INDEX prompts_by_state ON prompts (room_id, state, seq);
        INSERT INTO prompts (event_id, room_id, sender, body, hops, state, received_ms, updated_ms)
            SELECT event_id, room_id, '', '', 0, 'done', handled_ms, handled_ms FROM handled_events;
        DROP TABLE handled_events;
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            room_id TEXT NOT NULL,
            txn_id TEXT NOT NULL UNIQUE,
            prompt_id TEXT,
            content TEXT NOT NULL
        );
        CREATE INDEX outbox_by_room ON outbox (room_id, seq);
        CREATE TABLE agents (
            pid INTEGER PRIMARY KEY,
            started INTEGER NOT NULL,
            room_id TEXT NOT NULL
        );
        """
    )


async def _v3(db: aiosqlite.Connection) -> None:
    await db.executescript(
        """
        CREATE TABLE costs (
            prompt_id TEXT PRIMARY KEY,
            room_id TEXT NOT NULL,
            usd REAL NOT NULL,
            at_ms INTEGER NOT NULL
        );
        CREATE INDEX costs_by_room ON costs (room_id, at_ms);
        ALTER TABLE prompts ADD COLUMN note TEXT NOT NULL DEFAULT '';
        """
    )


async def _v4(db: aiosqlite.Connection) -> None:
    await db.executescript(
        """
        CREATE TABLE approvals (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            room_id TEXT NOT NULL,
            prompt_id TEXT NOT NULL,
            what TEXT NOT NULL,
            verdict TEXT NOT NULL,
            by TEXT NOT NULL,
            reason TEXT NOT NULL,
            at_ms INTEGER NOT NULL
        );
        CREATE INDEX approvals_by_room ON approvals (room_id, seq);
        CREATE TABLE tool_rules (
            room_id TEXT NOT NULL,  -- the conversation: a room id, or a room id and a thread root
            rule TEXT NOT NULL,
            by TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            PRIMARY KEY (room_id, rule)
        );
        """
    )


async def _v5(db: aiosqlite.Connection) -> None:
    await db.execute("ALTER TABLE prompts ADD COLUMN thread TEXT NOT NULL DEFAULT ''")


async def _v6(db: aiosqlite.Connection) -> None:
    await db.execute("ALTER TABLE prompts ADD COLUMN images TEXT NOT NULL DEFAULT '[]'")


async def _v7(db: aiosqlite.Connection) -> None:
    await db.executescript(
        """
        CREATE TABLE refs (  -- sent events a later event will edit or take back, by the name the batcher gave
            room_id TEXT NOT NULL,
            ref TEXT NOT NULL,
            event_id TEXT NOT NULL,
            PRIMARY KEY (room_id, ref)
        );
        """
    )


MIGRATIONS: list[Callable[[aiosqlite.Connection], Awaitable[None]]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7]


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

    async def add_prompt(self, p: Prompt, state: PromptState = "queued") -> bool:
        """Record an accepted (or refused) prompt before it is acknowledged; False if its event was already
        recorded: an event is never handled twice."""
        now = _now_ms()
        cursor = await self._db.execute(
            "INSERT OR IGNORE INTO prompts (event_id, room_id, sender, body, hops, note, thread, images, state, "
            "received_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (p.event_id, p.room_id, p.sender, p.text, p.hops, p.note, p.thread, json.dumps(p.images), state, now, now),
        )
        await self._db.commit()
        return cursor.rowcount == 1

    async def set_prompt_state(self, event_id: str, state: PromptState) -> None:
        await self._execute_state(event_id, state)
        await self._db.commit()

    async def _execute_state(self, event_id: str, state: PromptState) -> None:
        await self._db.execute(
            "UPDATE prompts SET state = ?, updated_ms = ? WHERE event_id = ?", (state, _now_ms(), event_id)
        )

    async def prompts(self, room_id: str, state: PromptState) -> list[Prompt]:
        """The room's prompts in `state`, oldest first."""
        async with self._db.execute(
            "SELECT room_id, event_id, sender, body, hops, note, thread, images FROM prompts "
            "WHERE room_id = ? AND state = ? ORDER BY seq",
            (room_id, state),
        ) as cursor:
            return [Prompt(*row[:-1], tuple(json.loads(row[-1]))) for row in await cursor.fetchall()]

    async def prompt_state(self, event_id: str) -> PromptState | None:
        async with self._db.execute("SELECT state FROM prompts WHERE event_id = ?", (event_id,)) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def output_events(self, event_id: str) -> int:
        """How many events of the prompt's output were delivered or are queued for delivery."""
        async with self._db.execute(
            "SELECT (SELECT events_sent FROM prompts WHERE event_id = ?) "
            "+ (SELECT count(*) FROM outbox WHERE prompt_id = ?)",
            (event_id, event_id),
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0] or 0)

    async def queue_outbox(
        self, room_id: str, rows: list[OutboxRow], ended: tuple[str, PromptState] | None = None
    ) -> None:
        """Accept events for sending, in order; with `ended` (prompt id, final state) the prompt's state is
        written in the same transaction, so a finished prompt always has its last events queued."""
        await self._db.executemany(
            "INSERT INTO outbox (room_id, txn_id, prompt_id, content) VALUES (?, ?, ?, ?)",
            [(room_id, row.txn_id, row.prompt_id, json.dumps(row.content)) for row in rows],
        )
        if ended is not None:
            await self._execute_state(*ended)
        await self._db.commit()

    async def outbox(self, room_id: str) -> list[OutboxRow]:
        """The room's undelivered events, in the order they were queued."""
        async with self._db.execute(
            "SELECT txn_id, content, prompt_id FROM outbox WHERE room_id = ? ORDER BY seq", (room_id,)
        ) as cursor:
            return [OutboxRow(txn, json.loads(content), prompt) for txn, content, prompt in await cursor.fetchall()]

    async def delivered(self, row: OutboxRow, room_id: str = "", refs: Mapping[str, str | None] | None = None) -> None:
        """The event reached the room: forget it, count it for its prompt, and in the same transaction record
        the room's `refs` (a ref to its event id; None: the ref is done with)."""
        await self._db.execute("DELETE FROM outbox WHERE txn_id = ?", (row.txn_id,))
        for ref, event_id in (refs or {}).items():
            if event_id is None:
                await self._db.execute("DELETE FROM refs WHERE room_id = ? AND ref = ?", (room_id, ref))
            else:
                await self._db.execute(
                    "INSERT OR REPLACE INTO refs (room_id, ref, event_id) VALUES (?, ?, ?)", (room_id, ref, event_id)
                )
        if row.prompt_id is not None:
            await self._db.execute(
                "UPDATE prompts SET events_sent = events_sent + 1 WHERE event_id = ?", (row.prompt_id,)
            )
        await self._db.commit()

    async def refs(self, room_id: str) -> dict[str, str]:
        """The room's refs recorded by `delivered`: ref → event id."""
        async with self._db.execute("SELECT ref, event_id FROM refs WHERE room_id = ?", (room_id,)) as cursor:
            return {ref: event_id for ref, event_id in await cursor.fetchall()}

    async def dropped(self, row: OutboxRow) -> None:
        """The event can never be delivered: forget it."""
        await self._db.execute("DELETE FROM outbox WHERE txn_id = ?", (row.txn_id,))
        await self._db.commit()

    async def replace_outbox(self, old: OutboxRow, new: OutboxRow) -> None:
        """Put `new` in `old`'s place in the queue (a notice for an event the homeserver refused)."""
        await self._db.execute(
            "UPDATE outbox SET txn_id = ?, content = ? WHERE txn_id = ?",
            (new.txn_id, json.dumps(new.content), old.txn_id),
        )
        await self._db.commit()

    async def agent_started(self, room_id: str, pid: int, started: int) -> None:
        """Remember a live agent process, so a daemon killed before ending it can end it at its next start."""
        await self._db.execute(
            "INSERT OR REPLACE INTO agents (pid, started, room_id) VALUES (?, ?, ?)", (pid, started, room_id)
        )
        await self._db.commit()

    async def agent_ended(self, pid: int) -> None:
        await self._db.execute("DELETE FROM agents WHERE pid = ?", (pid,))
        await self._db.commit()

    async def take_agents(self) -> list[tuple[int, int, str]]:
        """The agent processes an earlier run of the daemon did not end: (pid, start time, room id);
        forgotten as they are returned."""
        async with self._db.execute("SELECT pid, started, room_id FROM agents") as cursor:
            rows = [tuple(row) for row in await cursor.fetchall()]
        await self._db.execute("DELETE FROM agents")
        await self._db.commit()
        return rows  # type: ignore[return-value]

    async def add_cost(self, room_id: str, prompt_id: str, usd: float) -> None:
        """What a run cost, as the CLI reported it."""
        await self._db.execute(
            "INSERT OR REPLACE INTO costs (prompt_id, room_id, usd, at_ms) VALUES (?, ?, ?, ?)",
            (prompt_id, room_id, usd, _now_ms()),
        )
        await self._db.commit()

    async def cost(self, room_id: str, since: datetime.datetime | None = None) -> float:
        """What the room's runs cost in US dollars, all together or since `since`."""
        since_ms = 0 if since is None else int(since.timestamp() * 1000)
        async with self._db.execute(
            "SELECT coalesce(sum(usd), 0) FROM costs WHERE room_id = ? AND at_ms >= ?", (room_id, since_ms)
        ) as cursor:
            (usd,) = await cursor.fetchone()
        return float(usd)

    async def uploads(self, room_id: str) -> list[dict[str, Any]]:
        """The files saved in the room since its last accepted prompt, which the next one tells the agent of."""
        return json.loads(await self._get(f"uploads:{room_id}") or "[]")

    async def add_upload(self, room_id: str, upload: dict[str, Any]) -> None:
        await self._put(f"uploads:{room_id}", json.dumps([*await self.uploads(room_id), upload]))

    async def clear_uploads(self, room_id: str) -> None:
        await self._db.execute("DELETE FROM kv WHERE key = ?", (f"uploads:{room_id}",))
        await self._db.commit()

    async def room_model(self, room_id: str) -> str | None:
        """The model chosen for the room with `!model`, if any."""
        return await self._get(f"model:{room_id}")

    async def set_room_model(self, room_id: str, model: str) -> None:
        await self._put(f"model:{room_id}", model)

    async def session_id(self, conversation: str) -> str | None:
        """The Claude session of a conversation (`Prompt.conversation`: a room, or a thread of a room)."""
        async with self._db.execute("SELECT session_id FROM sessions WHERE room_id = ?", (conversation,)) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def set_session_id(self, conversation: str, session_id: str) -> None:
        await self._db.execute(
            "INSERT INTO sessions (room_id, session_id, updated_ms) VALUES (?, ?, ?) "
            "ON CONFLICT(room_id) DO UPDATE SET session_id = excluded.session_id, updated_ms = excluded.updated_ms",
            (conversation, session_id, _now_ms()),
        )
        await self._db.commit()

    async def new_conversation(self, conversation: str) -> None:
        """Forget the conversation's session and the tool rules given in it (🔁): its next prompt starts afresh."""
        await self._db.execute("DELETE FROM sessions WHERE room_id = ?", (conversation,))
        await self._db.execute("DELETE FROM tool_rules WHERE room_id = ?", (conversation,))
        await self._db.commit()

    async def add_tool_rule(self, conversation: str, rule: str, by: str) -> None:
        """A tool (or Bash command prefix) allowed for the rest of the conversation."""
        await self._db.execute(
            "INSERT OR REPLACE INTO tool_rules (room_id, rule, by, at_ms) VALUES (?, ?, ?, ?)",
            (conversation, rule, by, _now_ms()),
        )
        await self._db.commit()

    async def tool_rules(self, conversation: str) -> list[str]:
        async with self._db.execute(
            "SELECT rule FROM tool_rules WHERE room_id = ? ORDER BY at_ms", (conversation,)
        ) as cursor:
            return [rule for (rule,) in await cursor.fetchall()]

    async def add_approval(self, room_id: str, prompt_id: str, what: str, verdict: str, by: str, reason: str) -> None:
        """A decision on an approval request: who gave it (empty: nobody, it timed out or the run stopped)."""
        await self._db.execute(
            "INSERT INTO approvals (room_id, prompt_id, what, verdict, by, reason, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (room_id, prompt_id, what, verdict, by, reason, _now_ms()),
        )
        await self._db.commit()

    async def approvals(self, room_id: str, limit: int = 5) -> list[Approval]:
        """The room's latest approval decisions, newest first."""
        async with self._db.execute(
            "SELECT what, verdict, by, reason, at_ms FROM approvals WHERE room_id = ? ORDER BY seq DESC LIMIT ?",
            (room_id, limit),
        ) as cursor:
            return [
                Approval(what, verdict, by, reason, at_ms / 1000)
                for what, verdict, by, reason, at_ms in await cursor.fetchall()
            ]
