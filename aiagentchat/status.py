"""A run's live status (`live_status = true`): one message per prompt, edited in place as the agent works,
and the final answer as one new event in reply to the prompt."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from aiagentchat import render
from aiagentchat.outbox import REPLACES_KEY
from aiagentchat.wire import MARKER_KEY

BlockKind = Literal["", "tool", "result", "progress", "footer"]
STATUS_TOOLS = 8  # tool lines shown, most recent first
ACTIVITY_CHARS = 120
REFRESH_S = 30.0  # the elapsed time is brought up to date this often when nothing else changes
ANSWER_INLINE_BYTES = 3_000  # of an answer too long for one event: what is shown above its file
TAIL_CHARS = 2_000  # of an answer kept in memory once it went to its file: enough for its last line


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def _last_line(text: str) -> str:
    line = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    return line if len(line) <= ACTIVITY_CHARS else "…" + line[-(ACTIVITY_CHARS - 1) :]


class AnswerText:
    """A run's answer as it grows: in memory while it fits one event, then in the file `path` (mode 0600), with
    only its beginning and its end kept in memory, so a run writing megabytes holds kilobytes."""

    def __init__(self, path: Path, keep_bytes: int = render.MAX_CHUNK_BYTES) -> None:
        self.path = path
        self._keep_bytes = keep_bytes
        self._parts: list[str] = []
        self._size = 0
        self._file: IO[str] | None = None
        self.head = ""  # once in the file: its first `keep_bytes` or so
        self.tail = ""  # the last TAIL_CHARS characters

    def add(self, text: str) -> None:
        self._size += render.utf8_size(text)
        self.tail = (self.tail + text)[-TAIL_CHARS:]
        if self._file is not None:
            self._file.write(text)
            return
        self._parts.append(text)
        if self._size > self._keep_bytes:
            whole, self._parts = "".join(self._parts), []
            self.head = whole[: self._keep_bytes]
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            self._file = os.fdopen(fd, "w", encoding="utf-8")
            self._file.write(whole)

    @property
    def in_file(self) -> bool:
        return self._file is not None

    @property
    def size(self) -> int:
        """Its UTF-8 bytes."""
        return self._size

    def text(self) -> str:
        """The whole answer (only while it is in memory)."""
        return "".join(self._parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class LiveRun:
    """What one run has done so far, for its status message, and its answer, for the final event."""

    prompt_id: str
    marker: dict[str, Any]
    thread: str | None
    started: float
    answer: AnswerText
    tools: list[str] = field(default_factory=list)
    progress: str = ""  # the latest model retry or stall notice, until the next tool line
    footer: str = ""
    produced: float | None = None  # when the agent first showed something (text, a tool call, a notice)
    ref: str | None = None  # the status message's ref, once it is built
    shown_at: float = 0.0  # when the status was last built
    dirty: bool = True
    _after_block: bool = False

    def add_text(self, text: str) -> None:
        if self._after_block and not text.startswith("\n"):
            text = "\n" + text
        self.answer.add(text)
        self._after_block = False
        self.dirty = True

    def add_block(self, kind: BlockKind, markdown: str) -> None:
        """A tool line or a progress notice goes to the status; a tool's result is left out of the room; anything
        else (a denial, a stop, an error) belongs to the answer."""
        match kind:
            case "tool":
                self.tools.append(markdown.strip())
                self.progress = ""
            case "progress":
                self.progress = markdown.strip()
            case "footer":
                self.footer = markdown.strip()
            case "result":
                return
            case _:
                text = self.answer.tail
                separator = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
                self.answer.add(separator + markdown.strip() + "\n")
                self._after_block = True
        self.dirty = True

    def due(self, interval_s: float, after_s: float) -> float | None:
        """When the status message is next worth building: the first once the agent has shown something and
        the run has lasted `after_s` (a quicker run sends only its answer), then one interval after the last
        once something changed, and every REFRESH_S for the elapsed time."""
        if self.ref is None:
            return None if self.produced is None else max(self.started + after_s, self.produced)
        if self.dirty:
            return self.shown_at + interval_s
        return self.shown_at + REFRESH_S

    def outcome(self, final: dict[str, Any]) -> str:
        """How the run ended, in one line: the footer it reported, else done or the failure."""
        failed = f"❌ {final.get('result') or 'the run ended without a result'}"
        return self.footer or ("✅ Done" if final.get("ok") else failed)

    def status(self, now: float, final: dict[str, Any] | None = None, *, head: bool = True) -> str:
        """The status message's Markdown: what the agent does now and its tool lines, most recent first; at
        the end, the footer instead (without `head`: only the footer the run reported, if any)."""
        if final is not None and not head:
            head_lines = [self.footer] if self.footer else []
        elif final is not None:
            head_lines = [self.outcome(final)]
        else:
            head_lines = [f"👀 **Working** · {_elapsed(now - self.started)}"]
            if self.progress:
                head_lines.append(self.progress)
            elif last := _last_line(self.answer.tail):
                head_lines.append(f"✍️ {last}")
        shown = [f"- {line}" for line in self.tools[::-1][:STATUS_TOOLS]]
        if len(self.tools) > STATUS_TOOLS:
            shown.append(f"- … and {len(self.tools) - STATUS_TOOLS} earlier tool calls")
        return "\n\n".join(head_lines + (["\n".join(shown)] if shown else []))


def edit_content(markdown: str, marker: dict[str, Any], replaces: str) -> dict[str, Any]:
    """An `m.replace` edit of the status message named `replaces` (a ref the outbox resolves)."""
    (new,) = render.message_contents(markdown, {})[:1]
    new = {key: value for key, value in new.items() if key != MARKER_KEY} | {"msgtype": "m.notice"}
    return {
        "msgtype": "m.notice",
        "body": f"* {new['body']}",
        "format": new["format"],
        "formatted_body": f"* {new['formatted_body']}",
        "m.new_content": new,
        "m.mentions": {},
        MARKER_KEY: marker,
        REPLACES_KEY: replaces,
    }
