"""The benchmark's own logic (no timings): distributions, the in-order check of a flood, and the `drip` script."""

import json
import subprocess
import sys
from pathlib import Path

from bench.stats import Distribution
from bench.streamgen import LINES_PER_MESSAGE, Verifier, text_line, write_flood
from tests.harness.model_server import Parsed, numbered_lines, script_answer

FAKE = Path(__file__).parent / "fakes" / "fake_claude.py"


def test_distribution_uses_the_nearest_rank_for_p95() -> None:
    summary = Distribution.of([float(n) for n in range(1, 21)])
    assert (summary.n, summary.median, summary.p95, summary.low, summary.high) == (20, 10.5, 19.0, 1.0, 20.0)


def _room_text(numbers: int) -> str:
    """What a room shows for a flood, with tool lines and excerpts in between, as one string."""
    shapes = [lambda seq: f"🔧 Bash: `c{seq:09d} cat log`\n", lambda seq: f"```\nr{seq:09d} output\n```\n", text_line]
    return "".join(shapes[seq % 3](seq) for seq in range(numbers))


def test_the_verifier_accepts_the_room_text_however_it_is_cut_into_events() -> None:
    text = _room_text(50)
    verifier = Verifier(50)
    for start in range(0, len(text), 37):
        verifier.feed(text[start : start + 37])
    assert verifier.verdict().startswith("ok")


def test_the_verifier_reports_a_lost_a_duplicated_and_a_changed_line() -> None:
    lines = _room_text(10).splitlines(keepends=True)
    at = next(n for n, line in enumerate(lines) if line.startswith("t"))
    changed = lines[:at] + [lines[at].replace(" ", "  ", 1)] + lines[at + 1 :]
    for broken in (lines[:at] + lines[at + 1 :], lines[: at + 1] + lines[at:], changed):
        verifier = Verifier(10)
        verifier.feed("".join(broken))
        assert not verifier.verdict().startswith("ok")


def test_the_text_only_verifier_checks_an_answer_without_its_tool_calls_and_results() -> None:
    numbers = 3 * (LINES_PER_MESSAGE + 2)
    text = [text_line(seq) for seq in range(numbers) if seq % (LINES_PER_MESSAGE + 2) < LINES_PER_MESSAGE]
    verifier = Verifier(numbers, text_only=True)
    verifier.feed("".join(text) + "✅ Done\n\n- 🔧 Bash: `c000000304 cat log`")
    assert verifier.verdict().startswith("ok")
    for broken in (text[:150] + text[151:], text[:-1]):
        verifier = Verifier(numbers, text_only=True)
        verifier.feed("".join(broken))
        assert not verifier.verdict().startswith("ok")


def test_a_flood_is_stream_json_whose_numbers_count_up(tmp_path: Path) -> None:
    path = tmp_path / "flood.jsonl"
    numbers = write_flood(path, 0.3)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert numbers % 102 == 0 and path.stat().st_size >= 300_000
    assert {event["type"] for event in events} == {"stream_event", "assistant", "user"}


def test_the_model_server_drips_numbered_lines() -> None:
    answer = script_answer(Parsed(latest_user_text="drip 3 250"))
    assert answer.blocks[0].chunks == numbered_lines(3) and answer.blocks[0].delay == 0.25


def test_the_fake_cli_drips_and_floods(tmp_path: Path) -> None:
    flood = tmp_path / "flood.jsonl"
    flood.write_text(json.dumps({"type": "system", "subtype": "flooded"}) + "\n")
    texts = ("drip 2 0", f"flood {flood}")
    prompts = [{"type": "user", "message": {"role": "user", "content": text}} for text in texts]
    stdin = "".join(json.dumps(prompt) + "\n" for prompt in prompts)
    out = subprocess.run([sys.executable, str(FAKE)], input=stdin, capture_output=True, text=True, check=True).stdout
    events = [json.loads(line) for line in out.splitlines()]
    deltas = [e["event"]["delta"]["text"] for e in events if e.get("event", {}).get("type") == "content_block_delta"]
    assert deltas == numbered_lines(2)
    assert {"type": "system", "subtype": "flooded"} in events
    assert [e["type"] for e in events].count("result") == 2


def test_an_answers_events_are_its_messages_edits_reactions_and_their_redactions() -> None:
    from bench.quiet import answer_events

    bot, marker = "@bot:x", "org.aiagentchat"

    def event(event_id: str, kind: str, content: dict, sender: str = bot, **extra: str) -> dict:
        return {"event_id": event_id, "type": kind, "sender": sender, "content": content, **extra}

    def reaction(event_id: str, target: str, key: str) -> dict:
        return event(
            event_id, "m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}
        )

    events = [
        event("$p", "m.room.message", {"body": "say hi"}, sender="@you:x"),
        reaction("$wait", "$p", "⏳"),
        event("$gone", "m.room.redaction", {}, redacts="$wait"),
        event("$status", "m.room.message", {"body": "…", marker: {"prompt": "$p", "status": True}}),
        event("$answer", "m.room.message", {"body": "hi", marker: {"prompt": "$p", "final": {"ok": True}}}),
        reaction("$done", "$p", "✅"),
        reaction("$theirs", "$p", "👍") | {"sender": "@you:x"},
        event("$other", "m.room.message", {"body": "x", marker: {"prompt": "$q"}}),
        reaction("$done-q", "$q", "✅"),
        event("$gone-q", "m.room.redaction", {"redacts": "$done-q"}),
    ]
    assert answer_events(events, bot, "$p") == 5
    assert answer_events(events, bot, "$q") == 3
