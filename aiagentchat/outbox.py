"""A room's outbox: its events sent in order, one at a time, each with a transaction id fixed before the first
attempt and kept in SQLite until the homeserver has it, so neither a retry nor a restart posts it twice."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from aiagentchat import render
from aiagentchat.store import OutboxRow, PromptState, Store
from aiagentchat.wire import MARKER_KEY

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Sent:
    event_id: str


@dataclass(frozen=True)
class RateLimited:
    retry_after_s: float | None  # from Retry-After or retry_after_ms; None if the server gave none


@dataclass(frozen=True)
class SendFailed:
    reason: str
    retryable: bool  # network error, timeout, 5xx: True; 403, 404, 413 and the like: False


SendOutcome = Sent | RateLimited | SendFailed


class Sender(Protocol):
    async def send(
        self, room_id: str, content: dict[str, Any], txn_id: str, event_type: str = "m.room.message"
    ) -> SendOutcome: ...

    async def redact(self, room_id: str, event_id: str, txn_id: str) -> SendOutcome: ...

    async def upload(self, room_id: str, path: Path, mimetype: str) -> dict[str, Any] | SendOutcome:
        """Put a file in the media repository; the content keys that point to it (`url`, or `file` in an
        encrypted room), or why it failed."""
        ...


UPLOAD_KEY = "org.aiagentchat.upload"  # {"path", "mimetype"}: a local file to upload before the event is sent
TYPE_KEY = "org.aiagentchat.type"  # the event's type when it is not m.room.message (a reaction, a redaction)
REF_KEY = "org.aiagentchat.ref"  # a name for the event, so a later redaction can point at it
REDACTS_KEY = "org.aiagentchat.redacts"  # a redaction: the `ref` of the event it removes
REPLACES_KEY = "org.aiagentchat.replaces"  # an edit: the `ref` of the event it replaces
LAST_EDIT_KEY = "org.aiagentchat.last_edit"  # the last edit of that event: its ref is forgotten once it is sent
REDACTION = "m.room.redaction"
_LOCAL_KEYS = (TYPE_KEY, REF_KEY, REDACTS_KEY, REPLACES_KEY, LAST_EDIT_KEY)
EVENT_KINDS = ("message", "reaction", "redaction", "edit")
RATE_LIMIT_HELP = (
    "the homeserver holds the bot's messages back; README.md#rate-limits shows how its admin exempts the bot"
)
_rate_limit_explained = False  # the first rate_limited line of the process carries RATE_LIMIT_HELP


def reaction_content(event_id: str, key: str, ref: str | None = None) -> dict[str, Any]:
    """A reaction to `event_id`; with `ref`, a later `redaction_content(ref)` takes it back."""
    content = {TYPE_KEY: "m.reaction", "m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}
    return content | ({REF_KEY: ref} if ref is not None else {})


def redaction_content(ref: str) -> dict[str, Any]:
    return {TYPE_KEY: REDACTION, REDACTS_KEY: ref}


@dataclass
class Stats:
    """What an outbox has sent so far, for benchmarks, logs and metrics."""

    events_sent: int = 0
    rate_limited: int = 0
    send_failures: int = 0
    bytes_sent: int = 0
    backoff_s: float = 0.0  # how long sending paused, summed
    sent_by_kind: Counter[str] = field(default_factory=Counter)  # by EVENT_KINDS
    prompts_ended: Counter[str] = field(default_factory=Counter)  # by final state, as recorded with their events


def event_kind(content: dict[str, Any]) -> str:
    """Which of EVENT_KINDS an outbox row is."""
    kind = {"m.reaction": "reaction", REDACTION: "redaction"}.get(content.get(TYPE_KEY, ""))
    return kind or ("edit" if REPLACES_KEY in content else "message")


def jittered(delay: float) -> float:
    """Somewhere in the second half of `delay`, so that rooms backing off together do not retry together."""
    return delay * random.uniform(0.5, 1.0)


class Outbox:
    """Sends a room's queued events in order. A rate limit or a retryable failure pauses sending (the caller
    keeps coalescing meanwhile) and the same event is sent again with the same transaction id; an event the
    homeserver refuses for good is replaced by a short notice that keeps its marker. Logs one line when
    sending gets into trouble and one when it recovers, never one per attempt."""

    def __init__(
        self,
        room_id: str,
        sender: Sender,
        store: Store,
        *,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float], float] = jittered,
    ) -> None:
        self.room_id = room_id
        self.stats = Stats()
        self._sender = sender
        self._store = store
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._jitter = jitter
        self._rows: deque[OutboxRow] = deque()
        self._head_since = 0.0  # when the first row became first: how long delivery has made no progress
        self._resume_at = -math.inf
        self._backoff_s = 1.0
        self._trouble: str | None = None
        self._attempts = 0
        self._notices: set[str] = set()  # transaction ids of notices standing in for refused events
        # the event ids of sent events that carry a ref, until taken back, edited for the last time or forgotten;
        # kept in the store, so that what a run left in the room before a restart can still be edited or taken back
        self._refs: dict[str, str] = {}
        self._ref_changes: dict[str, str | None] = {}  # recorded with the next delivered event

    async def load(self) -> int:
        """Take up what an earlier run of the daemon (or of the room's sending task, restarted after a crash)
        left unsent, and the refs it left; how many events that is."""
        self._refs = await self._store.refs(self.room_id)
        rows = await self._store.outbox(self.room_id)
        self._rows = deque(rows)
        self._head_since = self._clock()
        if rows:
            log.info("outbox_resumed", room_id=self.room_id, events=len(rows))
        return len(rows)

    async def queue(
        self, contents: list[dict[str, Any]], prompt_id: str | None, ended: PromptState | None = None
    ) -> None:
        """Accept events for sending (durably, before any attempt); `ended` records the prompt's final state
        in the same transaction."""
        rows = [OutboxRow(uuid.uuid4().hex, content, prompt_id) for content in contents]
        ending = None if ended is None or prompt_id is None else (prompt_id, ended)
        await self._store.queue_outbox(self.room_id, rows, ending)
        if not self._rows:
            self._head_since = self._clock()
        self._rows.extend(rows)
        if ending is not None:
            self.stats.prompts_ended[ending[1]] += 1
            log.info("run_ended", room_id=self.room_id, prompt=prompt_id, state=ended, queued=len(self._rows))

    def event_of(self, ref: str) -> str | None:
        return self._refs.get(ref)

    def forget(self, ref: str) -> str | None:
        self._ref_changes[ref] = None
        return self._refs.pop(ref, None)

    @property
    def size(self) -> int:
        return len(self._rows)

    def waiting_since(self) -> float | None:
        """Since when (on its clock) the next event has waited to be delivered; None when none waits."""
        return self._head_since if self._rows else None

    def ready_at(self) -> float | None:
        """When the next event may be sent; None when there is none."""
        return self._resume_at if self._rows else None

    async def send_next(self) -> None:
        row = self._rows[0]
        if (upload := row.content.get(UPLOAD_KEY)) is not None:
            uploaded = await self._sender.upload(self.room_id, Path(upload["path"]), upload["mimetype"])
            if isinstance(uploaded, dict):
                content = {key: value for key, value in row.content.items() if key != UPLOAD_KEY} | uploaded
                row = OutboxRow(row.txn_id, content, row.prompt_id)
                await self._store.replace_outbox(self._rows[0], row)
                self._rows[0] = row
                Path(upload["path"]).unlink(missing_ok=True)
            else:
                await self._settle(row, uploaded)
                return
        event_type = row.content.get(TYPE_KEY, "m.room.message")
        if event_type == REDACTION:
            target = self._refs.get(row.content[REDACTS_KEY])
            if target is None:  # its event was never sent (refused for good): nothing to take back
                await self._store.dropped(row)
                self._pop()
                return
            outcome = await self._sender.redact(self.room_id, target, row.txn_id)
            if isinstance(outcome, Sent):
                del self._refs[row.content[REDACTS_KEY]]
                self._ref_changes[row.content[REDACTS_KEY]] = None
        else:
            content = {key: value for key, value in row.content.items() if key not in _LOCAL_KEYS}
            if (replaces := row.content.get(REPLACES_KEY)) is not None:
                if (original := self._refs.get(replaces)) is None:  # never sent (refused for good): no edit
                    await self._store.dropped(row)
                    self._pop()
                    return
                content["m.relates_to"] = {"rel_type": "m.replace", "event_id": original}
            outcome = await self._sender.send(self.room_id, content, row.txn_id, event_type)
            if isinstance(outcome, Sent) and (ref := row.content.get(REF_KEY)) is not None:
                self._refs[ref] = self._ref_changes[ref] = outcome.event_id
            if isinstance(outcome, Sent) and replaces is not None and row.content.get(LAST_EDIT_KEY):
                del self._refs[replaces]
                self._ref_changes[replaces] = None
        await self._settle(row, outcome)

    async def _settle(self, row: OutboxRow, outcome: SendOutcome) -> None:
        """Act on the outcome of an attempt at the queue's first event."""
        self._attempts += 1
        match outcome:
            case Sent():
                self.stats.events_sent += 1
                self.stats.bytes_sent += render.content_size(row.content)
                self.stats.sent_by_kind[event_kind(row.content)] += 1
                self._pop()
                self._recovered()
                changes, self._ref_changes = self._ref_changes, {}
                await self._store.delivered(row, self.room_id, changes)
            case RateLimited(retry_after_s=retry_after_s):
                self.stats.rate_limited += 1
                self._in_trouble("rate_limited", retry_in_s=self._back_off(retry_after_s))
            case SendFailed(reason=reason, retryable=True):
                self.stats.send_failures += 1
                self._in_trouble("send_failing", reason=reason, retry_in_s=self._back_off(None))
            case SendFailed(reason=reason):
                self.stats.send_failures += 1
                size = render.content_size(row.content)
                log.error("send_failed", room_id=self.room_id, reason=reason, bytes=size)
                if row.txn_id in self._notices or TYPE_KEY in row.content:
                    await self._store.dropped(row)
                    self._pop()
                else:
                    if (upload := row.content.get(UPLOAD_KEY)) is not None:
                        Path(upload["path"]).unlink(missing_ok=True)
                    notice = self._refusal_notice(row, size, reason)
                    await self._store.replace_outbox(row, notice)
                    self._rows[0] = notice
                    self._notices.add(notice.txn_id)
                self._recovered()

    def _pop(self) -> None:
        self._rows.popleft()
        self._head_since = self._clock()

    def _refusal_notice(self, row: OutboxRow, size: int, reason: str) -> OutboxRow:
        """What the room sees instead of an event the homeserver refused for good; it keeps the event's
        marker (and so a run's `final`), so a client waiting for the end of a run still sees it."""
        body = f"⚠️ {size} bytes of output could not be delivered to this room ({reason})."
        content = render.notice_content(body, row.content.get(MARKER_KEY) or {})
        return OutboxRow(uuid.uuid4().hex, content, row.prompt_id)

    def _in_trouble(self, state: str, **details: Any) -> None:
        global _rate_limit_explained
        if self._trouble != state:
            self._trouble = state
            if state == "rate_limited" and not _rate_limit_explained:
                _rate_limit_explained = True
                details["help"] = RATE_LIMIT_HELP
            log.warning(state, room_id=self.room_id, **details)

    def _recovered(self) -> None:
        if self._trouble is not None:
            log.info("send_recovered", room_id=self.room_id, was=self._trouble, attempts=self._attempts)
        self._trouble = None
        self._attempts = 0
        self._backoff_s = 1.0

    def _back_off(self, retry_after_s: float | None) -> float:
        """Pause sending: the server's delay, else 1 s doubling per failure with jitter; both capped at
        max_backoff_s."""
        if retry_after_s is None:
            delay = self._jitter(self._backoff_s)
            self._backoff_s = min(2 * self._backoff_s, self._max_backoff_s)
        else:
            delay = retry_after_s
        delay = min(max(delay, 0.0), self._max_backoff_s)
        self._resume_at = self._clock() + delay
        self.stats.backoff_s += delay
        return delay
