import asyncio
import json

import pytest

from aiagentchat import protocol
from aiagentchat.batcher import Block, Text
from aiagentchat.protocol import (
    OverlongLine,
    Translator,
    code_span,
    parse_line,
    read_lines,
    result_excerpt,
    tool_summary,
)

pytestmark = pytest.mark.anyio


async def collect(data: bytes, max_line: int = 1 << 30, chunk: int = 7):
    stream = asyncio.StreamReader()
    for start in range(0, len(data), chunk):
        stream.feed_data(data[start : start + chunk])
    stream.feed_eof()
    return [line async for lines in read_lines(stream, max_line=max_line) for line in lines]


async def test_lines_split_across_reads_and_a_last_line_without_newline(monkeypatch):
    monkeypatch.setattr(protocol, "READ_CHUNK", 3)
    assert await collect(b'{"a":1}\n\nabc\n{"b":2}') == [b'{"a":1}', b"", b"abc", b'{"b":2}']


async def test_lines_of_megabytes_are_whole():
    big = json.dumps({"type": "user", "text": "é" * 3_000_000}).encode()
    lines = await collect(big + b"\nnext\n", chunk=65536)
    assert lines == [big, b"next"]


@pytest.mark.parametrize("read_size", [7, 1 << 20])
async def test_an_overlong_line_is_skipped_and_reading_goes_on(read_size, monkeypatch):
    monkeypatch.setattr(protocol, "READ_CHUNK", read_size)
    lines = await collect(data=b"short\n" + b"x" * 100 + b"\nafter\n" + b"y" * 50, max_line=20)
    assert lines == [b"short", OverlongLine(100), b"after", OverlongLine(50)]


def test_parse_line_tolerates_garbage():
    assert parse_line(b'{"type": "x"}') == {"type": "x"}
    assert parse_line(b"not json") is None
    assert parse_line(b"[1, 2]") is None
    assert parse_line(b"\xff\xfe") is None


async def test_the_lines_of_one_read_come_as_one_batch(monkeypatch):
    monkeypatch.setattr(protocol, "READ_CHUNK", 20)
    stream = asyncio.StreamReader()
    stream.feed_data(b'{"a":1}\n{"b":2}\n{"c":3}\n')
    stream.feed_eof()
    assert [lines async for lines in read_lines(stream)] == [[b'{"a":1}', b'{"b":2}'], [b'{"c":3}']]


def test_parse_line_keeps_what_the_standard_library_reads():
    assert parse_line(b'{"n": 123456789012345678901234567890, "f": 0.1}') == {
        "n": 123456789012345678901234567890,
        "f": 0.1,
    }
    assert parse_line(b'{"s": "\\ud800"}') == {"s": "\ud800"}  # a lone surrogate
    assert parse_line(b'{"x": NaN, "y": 1e400}') == {"x": pytest.approx(float("nan"), nan_ok=True), "y": float("inf")}


def feed_all(translator: Translator, *events):
    items = []
    for event in events:
        items += translator.feed(event)
    return items


def delta(text):
    return {"type": "stream_event", "event": {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}}}


def start(message_id):
    return {"type": "stream_event", "event": {"type": "message_start", "message": {"id": message_id}}}


def test_streamed_text_then_tool_then_result():
    t = Translator("$p")
    items = feed_all(
        t,
        {"type": "system", "subtype": "init", "session_id": "S1"},
        start("m1"),
        delta("Let me "),
        delta("check."),
        {"type": "assistant", "message": {"id": "m1", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "pytest -q\nmore"}},
        ]}},
        {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1", "content": "3 passed"}]}},
        start("m2"),
        delta("All green."),
        {"type": "assistant", "message": {"id": "m2", "content": [{"type": "text", "text": "All green."}]}},
        {"type": "rate_limit_event", "whatever": 1},
        {"type": "result", "subtype": "success", "is_error": False, "result": "All green.", "session_id": "S1",
         "duration_ms": 4200, "num_turns": 2, "total_cost_usd": 0.05},
    )
    assert items == [
        Text("$p", "Let me "),
        Text("$p", "check."),
        Block("$p", "🔧 Bash: `pytest -q`", "tool"),
        Block("$p", "```\n3 passed\n```", "result"),
        Text("$p", "\n\n"),
        Text("$p", "All green."),
        Block("$p", "✅ Done · 4.2 s · 2 turns · $0.0500", "footer"),
    ]
    assert t.session_id == "S1"
    assert t.result.is_error is False


def test_unstreamed_assistant_text_is_shown():
    items = Translator("$p").feed({"type": "assistant", "message": {"id": "m", "content": [{"type": "text", "text": "hi"}]}})
    assert items == [Text("$p", "hi")]


def test_error_result_and_api_retry():
    t = Translator("$p")
    retry = t.feed({"type": "system", "subtype": "api_retry", "attempt": 3, "max_retries": 10, "retry_delay_ms": 4000, "error_status": 529})
    assert retry == [Block("$p", "⏳ Model API 529; retry 3/10 in 4 s", "progress")]
    error = t.feed({"type": "result", "subtype": "success", "is_error": True, "result": "API Error: 400 bad"})
    assert error == [Block("$p", "❌ The agent reported an error: API Error: 400 bad", "footer")]
    assert t.result.is_error


def test_tool_summaries():
    assert tool_summary("Write", {"file_path": "/w/a.py", "content": "x"}) == "🔧 Write: `/w/a.py`"
    assert tool_summary("TodoWrite", {"todos": [1, 2]}) == "🔧 TodoWrite: `2 items`"
    assert tool_summary("Mystery", {}) == "🔧 Mystery"
    assert tool_summary("Bash", {"command": "echo `x`"}) == "🔧 Bash: `` echo `x` ``"
    assert len(tool_summary("Bash", {"command": "y" * 1000})) < 200


def test_code_span_and_excerpt_survive_backticks():
    assert code_span("a``b") == "```a``b```"
    excerpt = result_excerpt("```\ninside\n```\n" + "\n".join(f"l{i}" for i in range(20)), is_error=True)
    assert excerpt.startswith("⚠️ tool error\n````\n```")
    assert excerpt.endswith("… 17 more lines")
    assert result_excerpt("", is_error=False) == "(no output)"


def test_a_runs_cost_is_what_its_process_cost_since_the_turns_before() -> None:
    result = {"type": "result", "subtype": "success", "is_error": False, "result": "ok", "num_turns": 1}
    first = Translator("$p")
    first.feed(result | {"total_cost_usd": 0.25})
    later = Translator("$q", process_cost_before=0.25)
    items = later.feed(result | {"total_cost_usd": 0.75})
    assert first.result is not None and first.result.cost_usd == 0.25
    assert later.result is not None and later.result.cost_usd == 0.5
    assert items[-1].markdown.endswith("$0.5000")
