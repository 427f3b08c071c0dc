"""Per-room output coalescing and sending: one ordered stream of events per room, 429s honoured."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from aiagentchat import render

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Text:
    """Streamed agent text; may end mid-line; concatenated as is."""

    prompt_id: str
    text: str


@dataclass(frozen=True)
class Block:
    """A complete Markdown block (tool line, result excerpt, footer, notice); always on its own lines."""

    prompt_id: str
    markdown: str


@dataclass(frozen=True)
class Begin:
    """A prompt's run starts: `marker` fields go into the `org.aiagentchat` key of each of its events."""

    prompt_id: str
    marker: dict[str, Any]


@dataclass(frozen=True)
class EndOfRun:
    """The prompt's run ended: everything of it is flushed now, including a partial last line. `final`
    (ok, result, cost...) goes into the marker of the run's last event, so clients know the run is over."""

    prompt_id: str
    final: dict[str, Any] | None = None


Item = Begin | Text | Block | EndOfRun


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
    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> SendOutcome: ...


@dataclass
class Stats:
    """What a batcher has sent so far, for benchmarks and logs."""

    events_sent: int = 0
    rate_limited: int = 0
    send_failures: int = 0
    bytes_sent: int = 0


@dataclass(frozen=True)
class _Event:
    """One event as built at flush time; its content and transaction id never change, so retries dedupe."""

    content: dict[str, Any]
    txn_id: str
    size: int
    notice: bool = False  # a notice that stands in for an event the homeserver refused


@dataclass(frozen=True)
class _Close:
    """Queued by close(): flush everything, deliver it, then stop."""


