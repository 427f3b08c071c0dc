"""The Claude Code CLI's stream-json protocol: reading its lines and turning its events into room output."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from aiagentchat.batcher import Block, Item, Text

MAX_LINE_BYTES = 32 * 1024 * 1024
READ_CHUNK = 256 * 1024
EXCERPT_LINES = 6
EXCERPT_CHARS = 600
SUMMARY_CHARS = 160


@dataclass(frozen=True)
class OverlongLine:
    """A line longer than the reader keeps; only its size is known."""

    size: int


async def read_lines(
    stream: asyncio.StreamReader, max_line: int = MAX_LINE_BYTES
) -> AsyncIterator[list[bytes | OverlongLine]]:
    """Yield, for each read, the lines it completed (without the newline), of any length up to `max_line`
    bytes, in bounded memory.

    A longer line is skipped and reported as an OverlongLine; a last line without a newline is still
    yielded at end of stream.
    """
    pending = bytearray()
    skipping = 0
    while chunk := await stream.read(READ_CHUNK):
        lines: list[bytes | OverlongLine] = chunk.split(b"\n")
        rest = lines.pop()
        if lines:
            size = skipping + len(pending) + len(lines[0])
            if size > max_line:
                lines[0] = OverlongLine(size)
            elif pending:
                lines[0] = bytes(pending + lines[0])
            for index in range(1, len(lines)):
                if len(lines[index]) > max_line:
                    lines[index] = OverlongLine(len(lines[index]))
            skipping = 0
            pending.clear()
            yield lines
        if skipping:
            skipping += len(rest)
        elif len(pending) + len(rest) > max_line:
            skipping = len(pending) + len(rest)
            pending.clear()
        else:
            pending += rest
    if skipping:
        yield [OverlongLine(skipping)]
    elif pending:
        yield [bytes(pending)]


_decode = msgspec.json.Decoder().decode


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One stdout line as a JSON object, or None for anything else (blank, garbage, a bare value)."""
    try:
        value = _decode(line)
    except msgspec.DecodeError:  # also what only the standard library reads: NaN, 1e400, a lone surrogate
        try:
            value = json.loads(line)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class RunResult:
    is_error: bool
    text: str
    session_id: str | None
    duration_ms: int | None
    num_turns: int | None
    cost_usd: float | None
    subtype: str


def run_summary(result: RunResult | None, failure: str | None = None) -> dict[str, Any]:
    """What a client needs to know about a finished run (the `final` marker of its last event)."""
    if result is None or failure is not None:
        return {"ok": False, "result": failure or "the run ended without a result", "cost_usd": None,
                "duration_ms": None, "num_turns": None, "session_id": result.session_id if result else None}
    return {"ok": not result.is_error, "result": result.text, "cost_usd": result.cost_usd,
            "duration_ms": result.duration_ms, "num_turns": result.num_turns, "session_id": result.session_id}


