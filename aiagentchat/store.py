"""Durable state in SQLite: sync position, rooms seen, Claude session per room, the inbox of prompts (with
their state) and the outbox of events not yet delivered (with their transaction ids)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
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
class ChatRoom:
    """A room an admin invited the bot to: who did, and the keys set from the chat."""

    room_id: str
    invited_by: str
    settings: dict[str, Any]
    created: float  # seconds since the epoch


@dataclass(frozen=True)
class RoomChange:
    by: str
    command: str
    detail: str
    at: float


@dataclass(frozen=True)
class OutboxRow:
    """An event accepted for sending: its transaction id is fixed before the first attempt."""

    txn_id: str
    content: dict[str, Any]
    prompt_id: str | None


async def _run_script(db: aiosqlite.Connection, script: str) -> None:
    """Run a migration's statements one at a time, in the transaction `Store._migrate` has open: on Python 3.11
    `executescript` commits first, which would end that transaction before the migration had begun."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            await db.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"unterminated SQL statement in a migration: {statement.strip()}")


async def _v1(db: aiosqlite.Connection) -> None:
    await _run_script(
        db,
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
        """,
    )


async def _v2(db: aiosqlite.Connection) -> None:
    await _run_script(
        db,
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
        """,
    )


async def _v3(db: aiosqlite.Connection) -> None:
    await _run_script(
        db,
        """
        CREATE TABLE costs (
            prompt_id TEXT PRIMARY KEY,
            room_id TEXT NOT NULL,
            usd REAL NOT NULL,
            at_ms INTEGER NOT NULL
        );
        CREATE INDEX costs_by_room ON costs (room_id, at_ms);
        ALTER TABLE prompts ADD COLUMN note TEXT NOT NULL DEFAULT '';
        """,
    )


