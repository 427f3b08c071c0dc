"""A flood of Claude Code stream-json output, and the check that a room received all of it, in order.

Each turn of the generated agent streams a message of numbered text lines (`t000000042 ...`, each line in two
`text_delta` events, then the whole `assistant` message as the CLI repeats it), makes one numbered tool call
(`c000000043`) and gets a large tool result whose first line is numbered (`r000000044`). The numbers count up
across everything, so the order of the numbers in the room proves order, no loss and no duplicate; every text
line is compared byte for byte. Tool results are shown as excerpts, so only their first line is checked.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

LINES_PER_MESSAGE = 100
RESULT_BYTES = 64 * 1024
_WORDS = "the quick `brown` fox jumps over a lazy dog while **agents** stream output into rooms".split()
_MARKED = re.compile(r"([tcr])(\d{9})")


def text_line(seq: int) -> str:
    return f"t{seq:09d} {_words(seq % _WORD_CYCLE)}\n"


_WORD_CYCLE = math.lcm(len(_WORDS), 9)  # a line's words depend on its number only modulo this


@functools.cache
def _words(phase: int) -> str:
    """The words of the lines whose number is `phase` modulo _WORD_CYCLE (cached: the verifier builds the
    expected line of every text line it checks, inside the benchmark's measured time)."""
    return " ".join(_WORDS[(phase + i) % len(_WORDS)] for i in range(8 + phase % 9))


def _event(kind: str, **fields: object) -> bytes:
    return json.dumps({"type": kind, **fields, "session_id": "bench"}, ensure_ascii=False).encode() + b"\n"


def _delta(text: str) -> bytes:
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    return _event("stream_event", event=delta)


def _turn(first: int, turn: int) -> tuple[bytes, int]:
    """One turn's stream-json lines starting at number `first`; returns them and the next number."""
    message_id = f"msg_{turn}"
    out = [_event("stream_event", event={"type": "message_start", "message": {"id": message_id}})]
    lines = [text_line(seq) for seq in range(first, first + LINES_PER_MESSAGE)]
    for line in lines:
        out += [_delta(line[:24]), _delta(line[24:])]
    text = "".join(lines)
    out.append(_event("assistant", message={"id": message_id, "content": [{"type": "text", "text": text}]}))
    seq = first + LINES_PER_MESSAGE
    tool_id = f"toolu_{turn}"
    call = {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": f"c{seq:09d} cat log"}}
    out.append(_event("assistant", message={"id": f"{message_id}_tool", "content": [call]}))
    filler = "".join(f"{n:08d} log line of a long tool result\n" for n in range(RESULT_BYTES // 41))
    result = {"type": "tool_result", "tool_use_id": tool_id, "content": f"r{seq + 1:09d} output\n{filler}"}
    out.append(_event("user", message={"role": "user", "content": [result]}))
    return b"".join(out), seq + 2


def write_flood(path: Path, megabytes: float) -> int:
    """Write at least `megabytes` MB of stream-json to `path` (whole turns); returns how many numbers it used."""
    target = megabytes * 1_000_000
    written = turn = seq = 0
    with path.open("wb") as out:
        while written < target:
            chunk, seq = _turn(seq, turn)
            out.write(chunk)
            written += len(chunk)
            turn += 1
    return seq


@dataclass
class Verifier:
    """Reads the room's event bodies in order, holding only the current partial line."""

    expected: int
    text_only: bool = False  # an answer of a live status: the text lines only, tool calls and results left out
    seen: int = 0
    text_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    _partial: str = ""

    def feed(self, body: str) -> None:
        lines = (self._partial + body).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._check(line)

    def _check(self, line: str) -> None:
        match = _MARKED.search(line)
        if match is None:
            return
        kind, seq = match[1], int(match[2])
        if self.text_only and kind != "t":
            return
        if seq != self.seen and len(self.problems) < 10:
            self.problems.append(f"expected number {self.seen}, got {kind}{seq:09d}")
        if kind == "t":
            if line + "\n" != text_line(seq) and len(self.problems) < 10:
                self.problems.append(f"text line {seq} differs: {line[:80]!r}")
            self.text_bytes += len(line.encode()) + 1
        self.seen = seq + 1
        if self.text_only and self.seen % (LINES_PER_MESSAGE + 2) == LINES_PER_MESSAGE:
            self.seen += 2  # the turn's tool call and its result

    def verdict(self) -> str:
        """`ok` when every number arrived once, in order, and every text line was intact; else what went wrong."""
        self.feed("\n")
        if self.seen != self.expected:
            self.problems.append(f"last number {self.seen - 1}, expected {self.expected - 1}")
        return "ok: every line arrived once, in order, intact" if not self.problems else "; ".join(self.problems)