class Batcher:
    """Coalesces a room's output into few events and sends them in order, one at a time.

    The first output after a quiet `interval_s` goes out at once, later output at most once per
    `interval_s`; a partial last line waits for its newline for up to one interval, and a code block cut
    by a flush is closed in one event and re-opened in the next. A rate limit or a
    retryable failure pauses sending (new output keeps coalescing meanwhile), then the same event is sent
    again with the same transaction id, so the homeserver can drop a duplicate.
    """

    def __init__(
        self,
        room_id: str,
        sender: Sender,
        *,
        interval_s: float = 2.0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.room_id = room_id
        self.stats = Stats()
        self._sender = sender
        self._interval_s = interval_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._sleep = sleep
        self._queue: asyncio.Queue[Item | _Close] = asyncio.Queue()
        self._closing = False
        self._draining = False
        self._closed = asyncio.Event()
        self._prompt_id: str | None = None
        self._markers: dict[str, dict[str, Any]] = {}
        self._pending = ""
        self._reopen = ""
        self._after_block = False
        self._line_since: float | None = None
        self._last_flush = -math.inf
        self._outbox: deque[_Event] = deque()
        self._resume_at = -math.inf
        self._backoff_s = 1.0

    async def put(self, item: Item) -> None:
        if self._closing:
            raise RuntimeError(f"the batcher of {self.room_id} is closed")
        await self._queue.put(item)

    async def close(self) -> None:
        """Flush everything still pending, partial lines included, deliver it, and let run() return.

        Waits for run() (which must be running or be started) to deliver, rate limits and retries included.
        """
        if not self._closing:
            self._closing = True
            await self._queue.put(_Close())
        await self._closed.wait()

    async def run(self) -> None:
        """The room's sending task: returns once close() has been called and everything is delivered."""
        while True:
            while not self._queue.empty():
                self._accept(self._queue.get_nowait())
            now = self._clock()
            deadline: float | None = None
            if self._outbox:
                if now >= self._resume_at:
                    await self._send(self._outbox[0])
                    continue
                deadline = self._resume_at
            elif self._draining:
                break
            elif (due := self._flush_due()) is not None:
                if now >= due:
                    self._flush(now, everything=False)
                    continue
                deadline = due
            item = await self._next_item(None if deadline is None else deadline - now)
            if item is not None:
                self._accept(item)
        self._closed.set()

    async def _next_item(self, timeout: float | None) -> Item | _Close | None:
        """The next queued item, or None when `timeout` seconds pass first."""
        if timeout is None:
            return await self._queue.get()
        getter = asyncio.ensure_future(self._queue.get())
        timer = asyncio.ensure_future(self._sleep(timeout))
        try:
            await asyncio.wait((getter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            getter.cancel()
            timer.cancel()
            await asyncio.gather(getter, timer, return_exceptions=True)
        return None if getter.cancelled() else getter.result()

    def _accept(self, item: Item | _Close) -> None:
        if isinstance(item, _Close):
            self._flush(self._clock(), everything=True)
            self._draining = True
            return
        if item.prompt_id != self._prompt_id:
            self._flush(self._clock(), everything=True)
            self._prompt_id = item.prompt_id
        match item:
            case Begin(marker=marker):
                self._markers[item.prompt_id] = marker
            case Text(text=text):
                if self._after_block and not text.startswith("\n"):
                    text = "\n" + text
                self._pending += text
                self._after_block = False
                if self._pending.endswith("\n"):
                    self._line_since = None
                elif "\n" in text or self._line_since is None:
                    self._line_since = self._clock()
            case Block(markdown=markdown):
                if self._pending and not self._pending.endswith("\n\n"):
                    self._pending += "\n" if self._pending.endswith("\n") else "\n\n"
                self._pending += markdown if markdown.endswith("\n") else markdown + "\n"
                self._after_block = True
                self._line_since = None
            case EndOfRun(final=final):
                self._flush(self._clock(), everything=True, final=final)
                self._markers.pop(item.prompt_id, None)

    def _flush_due(self) -> float | None:
        """When pending output is next due to be flushed; None while there is nothing worth an event."""
        line_start = self._pending.rfind("\n") + 1
        due = self._last_flush + self._interval_s
        if self._pending[:line_start].strip():
            return due
        if self._line_since is None or not self._pending[line_start:].strip():
            return None
        if self._line_since >= due:
            return self._line_since
        return max(due, self._line_since + self._interval_s)

    def _partial_line_goes(self, now: float) -> bool:
        """A partial last line is sent when it has waited a full interval, or at once when it began after
        a quiet interval: the first words of an answer show up without waiting for its first newline."""
        if self._line_since is None:
            return False
        return now >= self._line_since + self._interval_s or self._line_since >= self._last_flush + self._interval_s

    def _flush(self, now: float, *, everything: bool, final: dict[str, Any] | None = None) -> None:
        """Turn pending output into events; mid-run, a partial last line waits up to one interval, and a
        code block still open is closed in this event and re-opened in the next."""
        if everything or self._partial_line_goes(now):
            cut = len(self._pending)
        else:
            cut = self._pending.rfind("\n") + 1
        text, self._pending = self._pending[:cut], self._pending[cut:]
        text = self._fenced(text, close=not everything) if text.strip() else ""
        if text.strip():
            self._emit(text, now, final)
        elif final is not None:
            self._enqueue(render.notice_content("(end of run)", self._marker(final)))
        if everything:
            self._reopen = ""
        if not self._pending:
            self._after_block = False
            self._line_since = None

    def _emit(self, text: str, now: float, final: dict[str, Any] | None = None) -> None:
        """Build the events for `text` now: their contents and transaction ids are final."""
        contents = render.message_contents(text, self._marker())
        if final is not None:
            closing = self._marker(final)
            last = render.with_marker(contents[-1], closing)
            if render.content_size(last) <= render.MAX_CONTENT_BYTES:
                contents[-1] = last
            else:
                contents.append(render.notice_content("(end of run)", closing))
        for content in contents:
            self._enqueue(content)
        self._last_flush = now

    def _marker(self, final: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `org.aiagentchat` marker of the current prompt's events; with `final` for its last one."""
        marker = {"prompt": self._prompt_id, **self._markers.get(self._prompt_id or "", {})}
        return marker if final is None else {**marker, "final": render.bounded_final(final)}

    def _enqueue(self, content: dict[str, Any]) -> None:
        self._outbox.append(_Event(content, uuid.uuid4().hex, render.content_size(content)))

    def _fenced(self, text: str, *, close: bool) -> str:
        """`text` as an event of its own: re-open the code block the previous event closed (unless `text`
        starts by closing it), and close a code block it leaves open when `close`."""
        if self._reopen:
            line_end = text.find("\n") + 1 or len(text)
            if render.fence_left_open(self._reopen + text[:line_end]) is None:
                text = text[line_end:]
            else:
                text = self._reopen + text
        fence = render.fence_left_open(text) if close else None
        self._reopen = fence[0] if fence else ""
        if fence is not None:
            text += fence[1] if text.endswith("\n") else "\n" + fence[1]
        return text

    async def _send(self, event: _Event) -> None:
        outcome = await self._sender.send(self.room_id, event.content, event.txn_id)
        match outcome:
            case Sent():
                self._outbox.popleft()
                self._backoff_s = 1.0
                self.stats.events_sent += 1
                self.stats.bytes_sent += event.size
            case RateLimited(retry_after_s=retry_after_s):
                self.stats.rate_limited += 1
                delay = self._back_off(retry_after_s)
                log.info("rate_limited", room_id=self.room_id, retry_in_s=delay)
            case SendFailed(reason=reason, retryable=True):
                self.stats.send_failures += 1
                delay = self._back_off(None)
                log.warning("send_retrying", room_id=self.room_id, reason=reason, retry_in_s=delay)
            case SendFailed(reason=reason):
                self._outbox.popleft()
                self._backoff_s = 1.0
                self.stats.send_failures += 1
                log.error("send_failed", room_id=self.room_id, reason=reason, bytes=event.size)
                if not event.notice:
                    self._outbox.appendleft(self._refusal_notice(event, reason))

    def _refusal_notice(self, event: _Event, reason: str) -> _Event:
        """What the room sees instead of an event the homeserver refused for good; it keeps the event's
        marker (and so a run's `final`), so a client waiting for the end of a run still sees it."""
        body = f"⚠️ {event.size} bytes of output could not be delivered to this room ({reason})."
        content = render.notice_content(body, event.content.get(render.MARKER_KEY) or {})
        return _Event(content, uuid.uuid4().hex, render.content_size(content), notice=True)

    def _back_off(self, retry_after_s: float | None) -> float:
        """Pause sending: the server's delay, else 1 s doubling per failure; both capped at max_backoff_s."""
        if retry_after_s is None:
            delay = self._backoff_s
            self._backoff_s = min(2 * delay, self._max_backoff_s)
        else:
            delay = retry_after_s
        delay = min(max(delay, 0.0), self._max_backoff_s)
        self._resume_at = self._clock() + delay
        return delay
