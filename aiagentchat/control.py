"""The control endpoint: a Unix socket in the data dir (0600, the daemon's own user only) that speaks JSON lines
both ways. A client asks for a snapshot of the rooms, subscribes to a stream of changes (what the rooms'
batchers are handed, as it is handed; the daemon's log records), and acts as the operator: stop a run, drop a
queued prompt, answer an approval, start a new conversation, through the same code paths people's actions take;
and it runs the emoji verification of `aiagentchat verify` inside the daemon, one at a time.
Each client has a bounded buffer: one that stops reading is told and dropped, and the daemon never waits for it.
The protocol is in docs/control.md."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from aiagentchat import logs
from aiagentchat.approvals import Answer, rule_text, summarize
from aiagentchat.batcher import Accepted, Begin, Block, EndOfRun, Item, Notice, React, Text
from aiagentchat.commands import Command, today_utc
from aiagentchat.errors import ConfigError
from aiagentchat.verify import InDaemon, Target

if TYPE_CHECKING:
    from aiagentchat.bot import Bot

log = structlog.get_logger(__name__)

SOCKET_NAME = "control.sock"
OPERATOR = "the operator"  # who the room is told acted: `🛑 Stopped by the operator`
MAX_REQUEST_BYTES = 64 * 1024
CLIENT_BUFFER_BYTES = 1024 * 1024  # a client whose unread lines pass this is dropped
TOOL_LINES_KEPT = 50  # of a running prompt, for a snapshot
ACTIVITY_CHARS = 200
EXCERPT_CHARS = 200
REASON_CHARS = 1000
STREAM_LIMIT = 16 * 1024 * 1024  # what a client takes as one line: a big chunk of output may be long
CLOSE_GRACE_S = 5.0  # a dropped client's last line may take this long to leave, then its connection is cut
VERDICTS = ("allow", "deny", "always")
VERIFY_TIMEOUT_S = 300.0  # as `aiagentchat verify`'s default
MAX_VERIFY_TIMEOUT_S = 3600.0
USER_ID = re.compile(r"@[^:\s]+:\S+")
DEVICE_ID = re.compile(r"\S{1,255}")


class RequestError(Exception):
    """A request that cannot be done; its message goes back to the client."""


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, default=str).encode() + b"\n"


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last_line(text: str) -> str:
    line = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    return line if len(line) <= ACTIVITY_CHARS else "…" + line[-(ACTIVITY_CHARS - 1) :]


@dataclass
class Running:
    """What the running prompt of a room has shown so far: its tool lines and what it does now."""

    prompt_id: str
    tools: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TOOL_LINES_KEPT))
    progress: str = ""
    tail: str = ""  # the end of its text, for its last line

    def add(self, item: Text | Block) -> None:
        if isinstance(item, Text):
            self.tail = (self.tail + item.text)[-4 * ACTIVITY_CHARS :]
        elif item.kind == "tool":
            self.tools.append(item.markdown.strip())
            self.progress = ""
        elif item.kind == "progress":
            self.progress = item.markdown.strip()

    def activity(self) -> str:
        return self.progress or _last_line(self.tail)


class Client:
    """One connection: its unsent lines (bounded), and what it subscribed to."""

    def __init__(self, writer: asyncio.StreamWriter, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self.subscribed = False
        self.logs = False
        self.closed = False
        self.overflowed = False
        self._lines: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ready = asyncio.Event()

    def send(self, line: bytes) -> bool:
        """Queue a line; False (and the client is to be dropped) when its buffer is full."""
        if self.closed or self.overflowed:
            return True
        if self._size + len(line) > CLIENT_BUFFER_BYTES:
            self.overflowed = True
            return False
        self._lines.append(line)
        self._size += len(line)
        self._ready.set()
        return True

    async def write(self) -> None:
        """Hand queued lines to the connection until it closes (a slow reader makes only this task wait)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._lines:
                if self.closed or self.writer.transport.is_closing():
                    return
                line = self._lines.popleft()
                self._size -= len(line)
                self.writer.write(line)
            await self.writer.drain()


