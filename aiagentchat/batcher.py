"""Per-room output shaping: coalesce a room's output into few events, split and fence them, mark them, and
hand them to the room's outbox (which sends them in order, durably)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiagentchat import render
from aiagentchat.outbox import (
    LAST_EDIT_KEY,
    REF_KEY,
    UPLOAD_KEY,
    Outbox,
    Stats,
    reaction_content,
    redaction_content,
)
from aiagentchat.presence import Presence, Signals
from aiagentchat.status import ANSWER_INLINE_BYTES, AnswerText, BlockKind, LiveRun, edit_content
from aiagentchat.store import PromptState


@dataclass(frozen=True)
class Text:
    """Streamed agent text; may end mid-line; concatenated as is."""

    prompt_id: str
    text: str


@dataclass(frozen=True)
class Block:
    """A complete Markdown block (tool line, result excerpt, footer, notice); always on its own lines. Its
    `kind` tells a live status what to do with it (see `LiveRun.add_block`)."""

    prompt_id: str
    markdown: str
    kind: BlockKind = ""


@dataclass(frozen=True)
class Begin:
    """A prompt's answer starts: `marker` fields go into the `org.aiagentchat` key of each of its events; with
    `working` (an agent runs it, it is not only refused or dropped), the room sees the bot typing until the
    run's end is delivered and the prompt's ⏳ is taken back; with `thread`, its events go in the thread with
    that root."""

    prompt_id: str
    marker: dict[str, Any]
    working: bool = True
    thread: str | None = None


@dataclass(frozen=True)
class Accepted:
    """A prompt was accepted: it is marked read, and with `queued` (it waits behind another) it gets ⏳."""

    prompt_id: str
    queued: bool = False


@dataclass(frozen=True)
class React:
    """Put `key` on the prompt as its status reaction, taking back the one it had (when the room has
    reactions on); with None, only take that one back. ✋ (waiting for a person's approval) also stops the
    bot typing, and None starts it again."""

    prompt_id: str
    key: str | None


@dataclass(frozen=True)
class Notice:
    """A message that goes out on its own, at once, as a reply: a command's answer, a saved upload, an approval
    request (after what its run has shown so far). With `file`, a file to upload and send after it (a private
    copy, deleted once uploaded); with `ref`, `event_of(ref)` tells its event id once it is sent; with
    `mentions`, it is an `m.text` that mentions (notifies) those users instead of a quiet `m.notice`."""

    reply_to: str
    markdown: str
    marker: dict[str, Any]
    file: Path | None = None
    file_name: str = ""
    mimetype: str = "application/octet-stream"
    ref: str | None = None
    mentions: list[str] = field(default_factory=list)
    thread: str | None = None  # the root of the thread it goes in, if any


@dataclass(frozen=True)
class EndOfRun:
    """The prompt's run ended: everything of it is flushed now, including a partial last line. `final`
    (ok, result, cost...) goes into the marker of the run's last event, so clients know the run is over, and
    `state` is recorded for the prompt together with that event. With `react`, the prompt gets its final
    status reaction, ✅ when `state` is done, else ❌ (when the room has reactions on); without, there is no
    prompt to react to (a notice about no message), and so no state to record."""

    prompt_id: str
    final: dict[str, Any] | None = None
    state: PromptState = "done"
    react: bool = True


Item = Begin | Text | Block | EndOfRun | Accepted | React | Notice
DONE, FAILED, QUEUED, WAITING = "✅", "❌", "⏳", "✋"
STATUS_REACTIONS = (QUEUED, WAITING, "👀")  # the ones taken back when the next comes (👀: shown by older versions)
TRANSCRIPT_TYPE = "text/markdown"
INTERNAL_ERROR = "⚠️ Internal error; this room restarts."  # a room's task failed and its supervisor restarts it
ITEMS_BUFFERED = 1024  # a full queue makes the room's runner wait: back-pressure, and the event loop stays fair


class PendingText:
    """Output waiting for its flush: its complete lines and its partial last line, kept in pieces, so that
    adding text costs its own length however much is waiting (a room held up by a rate limit or an outage
    can gather megabytes)."""

    def __init__(self) -> None:
        self._lines: list[str] = []  # pieces that together end with a newline
        self._partial: list[str] = []  # pieces of the last line, no newline in them
        self.lines_have_text = False  # anything but whitespace in the complete lines
        self.partial_has_text = False
        self._end = ""  # the last two characters

    def __bool__(self) -> bool:
        return bool(self._lines or self._partial)

    def endswith(self, suffix: str) -> bool:
        return self._end.endswith(suffix)

    def add(self, text: str) -> None:
        if not text:
            return
        cut = text.rfind("\n")
        if cut == -1:
            self._partial.append(text)
            self.partial_has_text = self.partial_has_text or not text.isspace()
        else:
            head, rest = text[: cut + 1], text[cut + 1 :]
            self.lines_have_text = self.lines_have_text or self.partial_has_text or not head.isspace()
            self._lines += [*self._partial, head]
            self._partial = [rest] if rest else []
            self.partial_has_text = bool(rest) and not rest.isspace()
        self._end = (self._end + text)[-2:]

    def take(self, *, everything: bool) -> str:
        """The complete lines (and with `everything`, the partial last line too), removed from here."""
        text = "".join(self._lines)
        self._lines, self.lines_have_text = [], False
        if everything:
            text += "".join(self._partial)
            self._partial, self.partial_has_text = [], False
        self._end = "".join(self._partial)[-2:]
        return text


class RunOutput:
    """What one run has shown in the room so far. Up to `limit` bytes go to the room as they come; past it,
    the run's whole output goes to a transcript file (the head kept so far, then everything after it) and
    only its last `tail` bytes are kept in memory, for the room to see at the end with the file."""

    def __init__(self, limit: int, tail: int, transcript: Path) -> None:
        self.limit = limit
        self.tail_size = tail
        self.path = transcript
        self.shown = 0
        self._head: list[str] = []
        self._tail = ""
        self._file: TextIO | None = None
        self.left_out = 0

    @property
    def overflowing(self) -> bool:
        return self._file is not None

    def take(self, text: str) -> str:
        """The part of `text` the room sees now."""
        size = render.utf8_size(text)
        if self._file is None and self.shown + size <= self.limit:
            self.shown += size
            self._head.append(text)
            return text
        if self._file is None:
            shown = _within(text, self.limit - self.shown)
            self.shown += render.utf8_size(shown)
            self._open(shown)
            self._keep(text[len(shown) :])
            newline = "" if shown.endswith("\n") or not shown else "\n"
            return (
                f"{shown}{newline}✂️ This run's output passed {self.limit:,} bytes: the rest stays out of the "
                "room; its end and the whole transcript come when the run ends.\n"
            )
        self._keep(text)
        return ""

    def close(self) -> str:
        """End the transcript; the text that closes the run in the room: what was left out, and the tail."""
        assert self._file is not None
        self._file.close()
        tail = self._tail[self._tail.find("\n") + 1 :] if "\n" in self._tail[:-1] else self._tail
        self.left_out -= render.utf8_size(tail)
        return f"✂️ {self.left_out:,} bytes left out here; the whole output is in the attached file. It ended with:\n\n{tail}"

    def _open(self, shown: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._file.write("".join(self._head) + shown)
        self._head = []

    def _keep(self, text: str) -> None:
        assert self._file is not None
        self._file.write(text)
        self.left_out += render.utf8_size(text)
        self._tail = (self._tail + text)[-self.tail_size :]


def _within(text: str, budget: int) -> str:
    """The longest prefix of `text` within `budget` UTF-8 bytes, cut after a newline where there is one."""
    prefix = text.encode("utf-8")[: max(budget, 0)].decode("utf-8", "ignore")
    return prefix[: prefix.rfind("\n") + 1] or prefix


def file_content(path: Path, mimetype: str = TRANSCRIPT_TYPE, name: str | None = None) -> dict[str, Any]:
    """An `m.file` event for a local file (a run's transcript by default), called `name` in the room; the
    outbox uploads the file before sending the event, then deletes it."""
    return {
        "msgtype": "m.file",
        "body": name or path.name,
        "filename": name or path.name,
        "info": {"mimetype": mimetype, "size": path.stat().st_size},
        "m.mentions": {},
        UPLOAD_KEY: {"path": str(path), "mimetype": mimetype},
    }


def _closed_with(contents: list[dict[str, Any]], closing: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's last events: the last one carries the `closing` marker (with `final`), or a short notice
    after it does when the marker does not fit."""
    last = render.with_marker(contents[-1], closing) if contents else None
    if last is not None and render.content_size(last) <= render.MAX_CONTENT_BYTES:
        return [*contents[:-1], last]
    return [*contents, render.notice_content("(end of run)", closing)]


def relation(reply_to: str, thread: str | None, *, fallback: bool) -> dict[str, Any]:
    """`m.relates_to` of a reply to `reply_to`, in the thread rooted at `thread` if any; with `fallback`, the
    reply is only what clients without threads show (the event continues the thread, it answers nothing)."""
    reply = {"m.in_reply_to": {"event_id": reply_to}}
    if thread is None:
        return reply
    return {"rel_type": "m.thread", "event_id": thread, "is_falling_back": fallback} | reply


def _notice_contents(notice: Notice) -> list[dict[str, Any]]:
    """A notice's events: its text as `m.notice` replies to the event it answers (if any), then its file if
    any."""
    reply = relation(notice.reply_to, notice.thread, fallback=False) if notice.reply_to else {}
    mentions = {"m.mentions": {"user_ids": notice.mentions}, "msgtype": "m.text"} if notice.mentions else {}
    contents = [
        content | {"msgtype": "m.notice"} | ({"m.relates_to": reply} if reply else {}) | mentions
        for content in render.message_contents(notice.markdown, notice.marker)
    ]
    if notice.ref is not None:
        contents[0][REF_KEY] = notice.ref
    if notice.file is not None:
        file = render.with_marker(file_content(notice.file, notice.mimetype, notice.file_name), notice.marker)
        contents.append(file | ({"m.relates_to": reply} if reply else {}))
    return contents


@dataclass(frozen=True)
class _Close:
    """Queued by close(): flush everything, deliver it, then stop."""


class Batcher:
    """Coalesces a room's output into few events and queues them on the room's outbox, in order.

    The first output after a quiet `interval_s` goes out at once, later output at most once per
    `interval_s`; a partial last line waits for its newline for up to one interval, and a code block cut
    by a flush is closed in one event and re-opened in the next. While the outbox is held up (a rate limit,
    an outage) output keeps coalescing, so the room gets fewer, larger events instead of a backlog.

    With `live_status`, a run shows instead one status message, edited in place at most once per interval
    (and only when nothing else waits to be sent), and its answer as one new event at the end.
    """

    def __init__(
        self,
        room_id: str,
        outbox: Outbox,
        *,
        transcripts: Path,
        interval_s: float = 2.0,
        max_run_bytes: int = 200_000,
        tail_bytes: int = 8_000,
        reactions: bool = False,
        live_status: bool = False,
        status_after_s: float = 1.0,
        presence: Signals | None = None,
        tap: Callable[[str, Item], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.room_id = room_id
        self._outbox = outbox
        self._tap = tap  # sees each item as it is put (the control socket's stream); never raises
        self._transcripts = transcripts
        self._max_run_bytes = max_run_bytes
        self._tail_bytes = tail_bytes
        self._reactions = reactions
        self._reacted: dict[str, str] = {}  # prompt id → the ref of its status reaction
        self._runs: dict[str | None, RunOutput] = {}
        self._interval_s = interval_s
        self._clock = clock
        self._sleep = sleep
        self._queue: asyncio.Queue[Item | _Close] = asyncio.Queue(maxsize=ITEMS_BUFFERED)
        self._closing = False
        self._draining = False
        self._closed = asyncio.Event()
        self._prompt_id: str | None = None
        self._markers: dict[str, dict[str, Any]] = {}
        self._threads: dict[str, str] = {}  # prompt id → the root of the thread its run's events go in
        self._live_status = live_status
        self._status_after_s = status_after_s
        self._presence = None if presence is None else Presence(room_id, presence, clock)
        self._working: set[str] = set()  # prompts whose agent works now (not waiting for a person)
        self._live: dict[str, LiveRun] = {}  # with live_status: the runs going on, by prompt id
        self._pending = PendingText()
        self._reopen = ""
        self._after_block = False
        self._line_since: float | None = None
        self._last_flush = -math.inf
        self._built: list[tuple[list[dict[str, Any]], str | None, PromptState | None]] = []

    @property
    def stats(self) -> Stats:
        return self._outbox.stats

    def event_of(self, ref: str) -> str | None:
        """The event id of a sent notice that has this `ref`."""
        return self._outbox.event_of(ref)

    def forget(self, ref: str) -> str | None:
        """Stop tracking a notice's event (it will not be taken back); its event id if it was sent."""
        return self._outbox.forget(ref)

    def backlog(self) -> int:
        """Events not yet delivered (queued in the outbox, or built and about to be)."""
        return self._outbox.size + sum(len(contents) for contents, _, _ in self._built)

    def waiting_since(self) -> float | None:
        """Since when (on the batcher's clock) the outbox's next event has waited; None when none waits."""
        return self._outbox.waiting_since()

    async def put(self, item: Item) -> None:
        if self._closing:
            raise RuntimeError(f"the batcher of {self.room_id} is closed")
        await self._queue.put(item)
        if self._tap is not None:
            self._tap(self.room_id, item)

    async def close(self) -> None:
        """Flush everything still pending, partial lines included, deliver it, and let run() return.

        Waits for run() (which must be running or be started) to deliver, rate limits and retries included.
        """
        if not self._closing:
            self._closing = True
            await self._queue.put(_Close())
        await self._closed.wait()

    async def crashed(self) -> None:
        """After run() failed unexpectedly (its supervisor starts it again, from what the outbox holds): the
        room is told."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(Notice("", INTERNAL_ERROR, {}))

    async def run(self) -> None:
        """The room's sending task: first what an earlier run of the daemon left unsent, then new output;
        returns once close() has been called and everything is delivered."""
        await self._outbox.load()
        while True:
            while not self._queue.empty():
                self._accept(self._queue.get_nowait())
            await self._queue_built()
            now = self._clock()
            presence = self._presence
            signal_at = None if presence is None else presence.due(idle=self._outbox.size == 0)
            if presence is not None and signal_at is not None and now >= signal_at:
                await presence.send()
                continue
            deadline = signal_at
            if (ready_at := self._outbox.ready_at()) is not None:
                if now >= ready_at:
                    await self._outbox.send_next()
                    continue
                deadline = ready_at if deadline is None else min(deadline, ready_at)
            elif self._draining:
                break
            elif (due := self._flush_due()) is not None:
                if now >= due:
                    self._flush(now, everything=False)
                    continue
                deadline = due if deadline is None else min(deadline, due)
            item = await self._next_item(None if deadline is None else deadline - now)
            if item is not None:
                self._accept(item)
        self._closed.set()

    async def _queue_built(self) -> None:
        """Hand the events built since the last call to the outbox, which stores them before sending."""
        built, self._built = self._built, []
        for contents, prompt_id, ended in built:
            await self._outbox.queue(contents, prompt_id, ended)

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
        match item:
            case Accepted(prompt_id=prompt_id, queued=queued):
                if self._presence is not None:
                    self._presence.read(prompt_id)
                if queued:
                    self._react(prompt_id, QUEUED)
                return
            case React(prompt_id=prompt_id, key=key):
                self._react(prompt_id, key)
                if key == WAITING:
                    self._work(prompt_id, False)
                elif key is None:
                    self._work(prompt_id, True)
                return
            case Notice(reply_to=reply_to):
                if reply_to == self._prompt_id and not self._live_status:  # after what its run has shown so far
                    self._flush(self._clock(), everything=True)
                self._built.append((_notice_contents(item), None, None))
                return
        if self._live_status:
            self._accept_live(item)
            return
        if item.prompt_id != self._prompt_id:
            self._flush(self._clock(), everything=True)
            self._prompt_id = item.prompt_id
        match item:
            case Begin(marker=marker, working=working, thread=thread):
                self._markers[item.prompt_id] = marker
                if thread is not None:
                    self._threads[item.prompt_id] = thread
                if working:
                    self._begin_work(item.prompt_id)
            case Text(text=text):
                if self._after_block and not text.startswith("\n"):
                    text = "\n" + text
                self._pending.add(text)
                self._after_block = False
                if self._pending.endswith("\n"):
                    self._line_since = None
                elif "\n" in text or self._line_since is None:
                    self._line_since = self._clock()
            case Block(markdown=markdown):
                if self._pending and not self._pending.endswith("\n\n"):
                    self._pending.add("\n" if self._pending.endswith("\n") else "\n\n")
                self._pending.add(markdown if markdown.endswith("\n") else markdown + "\n")
                self._after_block = True
                self._line_since = None
            case EndOfRun(state=state, react=react):
                self._flush(self._clock(), everything=True, end=item)
                self._markers.pop(item.prompt_id, None)
                self._threads.pop(item.prompt_id, None)
                self._work(item.prompt_id, False)
                if react:
                    self._react(item.prompt_id, DONE if state == "done" else FAILED, final=True)

    def _accept_live(self, item: Begin | Text | Block | EndOfRun) -> None:
        now = self._clock()
        if isinstance(item, Begin):
            run = self._live[item.prompt_id] = self._live_run(item.prompt_id, item.marker, item.thread, now)
            if self._outbox.event_of(status_ref := f"status:{item.prompt_id}") is not None:
                run.ref = status_ref  # shown before a restart: the run's end edits that one
            if item.working:
                self._begin_work(item.prompt_id)
            return
        run = self._live.get(item.prompt_id) or self._live.setdefault(
            item.prompt_id, self._live_run(item.prompt_id, {}, None, now)
        )
        if run.produced is None and not isinstance(item, EndOfRun):
            run.produced = now
        match item:
            case Text(text=text):
                run.add_text(text)
            case Block(markdown=markdown, kind=kind):
                run.add_block(kind, markdown)
            case EndOfRun(final=final, state=state, react=react):
                del self._live[item.prompt_id]
                self._end_live(run, final or {}, state if react else None, now)
                self._work(item.prompt_id, False)
                if react:
                    self._react(item.prompt_id, DONE if state == "done" else FAILED, final=True)

    def _show_status(self, run: LiveRun, now: float, final: dict[str, Any] | None = None) -> None:
        """Build the run's status message, or an edit of it."""
        marker = {"prompt": run.prompt_id, **run.marker, "status": True}
        markdown = run.status(now, final)
        if run.ref is None:
            run.ref = f"status:{run.prompt_id}"
            reply = {"m.relates_to": relation(run.prompt_id, run.thread, fallback=False), "msgtype": "m.notice"}
            contents = [content | reply for content in render.message_contents(markdown, marker)]
            contents[0][REF_KEY] = run.ref
        else:
            contents = [edit_content(markdown, marker, run.ref) | ({LAST_EDIT_KEY: True} if final else {})]
        self._built.append((contents, run.prompt_id, None))
        run.shown_at, run.dirty = now, False

    def _live_run(self, prompt_id: str, marker: dict[str, Any], thread: str | None, now: float) -> LiveRun:
        name = hashlib.sha256(f"{self.room_id} {prompt_id}".encode()).hexdigest()[:16]
        return LiveRun(prompt_id, marker, thread, now, AnswerText(self._transcripts / f"answer-{name}.md"))

    def _end_live(self, run: LiveRun, final: dict[str, Any], state: PromptState | None, now: float) -> None:
        """The run's status shows its footer; its answer goes out as a new event in reply to the prompt (with
        the footer and tool lines under it when the run ended before its status message was due), as a file
        with its beginning inline when too long for one event (the footer inline, under it)."""
        if run.ref is not None:
            self._show_status(run, now, final)
            closing = "" if run.answer.size else run.outcome(final)
        else:
            closing = run.status(now, final, head=not run.answer.size)
        run.answer.close()
        marker = {"prompt": run.prompt_id, **run.marker}
        reply = {"m.relates_to": relation(run.prompt_id, run.thread, fallback=False)}
        attachment = None
        if run.answer.in_file:
            attachment = run.answer.path
            inline = _within(run.answer.head.lstrip("\n"), ANSWER_INLINE_BYTES)
            if (fence := render.fence_left_open(inline)) is not None:
                inline += ("" if inline.endswith("\n") else "\n") + fence[1]
            answer = f"{inline.rstrip()}\n\n📎 The whole answer ({run.answer.size:,} bytes) is in the attached file."
        else:
            answer = run.answer.text().strip("\n")
        if closing:
            answer = f"{answer.rstrip()}\n\n{closing}" if answer.strip() else closing
        contents = [content | reply for content in render.message_contents(answer, marker)]
        if attachment is not None:
            contents.append(render.with_marker(file_content(attachment, name="answer.md"), marker) | reply)
        closing_marker = {**marker, "final": render.bounded_final(final)}
        self._built.append((_closed_with(contents, closing_marker), run.prompt_id, state))

    def _tick_live(self, now: float) -> None:
        for run in self._live.values():
            if (due := run.due(self._interval_s, self._status_after_s)) is not None and now >= due:
                self._show_status(run, now)

    def _begin_work(self, prompt_id: str) -> None:
        self._react(prompt_id, None)
        self._work(prompt_id, True)

    def _work(self, prompt_id: str, working: bool) -> None:
        """Note whether the prompt's agent works now; the room sees the bot typing while any does."""
        if working:
            self._working.add(prompt_id)
        else:
            self._working.discard(prompt_id)
        if self._presence is not None:
            self._presence.working = bool(self._working)

    def _react(self, prompt_id: str, key: str | None, *, final: bool = False) -> None:
        """Give the prompt its new status reaction (none for None) and take back the earlier one (also one shown
        before a restart); a final one stays."""
        if not self._reactions:
            return
        earlier = self._reacted.pop(prompt_id, None) or next(
            (ref for shown in STATUS_REACTIONS if self._outbox.event_of(ref := f"reaction:{prompt_id}:{shown}")), None
        )
        ref = None if final or key is None else f"reaction:{prompt_id}:{key}"
        if ref is not None and ref == earlier:  # shown already, before a restart
            self._reacted[prompt_id] = ref
            return
        contents = [reaction_content(prompt_id, key, ref)] if key is not None else []
        if earlier is not None:
            contents.append(redaction_content(earlier))
        if ref is not None:
            self._reacted[prompt_id] = ref
        if contents:
            self._built.append((contents, None, None))

    def _flush_due(self) -> float | None:
        """When pending output (or a live status) is next due to be flushed; None while there is nothing
        worth an event."""
        due = self._text_due()
        for run in self._live.values():
            if (when := run.due(self._interval_s, self._status_after_s)) is not None and (due is None or when < due):
                due = when
        return due

    def _text_due(self) -> float | None:
        due = self._last_flush + self._interval_s
        if self._pending.lines_have_text:
            return due
        if self._line_since is None or not self._pending.partial_has_text:
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

    def _flush(self, now: float, *, everything: bool, end: EndOfRun | None = None) -> None:
        """Turn pending output into events; mid-run, a partial last line waits up to one interval, and a
        code block still open is closed in this event and re-opened in the next."""
        if self._live_status:
            self._tick_live(now)
            return
        text = self._pending.take(everything=everything or self._partial_line_goes(now))
        text = self._fenced(text, close=not everything) if text.strip() else ""
        run = self._runs.get(self._prompt_id) or self._runs.setdefault(self._prompt_id, self._run_output())
        text = run.take(text) if text.strip() else ""
        attachment = None
        if end is not None:
            del self._runs[self._prompt_id]
            if run.overflowing:
                text += ("\n" if text else "") + run.close()
                attachment = render.with_marker(file_content(run.path), self._marker())
        contents = render.message_contents(text, self._marker()) if text.strip() else []
        if text.strip():
            self._last_flush = now
        if attachment is not None:
            contents.append(attachment)
        if end is not None and end.final is not None:
            contents = _closed_with(contents, self._marker(end.final))
        if (thread := self._threads.get(self._prompt_id or "")) is not None:
            in_thread = relation(self._prompt_id or "", thread, fallback=True)
            contents = [content | {"m.relates_to": in_thread} for content in contents]
        if contents or end is not None:
            self._built.append((contents, self._prompt_id, end.state if end is not None and end.react else None))
        if everything:
            self._reopen = ""
        if not self._pending:
            self._after_block = False
            self._line_since = None

    def _run_output(self) -> RunOutput:
        name = hashlib.sha256(f"{self.room_id} {self._prompt_id}".encode()).hexdigest()[:16]
        return RunOutput(self._max_run_bytes, self._tail_bytes, self._transcripts / f"transcript-{name}.md")

    def _marker(self, final: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `org.aiagentchat` marker of the current prompt's events; with `final` for its last one."""
        marker = {"prompt": self._prompt_id, **self._markers.get(self._prompt_id or "", {})}
        return marker if final is None else {**marker, "final": render.bounded_final(final)}

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
