"""A run's live status (`live_status = true`): one message per prompt, edited in place as the agent works,
and the final answer as one new event in reply to the prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from aiagentchat import render
from aiagentchat.outbox import REPLACES_KEY

BlockKind = Literal["", "tool", "result", "progress", "footer"]
STATUS_TOOLS = 8  # tool lines shown, most recent first
ACTIVITY_CHARS = 120
REFRESH_S = 30.0  # the elapsed time is brought up to date this often when nothing else changes
ANSWER_INLINE_BYTES = 3_000  # of an answer too long for one event: what is shown above its file


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def _last_line(text: str) -> str:
    line = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    return line if len(line) <= ACTIVITY_CHARS else "…" + line[-(ACTIVITY_CHARS - 1) :]


@dataclass
class LiveRun:
    """What one run has done so far, for its status message, and its answer, for the final event."""

    prompt_id: str
    marker: dict[str, Any]
    thread: str | None
    started: float
    answer: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    progress: str = ""  # the latest model retry or stall notice, until the next tool line
    footer: str = ""
    ref: str | None = None  # the status message's ref, once it is built
    shown_at: float = 0.0  # when the status was last built
    dirty: bool = True
    _after_block: bool = False

    def add_text(self, text: str) -> None:
        if self._after_block and not text.startswith("\n"):
            text = "\n" + text
        self.answer.append(text)
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
                text = self.text()
                separator = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
                self.answer.append(separator + markdown.strip() + "\n")
                self._after_block = True
        self.dirty = True

    def text(self) -> str:
        return "".join(self.answer)

    def due(self, interval_s: float) -> float | None:
        """When the status message is next worth building: one interval after the last, once something
        changed (the first one interval after the run began), and every REFRESH_S for the elapsed time."""
        if self.ref is None or self.dirty:
            return (self.shown_at or self.started) + interval_s
        return self.shown_at + REFRESH_S

    def status(self, now: float, final: dict[str, Any] | None = None) -> str:
        """The status message's Markdown: what the agent does now and its tool lines, most recent first; at
        the end, the footer instead."""
        if final is not None:
            failed = f"❌ {final.get('result') or 'the run ended without a result'}"
            head = [self.footer or ("✅ Done" if final.get("ok") else failed)]
        else:
            head = [f"👀 **Working** · {_elapsed(now - self.started)}"]
            if self.progress:
                head.append(self.progress)
            elif last := _last_line(self.text()):
                head.append(f"✍️ {last}")
        shown = [f"- {line}" for line in self.tools[::-1][:STATUS_TOOLS]]
        if len(self.tools) > STATUS_TOOLS:
            shown.append(f"- … and {len(self.tools) - STATUS_TOOLS} earlier tool calls")
        return "\n\n".join(head + (["\n".join(shown)] if shown else []))


def edit_content(markdown: str, marker: dict[str, Any], replaces: str) -> dict[str, Any]:
    """An `m.replace` edit of the status message named `replaces` (a ref the outbox resolves)."""
    (new,) = render.message_contents(markdown, {})[:1]
    new = {key: value for key, value in new.items() if key != render.MARKER_KEY} | {"msgtype": "m.notice"}
    return {
        "msgtype": "m.notice",
        "body": f"* {new['body']}",
        "format": new["format"],
        "formatted_body": f"* {new['formatted_body']}",
        "m.new_content": new,
        "m.mentions": {},
        render.MARKER_KEY: marker,
        REPLACES_KEY: replaces,
    }