class Hub:
    """The daemon's side of the endpoint: sees what the rooms' batchers are handed (`observe`), keeps what a
    snapshot needs that the rooms do not keep themselves, and serves the clients."""

    def __init__(self, bot: Bot) -> None:
        self._bot = bot
        self._clients: set[Client] = set()
        self._running: dict[str, Running] = {}
        self._costs: dict[str, tuple[float, float]] = {}  # room → (start of its budget day, cost that day)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.get_ident()
        self._verification: InDaemon | None = None  # the one under way, or the last one (its outcome)
        self._verifying: asyncio.Task[int] | None = None

    # --- what the rooms do ------------------------------------------------------------------------------

    def observe(self, room_id: str, item: Item) -> None:
        """An item handed to a room's batcher (called by it, synchronously: never raises, never waits)."""
        match item:
            case Begin(prompt_id=prompt_id, working=True):
                self._running[room_id] = Running(prompt_id)
                self._event({"type": "begin", "room": room_id, "prompt": prompt_id})
            case Text(prompt_id=prompt_id, text=text) | Block(prompt_id=prompt_id, markdown=text):
                running = self._running.get(room_id)
                if running is not None and running.prompt_id == prompt_id:
                    running.add(item)
                kind = "text" if isinstance(item, Text) else item.kind or "block"
                self._event({"type": "output", "room": room_id, "prompt": prompt_id, "kind": kind, "text": text})
                if kind != "text":
                    self._changed(room_id)
                return
            case EndOfRun(prompt_id=prompt_id, state=state, final=final):
                running = self._running.get(room_id)
                if running is not None and running.prompt_id == prompt_id:
                    del self._running[room_id]
                self._costs.pop(room_id, None)
                self._event({"type": "end", "room": room_id, "prompt": prompt_id, "state": state, "final": final})
            case Notice(markdown=markdown):
                self._event({"type": "notice", "room": room_id, "text": markdown})
            case Accepted() | React() | Begin():
                pass
        self._changed(room_id)

    def log_line(self, record: str) -> None:
        """A log record as JSON (already redacted), for the clients that asked for the log."""
        line = b'{"type": "log", "record": ' + record.encode() + b"}\n"
        for client in list(self._clients):
            if client.subscribed and client.logs:
                self._send(client, line)

    def _event(self, message: dict[str, Any]) -> None:
        if not any(client.subscribed for client in self._clients):
            return
        line = _line(message)
        for client in list(self._clients):
            if client.subscribed:
                self._send(client, line)

    def _all_changed(self, _: object = None) -> None:
        for room_id in self._bot.workers:
            self._changed(room_id)

    def _changed(self, room_id: str) -> None:
        self._dirty.add(room_id)
        self._wake.set()

    def _send(self, client: Client, line: bytes) -> None:
        if not client.send(line) and self._loop is not None:
            self._loop.call_soon(self._drop, client)  # not now: this may be inside a log call

    def _drop(self, client: Client) -> None:
        """A client that stopped reading: told (its last line, after what it has not read yet) and cut off."""
        if client.closed:
            return
        log.warning("control_client_dropped", peer=client.peer, reason="it stopped reading")
        reason = f"dropped: you stopped reading and more than {CLIENT_BUFFER_BYTES:,} bytes waited for you"
        self._close(client, _line({"type": "dropped", "reason": reason}))

    def _close(self, client: Client, last: bytes | None = None) -> None:
        client.closed = True
        self._clients.discard(client)
        transport = client.writer.transport
        if last is not None and not transport.is_closing():
            transport.write(last)
        transport.close()
        if self._loop is not None:
            self._loop.call_later(CLOSE_GRACE_S, _cut, transport)

    async def pump(self) -> None:
        """Send each changed room's summary to the subscribers, once the change is complete (this task runs
        after the one that made it yields)."""
        ready = asyncio.ensure_future(self._bot.ready.wait())
        ready.add_done_callback(self._all_changed)  # the rooms exist once the daemon is ready
        try:
            await self._pump()
        finally:
            ready.cancel()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            if not any(client.subscribed for client in self._clients):
                continue
            for room_id in sorted(dirty):
                if self._served(room_id):
                    await self._refresh_cost(room_id)
                    self._event({"type": "room", "room": self._summary(room_id)})

    # --- state -----------------------------------------------------------------------------------------

    async def _refresh_cost(self, room_id: str) -> None:
        day = today_utc().timestamp()
        if (known := self._costs.get(room_id)) is None or known[0] != day:
            self._costs[room_id] = (day, await self._bot.store.cost(room_id, since=today_utc()))

    async def snapshot(self) -> dict[str, Any]:
        rooms = list(self._bot.workers)
        for room_id in rooms:
            await self._refresh_cost(room_id)
        return {
            "user_id": self._bot.client.user_id,
            "ready": self._bot.ready.is_set(),
            "rooms": [self._summary(room_id) for room_id in rooms if self._served(room_id)],
            "verification": self._verification.state if self._verification is not None else None,
        }

    def _summary(self, room_id: str) -> dict[str, Any]:
        """One room as the console shows it (all synchronous: a consistent picture)."""
        bot = self._bot
        worker, room, policy = bot.workers[room_id], bot.rooms[room_id], bot.policies[room_id]
        spent = self._costs.get(room_id, (0.0, 0.0))[1]
        budget = room.budget_usd_per_day
        queue = [
            {"prompt": prompt.event_id, "sender": prompt.sender, "text": _excerpt(prompt.text)}
            for prompt in worker.waiting_prompts()
        ]
        running = None
        runs = worker.running()  # with worktrees, one per thread running now: the longest-running is shown
        if runs and (current := (lead := min(runs, key=lambda run: run.current_since)).current) is not None:
            shown = self._running.get(room_id)
            running = {
                "prompt": current.event_id,
                "sender": current.sender,
                "text": _excerpt(current.text),
                "since": lead.current_since,
                "runs": len(runs),
                "tools": list(shown.tools) if shown is not None and shown.prompt_id == current.event_id else [],
                "activity": shown.activity() if shown is not None and shown.prompt_id == current.event_id else "",
            }
        approval = None
        if (pending := policy.pending) is not None:
            rule = pending.rule()
            approval = {
                "key": pending.key,
                "prompt": pending.prompt_id,
                "tool": pending.tool_name,
                "what": pending.what(),
                "details": summarize(pending.tool_name, pending.tool_input),
                "question": pending.question,
                "always": rule_text(rule) if rule is not None else None,
                "asked_at": pending.asked_at,
            }
        if approval is not None:
            state = "waiting"
        elif running is not None:
            state = "running"
        elif budget is not None and spent >= budget:
            state = "refused"
        else:
            state = "idle"
        return {
            "id": room_id,
            "name": room.name or room_id,
            "state": state,
            "refused": "budget spent" if state == "refused" else None,
            "model": worker.model,
            "cost_today": spent,
            "budget": budget,
            "running": running,
            "queue": queue,
            "approval": approval,
            "trust": None if (unverified := bot.crypto.unverified(room_id)) is None else {
                "policy": room.trust, "unverified": unverified,
            },
        }  # fmt: skip

    # --- clients ---------------------------------------------------------------------------------------

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        peer = f"pid {pid}, uid {uid}"
        client = Client(writer, peer)
        if uid != os.getuid():
            log.warning("control_refused", peer=peer, reason="another user")
            self._close(client, _line({"type": "error", "error": "refused: only the daemon's own user may connect"}))
            return
        self._clients.add(client)
        log.info("control_client_connected", peer=peer)
        writing = asyncio.create_task(client.write())
        try:
            while not client.closed:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the reader's limit: the rest of it cannot be told apart
                    self._close(client, _line({"type": "error", "error": f"a line over {MAX_REQUEST_BYTES} bytes"}))
                    break
                except ConnectionError:
                    break
                if not line:
                    break
                if line.strip():
                    await self._request(client, line)
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await writing
            if not client.closed:
                self._close(client)
            log.info("control_client_gone", peer=peer)

    async def _request(self, client: Client, line: bytes) -> None:
        request_id: Any = None
        try:
            try:
                request = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                raise RequestError("not a JSON line") from None
            if not isinstance(request, dict):
                raise RequestError("a request is a JSON object")
            request_id = request.get("id")
            if not isinstance(request_id, (str, int, type(None))) or isinstance(request_id, bool):
                request_id = None
                raise RequestError("`id` is a string or an integer")
            op = request.get("op")
            handler = _OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RequestError(f"`op` is one of {', '.join(sorted(_OPS))}")
            reply = await handler(self, client, request)
        except RequestError as error:
            self._send(client, _line({"type": "error", "id": request_id, "error": str(error)}))
            return
        except Exception:  # a fault of the daemon's, not of the request: logged, and the client told so
            log.exception("control_request_failed", peer=client.peer)
            self._send(client, _line({"type": "error", "id": request_id, "error": "internal error; see the log"}))
            return
        self._send(client, _line(reply | {"type": "reply", "id": request_id, "ok": True}))

    def _room(self, request: dict[str, Any]) -> str:
        room_id = request.get("room")
        if not isinstance(room_id, str):
            raise RequestError("`room` is a room id (a string)")
        if not self._served(room_id):
            raise RequestError(f"no room {room_id!r} is served")
        return room_id

    def _served(self, room_id: str) -> bool:
        """Whether the room is served: a room that `!leave` left is forgotten (bot.rooms) before its tasks end."""
        return room_id in self._bot.workers and room_id in self._bot.rooms

    def _done(self, room_id: str, action: str, outcome: str, **details: Any) -> dict[str, Any]:
        log.info("operator_action", room_id=room_id, action=action, outcome=outcome, **details)
        self._changed(room_id)
        return {"outcome": outcome}

    async def _op_snapshot(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        return await self.snapshot()

    async def _op_subscribe(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        logs_wanted = request.get("logs", False)
        if not isinstance(logs_wanted, bool):
            raise RequestError("`logs` is true or false")
        snapshot = await self.snapshot()
        client.subscribed, client.logs = True, logs_wanted  # with the snapshot: no change falls between
        return snapshot

    async def _op_stop(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        room_id = self._room(request)
        worker = self._bot.workers[room_id]
        if not worker.stop(OPERATOR):
            raise RequestError("nothing is running in that room")
        return self._done(room_id, "stop", "stopping")

    async def _op_drop(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        room_id = self._room(request)
        prompt_id = request.get("prompt")
        if not isinstance(prompt_id, str):
            raise RequestError("`prompt` is a queued prompt's event id (a string)")
        if not await self._bot.workers[room_id].drop(prompt_id, OPERATOR):
            raise RequestError("that prompt is not queued")
        return self._done(room_id, "drop", "dropped", prompt=prompt_id)

    async def _op_answer(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        room_id = self._room(request)
        key, verdict, text = request.get("approval"), request.get("verdict"), request.get("text", "")
        if not isinstance(key, str):
            raise RequestError("`approval` is the waiting request's key (a string)")
        if verdict not in VERDICTS:
            raise RequestError(f"`verdict` is one of {', '.join(VERDICTS)}")
        if not isinstance(text, str) or len(text) > REASON_CHARS:
            raise RequestError(
                f"`text` (a denial's reason, or the answer to a question) is a string of at most "
                f"{REASON_CHARS} characters"
            )
        policy = self._bot.policies[room_id]
        pending = policy.pending
        if pending is None or pending.key != key:
            raise RequestError("that request is no longer waiting")
        if pending.question and verdict != "deny" and not text.strip():
            raise RequestError("the agent asked a question: answer it in `text`, or deny")
        if not policy.answer(pending, Answer(verdict, OPERATOR, text.strip())):
            raise RequestError("that request is answered already")
        return self._done(room_id, "answer", verdict, tool=pending.tool_name)

    async def _op_new(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        room_id = self._room(request)
        bot = self._bot
        room, worker = bot.rooms[room_id], bot.workers[room_id]
        notice = await bot.commands.answer(room_id, room, worker, OPERATOR, Command("new", ""))
        await worker.batcher.put(Notice("", f"{OPERATOR.capitalize()}: {notice.markdown}", {}))
        return self._done(room_id, "new", "the next prompt starts a new conversation")

    # --- verification ----------------------------------------------------------------------------------

    async def _op_verify(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        user, device = request.get("user"), request.get("device")
        timeout = request.get("timeout", VERIFY_TIMEOUT_S)
        if user is not None and not (isinstance(user, str) and USER_ID.fullmatch(user) and len(user) <= 255):
            raise RequestError("`user` is a Matrix user id (@name:server)")
        if device is not None and not (isinstance(device, str) and DEVICE_ID.fullmatch(device)):
            raise RequestError("`device` is a device id (a string without spaces)")
        if device is not None and user is None:
            raise RequestError("`device` needs `user`")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 1 <= timeout <= MAX_VERIFY_TIMEOUT_S
        ):
            raise RequestError(f"`timeout` is a number of seconds from 1 to {MAX_VERIFY_TIMEOUT_S:g}")
        if self._verifying is not None and not self._verifying.done():
            raise RequestError("a verification is under way already: one at a time (`verify_cancel` ends it)")
        bot = self._bot
        if bot.client.olm is None:
            raise RequestError("the bot's device has no encryption: nothing to verify")
        crypto = bot.crypto
        allowed = {person for room in bot.rooms.values() for person in room.allowed_users}
        master = crypto.identity.master_key if crypto.identity is not None else None
        verification = InDaemon(bot.client, crypto.key_file, master, allowed, Target(user, device), float(timeout),
                                self._report_verification)  # fmt: skip
        self._verification, crypto.verification = verification, verification.session
        self._verifying = asyncio.create_task(self._verify(verification))
        log.info("operator_action", action="verify", user_id=user, device_id=device)
        return {"outcome": "started", "verification": verification.state}

    async def _verify(self, verification: InDaemon) -> int:
        try:
            code = await verification.run()
        except Exception:  # a fault of the daemon's: logged here, where nobody awaits the task for it
            log.exception("verification_failed")
            raise
        finally:
            if self._bot.crypto.verification is verification.session:
                self._bot.crypto.verification = None
            self._all_changed()  # the trust column
        log.info("verification_ended", phase=verification.state["phase"], user_id=verification.state["user"])
        return code

    def _report_verification(self, state: dict[str, Any]) -> None:
        self._event({"type": "verification", "verification": state})

    async def _op_verify_confirm(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        match = request.get("match")
        if not isinstance(match, bool):
            raise RequestError("`match` is true (the emoji match) or false (they do not)")
        if self._verification is None or not self._verification.answer(match):
            raise RequestError("no verification is waiting for an answer")
        log.info("operator_action", action="verify_confirm", match=match)
        return {"outcome": "confirmed" if match else "denied"}

    async def _op_verify_cancel(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        verifying = self._verifying
        if verifying is None or verifying.done():
            raise RequestError("no verification is under way")
        verifying.cancel()
        await asyncio.wait([verifying])
        log.info("operator_action", action="verify_cancel")
        return {"outcome": "cancelled"}

    # --- serving ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self, path: Path) -> AsyncIterator[None]:
        """Serve the control socket at `path` while the context is open; ConfigError when it cannot be made
        privately (the daemon then refuses to start)."""
        self._loop, self._thread = asyncio.get_running_loop(), threading.get_ident()
        sock = _bind_private(path)
        server = await asyncio.start_unix_server(self.serve_client, sock=sock, limit=MAX_REQUEST_BYTES)
        tap = _LogTap(self)
        logging.getLogger().addHandler(tap)
        pump = asyncio.create_task(self.pump())
        log.info("control_serving", path=str(path))
        try:
            yield
        finally:
            logging.getLogger().removeHandler(tap)
            pump.cancel()
            if self._verifying is not None:
                self._verifying.cancel()
                await asyncio.wait([self._verifying])
            server.close()
            for client in list(self._clients):
                self._close(client)
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            path.unlink(missing_ok=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    def from_any_thread(self, record: str) -> None:
        if threading.get_ident() == self._thread:
            self.log_line(record)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.log_line, record)


def _cut(transport: asyncio.BaseTransport) -> None:
    """End a closed connection whose last line has not left yet; nothing once it is gone (asyncio forgets a
    transport's protocol when its connection is lost, and aborting it then fails in the event loop)."""
    if transport.get_protocol() is not None:
        transport.abort()


_OPS = {
    "snapshot": Hub._op_snapshot,
    "subscribe": Hub._op_subscribe,
    "stop": Hub._op_stop,
    "drop": Hub._op_drop,
    "answer": Hub._op_answer,
    "new": Hub._op_new,
    "verify": Hub._op_verify,
    "verify_confirm": Hub._op_verify_confirm,
    "verify_cancel": Hub._op_verify_cancel,
}


class _LogTap(logging.Handler):
    """Every record the daemon logs (as its log shows it, redacted), to the clients that asked for the log."""

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self._hub = hub
        self.setFormatter(logs.formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except (TypeError, ValueError):  # a record that cannot be rendered: the main handler says so already
            return
        self._hub.from_any_thread(text)


# --- the client side (the console, doctor) ---------------------------------------------------------------


class ControlError(Exception):
    """The daemon answered a request with an error, or is gone."""


class ControlClient:
    """Requests with their answers, and the stream, over one connection to the control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    @classmethod
    async def connect(cls, path: Path) -> ControlClient:
        return cls(*await asyncio.open_unix_connection(str(path), limit=STREAM_LIMIT))

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        answer = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        line = json.dumps({"op": op, "id": request_id} | fields).encode() + b"\n"
        if len(line) > MAX_REQUEST_BYTES:
            raise ControlError("request too long")
        self._writer.write(line)
        await self._writer.drain()
        reply = await answer
        if reply["type"] == "error":
            raise ControlError(reply["error"])
        return reply

    async def stream(self, handle: Callable[[dict[str, Any]], None]) -> str:
        """Hand each streamed message to `handle` and answers to their requests, until the connection ends;
        why it ended."""
        why = "the daemon closed the connection"
        while line := await self._reader.readline():
            message = json.loads(line)
            if message.get("type") in ("reply", "error") and message.get("id") in self._waiting:
                self._waiting.pop(message["id"]).set_result(message)
            elif message.get("type") == "dropped":
                why = str(message.get("reason"))
            else:
                handle(message)
        for waiting in self._waiting.values():
            waiting.set_exception(ControlError(why))
        self._waiting.clear()
        return why

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def _bind_private(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, 0600, made so that nobody else can ever open it: bound under umask
    177 in the data dir, which must be 0700 and ours; ConfigError when that cannot be had."""
    directory = path.parent
    info = directory.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"the control socket's directory {directory} must be 0700 and the daemon's own")
    if len(os.fsencode(path)) >= 108:
        raise ConfigError(f"the control socket's path {path} is too long for a Unix socket: use a shorter data_dir")
    with contextlib.suppress(FileNotFoundError):
        existing = path.lstat()
        if not stat.S_ISSOCK(existing.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a daemon that did not stop cleanly
        else:
            raise ConfigError(f"{path} answers: another daemon serves this data dir")
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    except OSError as exc:
        server.close()
        raise ConfigError(f"the control socket {path} cannot be made: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    made = path.lstat()
    if made.st_uid != os.getuid() or stat.S_IMODE(made.st_mode) != 0o600:
        server.close()
        path.unlink(missing_ok=True)
        raise ConfigError(f"the control socket {path} came out mode {stat.S_IMODE(made.st_mode):04o}, not 0600")
    server.listen()
    server.setblocking(False)
    return server