def code_span(text: str) -> str:
    """Inline code that survives any backticks inside `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_block(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def _shorten(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SUMMARY_KEYS = ("command", "file_path", "notebook_path", "path", "pattern", "url", "query", "description")


def tool_summary(name: str, tool_input: Any) -> str:
    """One line saying what a tool call does, e.g. 🔧 Bash: `pytest -q`."""
    detail = ""
    if isinstance(tool_input, dict):
        for key in _SUMMARY_KEYS:
            if isinstance(tool_input.get(key), str) and tool_input[key].strip():
                detail = tool_input[key].strip().splitlines()[0]
                break
        else:
            if isinstance(tool_input.get("todos"), list):
                detail = f"{len(tool_input['todos'])} items"
            elif tool_input:
                detail = json.dumps(tool_input, ensure_ascii=False)
    summary = f"🔧 {name}"
    return f"{summary}: {code_span(_shorten(detail, SUMMARY_CHARS))}" if detail else summary


def result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def result_excerpt(text: str, is_error: bool) -> str:
    lines = text.strip("\n").splitlines()
    shown = "\n".join(lines[:EXCERPT_LINES])
    if len(shown) > EXCERPT_CHARS:
        shown = shown[:EXCERPT_CHARS] + "…"
    more = len(lines) - EXCERPT_LINES
    parts = ["⚠️ tool error" if is_error else ""]
    if shown:
        parts.append(code_block(shown))
    else:
        parts.append("(no output)")
    if more > 0:
        parts.append(f"… {more} more lines")
    return "\n".join(part for part in parts if part)


def footer(result: RunResult) -> str:
    parts = []
    if result.duration_ms is not None:
        parts.append(f"{result.duration_ms / 1000:.1f} s")
    if result.num_turns is not None:
        parts.append(f"{result.num_turns} turn{'s' if result.num_turns != 1 else ''}")
    if result.cost_usd is not None:
        parts.append(f"${result.cost_usd:.4f}")
    stats = " · ".join(parts)
    if result.is_error:
        reason = _shorten(result.text, 500) or result.subtype
        return f"❌ The agent reported an error: {reason}" + (f" ({stats})" if stats else "")
    return f"✅ Done · {stats}" if stats else "✅ Done"


@dataclass
class Translator:
    """Turns the CLI's events for one prompt into room output items."""

    prompt_id: str
    process_cost_before: float = 0.0  # what the CLI process had cost before this run (its earlier turns)
    session_id: str | None = None
    result: RunResult | None = None
    _message_id: str | None = None
    _streamed: set[str] = field(default_factory=set)
    _tools: dict[str, str] = field(default_factory=dict)
    _wrote_text: bool = False

    def feed(self, event: dict[str, Any]) -> list[Item]:
        kind = event.get("type")
        if isinstance(event.get("session_id"), str):
            self.session_id = event["session_id"]
        if kind == "stream_event":
            return self._stream_event(event.get("event") or {})
        if kind == "assistant":
            return self._assistant(event.get("message") or {})
        if kind == "user":
            return self._user(event.get("message") or {})
        if kind == "system" and event.get("subtype") == "api_retry":
            status = event.get("error_status") or "error"
            delay = (event.get("retry_delay_ms") or 0) / 1000
            return [
                Block(
                    self.prompt_id,
                    f"⏳ Model API {status}; retry {event.get('attempt')}/{event.get('max_retries')} "
                    f"in {delay:.0f} s",
                    "progress",
                )
            ]
        if kind == "result":
            return self._result(event)
        return []

    def _text(self, text: str) -> list[Item]:
        if not text:
            return []
        self._wrote_text = True
        return [Text(self.prompt_id, text)]

    def _stream_event(self, event: dict[str, Any]) -> list[Item]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self._message_id = message.get("id")
            if self._wrote_text:
                self._wrote_text = False
                return [Text(self.prompt_id, "\n\n")]
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                if self._message_id:
                    self._streamed.add(self._message_id)
                return self._text(delta["text"])
        return []

    def _assistant(self, message: dict[str, Any]) -> list[Item]:
        items: list[Item] = []
        streamed = message.get("id") in self._streamed
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and not streamed:
                items += self._text(str(block.get("text", "")))
            elif block.get("type") == "tool_use":
                name = str(block.get("name", "tool"))
                self._tools[str(block.get("id"))] = name
                items.append(Block(self.prompt_id, tool_summary(name, block.get("input")), "tool"))
        return items

    def _user(self, message: dict[str, Any]) -> list[Item]:
        content = message.get("content")
        if not isinstance(content, list):
            return []
        return [
            Block(
                self.prompt_id,
                result_excerpt(result_text(block.get("content")), bool(block.get("is_error"))),
                "result",
            )
            for block in content
            if isinstance(block, dict) and block.get("type") == "tool_result"
        ]

    def _result(self, event: dict[str, Any]) -> list[Item]:
        self.result = RunResult(
            is_error=bool(event.get("is_error")),
            text=str(event.get("result") or ""),
            session_id=event.get("session_id") or self.session_id,
            duration_ms=event.get("duration_ms"),
            num_turns=event.get("num_turns"),
            cost_usd=self._run_cost(event.get("total_cost_usd")),
            subtype=str(event.get("subtype") or ""),
        )
        return [Block(self.prompt_id, footer(self.result), "footer")]

    def _run_cost(self, total: Any) -> float | None:
        """This run's cost: the CLI reports what its process has cost so far, over all its turns."""
        if not isinstance(total, (int, float)):
            return None
        return max(total - self.process_cost_before, 0.0)