async def _v4(db: aiosqlite.Connection) -> None:
    await _run_script(
        db,
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
        """,
    )


async def _v5(db: aiosqlite.Connection) -> None:
    await db.execute("ALTER TABLE prompts ADD COLUMN thread TEXT NOT NULL DEFAULT ''")


async def _v6(db: aiosqlite.Connection) -> None:
    await db.execute("ALTER TABLE prompts ADD COLUMN images TEXT NOT NULL DEFAULT '[]'")


async def _v7(db: aiosqlite.Connection) -> None:
    await _run_script(
        db,
        """
        CREATE TABLE refs (  -- sent events a later event will edit or take back, by the name the batcher gave
            room_id TEXT NOT NULL,
            ref TEXT NOT NULL,
            event_id TEXT NOT NULL,
            PRIMARY KEY (room_id, ref)
        );
        """,
    )


async def _v8(db: aiosqlite.Connection) -> None:
    await _run_script(
        db,
        """
        CREATE TABLE chat_rooms (  -- rooms an admin invited the bot to: served with room_defaults and these keys
            room_id TEXT PRIMARY KEY,
            invited_by TEXT NOT NULL,
            settings TEXT NOT NULL,  -- JSON: the room's keys set from the chat (allowed_users, tools, workdir, ...)
            created_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL
        );
        CREATE TABLE room_changes (  -- what the room admin commands changed, by whom
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            room_id TEXT NOT NULL,
            by TEXT NOT NULL,
            command TEXT NOT NULL,
            detail TEXT NOT NULL,
            at_ms INTEGER NOT NULL
        );
        CREATE INDEX room_changes_by_room ON room_changes (room_id, seq);
        """,
    )


MIGRATIONS: list[Callable[[aiosqlite.Connection], Awaitable[None]]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8]


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    """The daemon's SQLite database, on one connection shared by its tasks.

    SQLite isolates connections, not tasks, and any COMMIT on the connection commits whatever is pending. So
    every statement runs in one task's turn at the connection, under one lock: a write always inside a
    transaction (its own, or the one `transaction()` opened in its task), a read alone or inside its task's
    transaction. No task's COMMIT lands between another task's statements, and no read sees rows another task
    has not committed yet."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task[Any] | None = None
        self._in_transaction = False

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # isolation_level=None: the sqlite3 module opens no transaction of its own; transaction() does
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        store = cls(db)
        try:
            await store._migrate()
        except BaseException:
            await db.close()  # its worker thread would keep a failed start from exiting
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Hold the connection for the current task; a task that holds it already (a Store method called inside
        its `transaction()`) goes on without waiting for itself."""
        if self._holder is asyncio.current_task():
            yield
            return
        async with self._lock:
            self._holder = asyncio.current_task()
            try:
                yield
            finally:
                self._holder = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Make the Store calls inside land together or not at all: BEGIN IMMEDIATE … COMMIT, or ROLLBACK and
        the exception re-raised. Other tasks' calls wait for it to end, so hold it only around Store calls
        (awaiting another task that uses the Store inside it would wait forever). Inside the task's own open
        transaction it joins that one, which commits or rolls back the whole."""
        async with self._turn():
            if self._in_transaction:
                yield
                return
            self._in_transaction = True
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.rollback()  # a no-op if SQLite has rolled back already or BEGIN failed
                raise
            finally:
                self._in_transaction = False

    async def _write(self, sql: str, parameters: Iterable[Any] = ()) -> int:
        """Run one statement in a transaction (its own, or the task's open one); how many rows it changed."""
        async with self.transaction(), self._db.execute(sql, parameters) as cursor:
            return cursor.rowcount

    async def _select(self, sql: str, parameters: Iterable[Any] = ()) -> list[Any]:
        """The rows a query returns, read in the task's turn: only what is committed, or its own transaction's."""
        async with self._turn():
            return list(await self._db.execute_fetchall(sql, parameters))

    async def _migrate(self) -> None:
        """Bring the schema up to date, each migration in one transaction with its `user_version` bump: one that
        fails half way leaves the database at the version before, to be migrated again at the next start."""
        [(version,)] = await self._select("PRAGMA user_version")
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            async with self.transaction():
                await migration(self._db)
                await self._db.execute(f"PRAGMA user_version = {number}")

    async def _get(self, key: str) -> str | None:
        rows = await self._select("SELECT value FROM kv WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def _put(self, key: str, value: str) -> None:
        await self._write(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def check_writable(self) -> None:
        """Write one row (the health check's time): raises what any write would when the database cannot take it."""
        await self._put("health_checked_ms", str(_now_ms()))

    async def sync_token(self) -> str | None:
        return await self._get("sync_token")

    async def set_sync_token(self, token: str) -> None:
        await self._put("sync_token", token)

    async def mark_room_seen(self, room_id: str) -> bool:
        """Record that the daemon now watches this room; True if it had never seen it before."""
        added = await self._write(
            "INSERT OR IGNORE INTO rooms_seen (room_id, first_seen_ms) VALUES (?, ?)", (room_id, _now_ms())
        )
        return added == 1

    async def add_prompt(self, p: Prompt, state: PromptState = "queued") -> bool:
        """Record an accepted (or refused) prompt before it is acknowledged; False if its event was already
        recorded: an event is never handled twice."""
        now = _now_ms()
        added = await self._write(
            "INSERT OR IGNORE INTO prompts (event_id, room_id, sender, body, hops, note, thread, images, state, "
            "received_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (p.event_id, p.room_id, p.sender, p.text, p.hops, p.note, p.thread, json.dumps(p.images), state, now, now),
        )
        return added == 1

    async def set_prompt_state(self, event_id: str, state: PromptState) -> None:
        await self._write(
            "UPDATE prompts SET state = ?, updated_ms = ? WHERE event_id = ?", (state, _now_ms(), event_id)
        )

    async def prompts(self, room_id: str, state: PromptState) -> list[Prompt]:
        """The room's prompts in `state`, oldest first."""
        rows = await self._select(
            "SELECT room_id, event_id, sender, body, hops, note, thread, images FROM prompts "
            "WHERE room_id = ? AND state = ? ORDER BY seq",
            (room_id, state),
        )
        return [Prompt(*row[:-1], tuple(json.loads(row[-1]))) for row in rows]

    async def prompt_state(self, event_id: str) -> PromptState | None:
        rows = await self._select("SELECT state FROM prompts WHERE event_id = ?", (event_id,))
        return rows[0][0] if rows else None

    async def output_events(self, event_id: str) -> int:
        """How many events of the prompt's output were delivered or are queued for delivery."""
        [(count,)] = await self._select(
            "SELECT (SELECT events_sent FROM prompts WHERE event_id = ?) "
            "+ (SELECT count(*) FROM outbox WHERE prompt_id = ?)",
            (event_id, event_id),
        )
        return int(count or 0)

    async def queue_outbox(
        self, room_id: str, rows: list[OutboxRow], ended: tuple[str, PromptState] | None = None
    ) -> None:
        """Accept events for sending, in order; with `ended` (prompt id, final state) the prompt's state is
        written in the same transaction, so a finished prompt always has its last events queued."""
        async with self.transaction():
            await self._db.executemany(
                "INSERT INTO outbox (room_id, txn_id, prompt_id, content) VALUES (?, ?, ?, ?)",
                [(room_id, row.txn_id, row.prompt_id, json.dumps(row.content)) for row in rows],
            )
            if ended is not None:
                await self.set_prompt_state(*ended)

    async def outbox(self, room_id: str) -> list[OutboxRow]:
        """The room's undelivered events, in the order they were queued."""
        rows = await self._select(
            "SELECT txn_id, content, prompt_id FROM outbox WHERE room_id = ? ORDER BY seq", (room_id,)
        )
        return [OutboxRow(txn, json.loads(content), prompt) for txn, content, prompt in rows]

    async def delivered(self, row: OutboxRow, room_id: str = "", refs: Mapping[str, str | None] | None = None) -> None:
        """The event reached the room: forget it, count it for its prompt, and in the same transaction record
        the room's `refs` (a ref to its event id; None: the ref is done with)."""
        async with self.transaction():
            await self._write("DELETE FROM outbox WHERE txn_id = ?", (row.txn_id,))
            for ref, event_id in (refs or {}).items():
                if event_id is None:
                    await self._write("DELETE FROM refs WHERE room_id = ? AND ref = ?", (room_id, ref))
                else:
                    await self._write(
                        "INSERT OR REPLACE INTO refs (room_id, ref, event_id) VALUES (?, ?, ?)",
                        (room_id, ref, event_id),
                    )
            if row.prompt_id is not None:
                await self._write(
                    "UPDATE prompts SET events_sent = events_sent + 1 WHERE event_id = ?", (row.prompt_id,)
                )

    async def refs(self, room_id: str) -> dict[str, str]:
        """The room's refs recorded by `delivered`: ref → event id."""
        return dict(await self._select("SELECT ref, event_id FROM refs WHERE room_id = ?", (room_id,)))

    async def dropped(self, row: OutboxRow) -> None:
        """The event can never be delivered: forget it."""
        await self._write("DELETE FROM outbox WHERE txn_id = ?", (row.txn_id,))

    async def replace_outbox(self, old: OutboxRow, new: OutboxRow) -> None:
        """Put `new` in `old`'s place in the queue (a notice for an event the homeserver refused)."""
        await self._write(
            "UPDATE outbox SET txn_id = ?, content = ? WHERE txn_id = ?",
            (new.txn_id, json.dumps(new.content), old.txn_id),
        )

    async def agent_started(self, room_id: str, pid: int, started: int) -> None:
        """Remember a live agent process, so a daemon killed before ending it can end it at its next start."""
        await self._write(
            "INSERT OR REPLACE INTO agents (pid, started, room_id) VALUES (?, ?, ?)", (pid, started, room_id)
        )

    async def agent_ended(self, pid: int) -> None:
        await self._write("DELETE FROM agents WHERE pid = ?", (pid,))

    async def take_agents(self) -> list[tuple[int, int, str]]:
        """The agent processes an earlier run of the daemon did not end: (pid, start time, room id);
        forgotten as they are returned."""
        async with self.transaction():
            rows = [tuple(row) for row in await self._select("SELECT pid, started, room_id FROM agents")]
            await self._write("DELETE FROM agents")
        return rows  # type: ignore[return-value]

    async def add_cost(self, room_id: str, prompt_id: str, usd: float) -> None:
        """What a run cost, as the CLI reported it."""
        await self._write(
            "INSERT OR REPLACE INTO costs (prompt_id, room_id, usd, at_ms) VALUES (?, ?, ?, ?)",
            (prompt_id, room_id, usd, _now_ms()),
        )

    async def cost(self, room_id: str, since: datetime.datetime | None = None) -> float:
        """What the room's runs cost in US dollars, all together or since `since`."""
        since_ms = 0 if since is None else int(since.timestamp() * 1000)
        [(usd,)] = await self._select(
            "SELECT coalesce(sum(usd), 0) FROM costs WHERE room_id = ? AND at_ms >= ?", (room_id, since_ms)
        )
        return float(usd)

    async def uploads(self, room_id: str) -> list[dict[str, Any]]:
        """The files saved in the room since its last prompt started, which the next one tells the agent of."""
        return json.loads(await self._get(f"uploads:{room_id}") or "[]")

    async def take_uploads(self, room_id: str) -> list[dict[str, Any]]:
        """The room's saved files for the prompt that starts now, and the list emptied, in one transaction."""
        async with self.transaction():
            saved = await self.uploads(room_id)
            await self._write("DELETE FROM kv WHERE key = ?", (f"uploads:{room_id}",))
        return saved

    async def add_upload(self, room_id: str, upload: dict[str, Any]) -> None:
        """Add a saved file to the room's list, read and written in one transaction so none is lost."""
        async with self.transaction():
            await self._put(f"uploads:{room_id}", json.dumps([*await self.uploads(room_id), upload]))

    async def room_model(self, room_id: str) -> str | None:
        """The model chosen for the room with `!model`, if any."""
        return await self._get(f"model:{room_id}")

    async def set_room_model(self, room_id: str, model: str) -> None:
        await self._put(f"model:{room_id}", model)

    async def session_id(self, conversation: str) -> str | None:
        """The Claude session of a conversation (`Prompt.conversation`: a room, or a thread of a room)."""
        rows = await self._select("SELECT session_id FROM sessions WHERE room_id = ?", (conversation,))
        return rows[0][0] if rows else None

    async def set_session_id(self, conversation: str, session_id: str) -> None:
        await self._write(
            "INSERT INTO sessions (room_id, session_id, updated_ms) VALUES (?, ?, ?) "
            "ON CONFLICT(room_id) DO UPDATE SET session_id = excluded.session_id, updated_ms = excluded.updated_ms",
            (conversation, session_id, _now_ms()),
        )

    async def new_conversation(self, conversation: str) -> None:
        """Forget the conversation's session and the tool rules given in it (🔁): its next prompt starts afresh."""
        async with self.transaction():
            await self._write("DELETE FROM sessions WHERE room_id = ?", (conversation,))
            await self._write("DELETE FROM tool_rules WHERE room_id = ?", (conversation,))

    async def add_tool_rule(self, conversation: str, rule: str, by: str) -> None:
        """A tool (or Bash command prefix) allowed for the rest of the conversation."""
        await self._write(
            "INSERT OR REPLACE INTO tool_rules (room_id, rule, by, at_ms) VALUES (?, ?, ?, ?)",
            (conversation, rule, by, _now_ms()),
        )

    async def tool_rules(self, conversation: str) -> list[str]:
        rows = await self._select("SELECT rule FROM tool_rules WHERE room_id = ? ORDER BY at_ms", (conversation,))
        return [rule for (rule,) in rows]

    async def add_approval(self, room_id: str, prompt_id: str, what: str, verdict: str, by: str, reason: str) -> None:
        """A decision on an approval request: who gave it (empty: nobody, it timed out or the run stopped)."""
        await self._write(
            "INSERT INTO approvals (room_id, prompt_id, what, verdict, by, reason, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (room_id, prompt_id, what, verdict, by, reason, _now_ms()),
        )

    async def approvals(self, room_id: str, limit: int = 5) -> list[Approval]:
        """The room's latest approval decisions, newest first."""
        rows = await self._select(
            "SELECT what, verdict, by, reason, at_ms FROM approvals WHERE room_id = ? ORDER BY seq DESC LIMIT ?",
            (room_id, limit),
        )
        return [Approval(what, verdict, by, reason, at_ms / 1000) for what, verdict, by, reason, at_ms in rows]

    async def add_chat_room(self, room_id: str, invited_by: str, settings: Mapping[str, Any]) -> None:
        """Serve a room an admin invited the bot to, from now on and after restarts."""
        now = _now_ms()
        async with self.transaction():
            await self._write(
                "INSERT OR REPLACE INTO chat_rooms (room_id, invited_by, settings, created_ms, updated_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (room_id, invited_by, json.dumps(dict(settings)), now, now),
            )
            await self.add_room_change(room_id, invited_by, "invite", json.dumps(dict(settings)))

    async def chat_rooms(self) -> list[ChatRoom]:
        """The rooms made from the chat, oldest first."""
        rows = await self._select(
            "SELECT room_id, invited_by, settings, created_ms FROM chat_rooms ORDER BY created_ms, room_id"
        )
        return [ChatRoom(room_id, by, json.loads(settings), ms / 1000) for room_id, by, settings, ms in rows]

    async def chat_room(self, room_id: str) -> ChatRoom | None:
        rows = await self._select(
            "SELECT room_id, invited_by, settings, created_ms FROM chat_rooms WHERE room_id = ?", (room_id,)
        )
        return next((ChatRoom(r, by, json.loads(settings), ms / 1000) for r, by, settings, ms in rows), None)

    async def set_chat_room(
        self, room_id: str, settings: Mapping[str, Any], by: str, command: str, detail: str
    ) -> None:
        """Replace the room's chat-set keys and record the change (who, which command, what), together."""
        async with self.transaction():
            await self._write(
                "UPDATE chat_rooms SET settings = ?, updated_ms = ? WHERE room_id = ?",
                (json.dumps(dict(settings)), _now_ms(), room_id),
            )
            await self.add_room_change(room_id, by, command, detail)

    async def forget_chat_room(self, room_id: str, by: str) -> bool:
        """Stop serving the room (`!leave`); False if it was not a room made from the chat."""
        async with self.transaction():
            gone = await self._write("DELETE FROM chat_rooms WHERE room_id = ?", (room_id,))
            if gone:
                await self.add_room_change(room_id, by, "leave", "")
        return gone == 1

    async def add_room_change(self, room_id: str, by: str, command: str, detail: str) -> None:
        await self._write(
            "INSERT INTO room_changes (room_id, by, command, detail, at_ms) VALUES (?, ?, ?, ?, ?)",
            (room_id, by, command, detail, _now_ms()),
        )

    async def room_changes(self, room_id: str, limit: int = 5) -> list[RoomChange]:
        """The room's latest changes from the chat, newest first."""
        rows = await self._select(
            "SELECT by, command, detail, at_ms FROM room_changes WHERE room_id = ? ORDER BY seq DESC LIMIT ?",
            (room_id, limit),
        )
        return [RoomChange(by, command, detail, at_ms / 1000) for by, command, detail, at_ms in rows]


def read_only(path: Path) -> contextlib.closing[sqlite3.Connection]:
    """The daemon's database opened for reading beside it (cchat, doctor). It keeps the database in WAL mode, with
    a -wal file beside it while it runs: then read through it. Without one nothing is being written, and an
    immutable read leaves no -wal or -shm file of this user behind (one of root's would lock the daemon out)."""
    wal = path.with_name(f"{path.name}-wal")
    how = "mode=ro" if wal.exists() else "immutable=1"
    return contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?{how}", uri=True))


def peek_conversation(path: Path, room_id: str) -> tuple[str | None, bool]:
    """For `cchat handback`, beside a running daemon and without writing: the room's session id, and whether
    one of its prompts runs (or ran when the daemon stopped). sqlite3.Error when the database cannot be read."""
    with read_only(path) as db:
        session = db.execute("SELECT session_id FROM sessions WHERE room_id = ?", (room_id,)).fetchone()
        running = db.execute(
            "SELECT 1 FROM prompts WHERE room_id = ? AND state = 'running' LIMIT 1", (room_id,)
        ).fetchone()
    return (session[0] if session else None), running is not None
