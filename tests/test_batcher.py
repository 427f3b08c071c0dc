"""The batcher against a fake sender and fake time: coalescing, timing, 429 back-off, ordering, closing."""

import asyncio
import random
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from aiagentchat.batcher import (
    WAITING,
    Accepted,
    Batcher,
    Begin,
    Block,
    EndOfRun,
    Item,
    Notice,
    PendingText,
    React,
    Text,
)
from aiagentchat import outbox
from aiagentchat.outbox import Outbox, RateLimited, SendFailed, SendOutcome, Sent, redaction_content
from aiagentchat.render import MAX_CHUNK_BYTES, MAX_CONTENT_BYTES, content_size
from aiagentchat.status import TAIL_CHARS, AnswerText
from aiagentchat.store import Store

pytestmark = pytest.mark.anyio
ROOM = "!room:example.org"
REAL_SECONDS_BEFORE_GIVING_UP = 5


@dataclass(frozen=True)
class Call:
    room_id: str
    content: dict[str, Any]
    txn_id: str
    at: float
    event_type: str = "m.room.message"

    @property
    def body(self) -> str:
        return self.content["body"]

    @property
    def prompt(self) -> str:
        return self.content["org.aiagentchat"]["prompt"]


class FakeRoom:
    """A fake clock, sleep and sender for one batcher. Time moves only when a test moves it: by `advance`,
    or in `until`, which jumps to the batcher's next wake-up whenever the batcher waits for one."""

    def __init__(self, *outcomes: SendOutcome) -> None:
        self.now = 0.0
        self.calls: list[Call] = []
        self.uploads: list[tuple[str, str, str]] = []
        self.outcomes = list(outcomes)
        self.signals: list[tuple[str, float, int]] = []  # typing and receipts: what, when, after how many events
        self.typing_works: list[bool] = []  # the outcomes of the next typing requests (then: True)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._generation = 0
        self._progress = asyncio.Event()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> asyncio.Future[None]:
        """Registers the wake-up as soon as the batcher asks for it, before it awaits it."""
        sleeper = (self.now + seconds, self._generation, asyncio.get_running_loop().create_future())
        self._sleepers.append(sleeper)
        sleeper[2].add_done_callback(lambda _: self._sleepers.remove(sleeper))
        self._progress.set()
        return sleeper[2]

    async def send(
        self, room_id: str, content: dict[str, Any], txn_id: str, event_type: str = "m.room.message"
    ) -> SendOutcome:
        self.calls.append(Call(room_id, content, txn_id, self.now, event_type))
        self._progress.set()
        return self.outcomes.pop(0) if self.outcomes else Sent(f"$event{len(self.calls)}")

    async def redact(self, room_id: str, event_id: str, txn_id: str) -> SendOutcome:
        return await self.send(room_id, {"redacts": event_id}, txn_id, "m.room.redaction")

    async def upload(self, room_id: str, path: Path, mimetype: str) -> dict[str, Any]:
        self.uploads.append((path.name, mimetype, path.read_text()))
        return {"url": f"mxc://example.org/{len(self.uploads)}"}

    async def typing(self, room_id: str, typing: bool, timeout_ms: int) -> bool:
        self.signals.append((f"typing {'on' if typing else 'off'} {timeout_ms}", self.now, len(self.calls)))
        self._progress.set()
        return self.typing_works.pop(0) if self.typing_works else True

    async def receipt(self, room_id: str, event_id: str) -> bool:
        self.signals.append((f"read {event_id}", self.now, len(self.calls)))
        self._progress.set()
        return True

    async def put(self, batcher: Batcher, *items: Item) -> None:
        """Hand items to the batcher; a wake-up it asked for before seeing them no longer counts."""
        self._generation += 1
        for item in items:
            await batcher.put(item)

    def nudge(self, _task: object = None) -> None:
        """Make `until` look at its condition again."""
        self._progress.set()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, _, future in self._sleepers:
            if deadline <= self.now and not future.done():
                future.set_result(None)

    def waiting_until(self) -> float | None:
        """When the batcher will wake up, if it has seen every item and now waits for fake time."""
        deadlines = [d for d, g, future in self._sleepers if g == self._generation and not future.done()]
        return min(deadlines, default=None)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Let the batcher run, moving fake time to each wake-up it waits for, until `condition` holds; a
        few real seconds at most, so that a broken batcher fails the test instead of hanging it."""
        async with asyncio.timeout(REAL_SECONDS_BEFORE_GIVING_UP):
            while True:
                self._progress.clear()
                if condition():
                    return
                deadline = self.waiting_until()
                if deadline is None:
                    await self._progress.wait()
                else:
                    self.advance(deadline - self.now)

    async def settled(self) -> None:
        """Wait until the batcher has taken in everything put and waits for fake time to pass."""
        await self.until(lambda: self.waiting_until() is not None)

    def bodies(self, calls: list[Call] | None = None) -> list[str]:
        return [call.body for call in (self.calls if calls is None else calls)]


@asynccontextmanager
async def a_batcher(room: FakeRoom, max_backoff_s: float = 60.0, **options: Any) -> AsyncIterator[Batcher]:
    """A batcher sending to `room` through a real outbox (SQLite in a temporary folder), without jitter."""
    with tempfile.TemporaryDirectory() as folder:
        store = await Store.open(Path(folder) / "db.sqlite")
        try:
            outbox = Outbox(ROOM, room, store, max_backoff_s=max_backoff_s, clock=room.clock, jitter=lambda d: d)
            transcripts = Path(folder) / "transcripts"
            yield Batcher(ROOM, outbox, transcripts=transcripts, clock=room.clock, sleep=room.sleep, **options)
        finally:
            await store.close()


@asynccontextmanager
async def running(room: FakeRoom, **options: Any) -> AsyncIterator[Batcher]:
    async with a_batcher(room, **options) as batcher:
        task = asyncio.create_task(batcher.run())
        try:
            yield batcher
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def close(room: FakeRoom, batcher: Batcher) -> None:
    closing: asyncio.Task[None] = asyncio.create_task(batcher.close())
    closing.add_done_callback(room.nudge)
    await room.until(closing.done)
    await closing


async def test_first_output_goes_out_at_once() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "hello\n"))
        await room.until(lambda: len(room.calls) == 1)
    call = room.calls[0]
    assert (call.room_id, call.body, call.prompt, call.at) == (ROOM, "hello\n", "$p", 0.0)
    assert call.content["m.mentions"] == {}
    assert re.fullmatch("[0-9a-f]{32}", call.txn_id)


async def test_output_within_one_interval_becomes_one_event() -> None:
    room = FakeRoom()
    pieces = ["Let ", "me ", "look.\n", "Found ", "it.\n"]
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "Start.\n"))
        await room.until(lambda: len(room.calls) == 1)
        for piece in pieces:
            room.advance(0.3)
            await room.put(batcher, Text("$p", piece))
            await room.settled()
        await room.until(lambda: len(room.calls) == 2)
        assert room.bodies() == ["Start.\n", "".join(pieces)]
        assert [call.at for call in room.calls] == [0.0, 2.0]


async def test_the_first_words_go_out_at_once_even_mid_line() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "Let me "))
        await room.until(lambda: len(room.calls) == 1)
    assert room.bodies() == ["Let me "]
    assert room.calls[0].at == 0.0


async def test_a_partial_line_waits_for_its_newline_until_the_run_ends() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "intro\n"))
        await room.until(lambda: len(room.calls) == 1)
        room.advance(0.5)
        await room.put(batcher, Text("$p", "first line\nsecond li"))
        await room.until(lambda: len(room.calls) == 2)
        room.advance(0.3)
        await room.put(batcher, Text("$p", "ne"), EndOfRun("$p"))
        await room.until(lambda: len(room.calls) == 3)
    assert room.bodies() == ["intro\n", "first line\n", "second line"]
    assert [call.at for call in room.calls] == [0.0, 2.0, 2.3]


async def test_a_partial_line_goes_out_once_held_for_an_interval() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "Let me "))
        await room.until(lambda: len(room.calls) == 1)
        room.advance(0.5)
        await room.put(batcher, Text("$p", "check.\n"))
        await room.until(lambda: len(room.calls) == 2)
        await room.put(batcher, Text("$p", "Thinking"))
        await room.until(lambda: len(room.calls) == 3)
    assert room.bodies() == ["Let me ", "check.\n", "Thinking"]
    assert [call.at for call in room.calls] == [0.0, 2.0, 4.0]


async def test_a_code_block_cut_by_a_flush_is_closed_and_reopened() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "Here:\n```python\nx = 1\n"))
        await room.until(lambda: len(room.calls) == 1)
        room.advance(0.5)
        await room.put(batcher, Text("$p", "y = 2\n```\nDone.\n"))
        await room.until(lambda: len(room.calls) == 2)
        await room.put(batcher, Text("$p", "More.\n"))
        await room.until(lambda: len(room.calls) == 3)
    assert room.bodies() == ["Here:\n```python\nx = 1\n```\n", "```python\ny = 2\n```\nDone.\n", "More.\n"]
    assert '<code class="language-python">y = 2\n</code>' in room.calls[1].content["formatted_body"]


async def test_a_code_block_closed_just_after_a_flush_is_not_reopened() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "intro\n"))
        await room.until(lambda: len(room.calls) == 1)
        room.advance(0.5)
        await room.put(batcher, Text("$p", "```python\nx = 1\n```"))
        await room.until(lambda: len(room.calls) == 2)
        room.advance(0.2)
        await room.put(batcher, Text("$p", "\nDone.\n"))
        await room.until(lambda: len(room.calls) == 3)
    assert room.bodies() == ["intro\n", "```python\nx = 1\n```\n", "Done.\n"]


async def test_a_code_block_closed_by_otherwise_blank_output_sends_nothing_more() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "intro\n"))
        await room.until(lambda: len(room.calls) == 1)
        room.advance(0.5)
        await room.put(batcher, Text("$p", "```python\nx = 1\n```"))
        await room.until(lambda: len(room.calls) == 2)
        await room.put(batcher, Text("$p", "\n\n"), EndOfRun("$p"), Text("$q", "next\n"))
        await room.until(lambda: len(room.calls) == 3)
    assert room.bodies() == ["intro\n", "```python\nx = 1\n```\n", "next\n"]


async def test_a_code_block_left_open_by_a_run_is_not_reopened_for_the_next() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$a", "```python\nx = 1\n"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Text("$a", "\n"), EndOfRun("$a"), Text("$b", "hello\n"))
        await room.until(lambda: len(room.calls) == 2)
    assert room.bodies() == ["```python\nx = 1\n```\n", "hello\n"]


async def test_text_after_a_block_sent_on_its_own_starts_its_event_plainly() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Block("$p", "🔧 Bash: `ls`"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Text("$p", "Listed.\n"))
        await room.until(lambda: len(room.calls) == 2)
    assert room.bodies() == ["🔧 Bash: `ls`\n", "Listed.\n"]


@pytest.mark.parametrize(
    ("steps", "complete", "partial"),
    [
        ([(0.1, "ab"), (1.4, "c\nde")], "abc\n", "de"),
        ([(0.1, "x\n"), (1.4, "de")], "x\n", "de"),
    ],
)
async def test_a_partial_line_is_held_from_when_it_began(
    steps: list[tuple[float, str]], complete: str, partial: str
) -> None:
    room = FakeRoom(RateLimited(retry_after_s=3.0))
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "first\n"))
        await room.until(lambda: len(room.calls) == 1)
        for delay, text in steps:
            room.advance(delay)
            await room.put(batcher, Text("$p", text))
            await room.settled()
        await room.until(lambda: len(room.calls) == 4)
    after_the_wait = [(call.body, call.at) for call in room.calls[1:]]
    assert after_the_wait == [("first\n", 3.0), (complete, 3.0), (partial, 5.0)]


async def test_a_rate_limited_event_is_resent_unchanged_after_the_wait() -> None:
    room = FakeRoom(RateLimited(retry_after_s=3.0))
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "one\n"))
        await room.until(lambda: len(room.calls) == 1)
        room.advance(1.0)
        await room.put(batcher, Text("$p", "two\n"))
        await room.settled()
        room.advance(1.0)
        await room.put(batcher, Text("$p", "three\n"))
        await room.settled()
        assert len(room.calls) == 1
        await room.until(lambda: len(room.calls) == 3)
        first, retry, second = room.calls
        assert retry.at - first.at >= 3.0
        assert (retry.txn_id, retry.content) == (first.txn_id, first.content)
        assert second.txn_id != first.txn_id
        assert "".join(room.bodies([retry, second])) == "one\ntwo\nthree\n"
        assert (batcher.stats.events_sent, batcher.stats.rate_limited) == (2, 1)
        assert batcher.stats.bytes_sent == content_size(retry.content) + content_size(second.content)


async def test_the_first_rate_limit_of_the_process_says_where_the_exemption_is_explained(monkeypatch) -> None:
    monkeypatch.setattr(outbox, "_rate_limit_explained", False)
    room = FakeRoom(RateLimited(1.0), RateLimited(1.0), Sent("$1"), RateLimited(1.0))
    with capture_logs() as logs:
        async with running(room) as batcher:
            await room.put(batcher, Text("$p", "one\n"))
            await room.until(lambda: len(room.calls) == 3)
            await room.put(batcher, Text("$p", "two\n"))
            await room.until(lambda: len(room.calls) == 5)
    limited = [entry for entry in logs if entry["event"] == "rate_limited"]
    assert len(limited) == 2 and [entry.get("help") for entry in limited] == [outbox.RATE_LIMIT_HELP, None]
    assert "README.md#rate-limits" in outbox.RATE_LIMIT_HELP


async def test_without_retry_after_the_back_off_doubles_up_to_the_cap() -> None:
    room = FakeRoom(*[RateLimited(retry_after_s=None)] * 4, RateLimited(retry_after_s=600.0))
    async with running(room, max_backoff_s=5.0) as batcher:
        await room.put(batcher, Text("$p", "hello\n"))
        await room.until(lambda: len(room.calls) == 6)
    times = [call.at for call in room.calls]
    assert [later - earlier for earlier, later in zip(times, times[1:])] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert len({call.txn_id for call in room.calls}) == 1


async def test_the_back_off_starts_again_from_one_second_after_a_success() -> None:
    room = FakeRoom(RateLimited(None), RateLimited(None), Sent("$one"), RateLimited(None))
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "one\n"))
        await room.until(lambda: len(room.calls) == 3)
        await room.put(batcher, Text("$p", "two\n"))
        await room.until(lambda: len(room.calls) == 5)
    assert [(call.body, call.at) for call in room.calls] == [
        ("one\n", 0.0),
        ("one\n", 1.0),
        ("one\n", 3.0),
        ("two\n", 3.0),
        ("two\n", 4.0),
    ]


async def test_a_retryable_failure_is_retried_with_the_same_transaction_id() -> None:
    room = FakeRoom(SendFailed("TimeoutError", retryable=True), SendFailed("502", retryable=True))
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "hello\n"))
        await room.until(lambda: len(room.calls) == 3)
        assert [call.at for call in room.calls] == [0.0, 1.0, 3.0]
        assert len({(call.txn_id, call.body) for call in room.calls}) == 1
        assert (batcher.stats.events_sent, batcher.stats.send_failures) == (1, 2)


async def test_a_refused_event_is_replaced_by_a_notice_that_keeps_the_run_final() -> None:
    refused = SendFailed("M_BAD_JSON: Bad JSON value", retryable=False)
    room = FakeRoom(refused, Sent("$1"), refused, refused)
    final = {"ok": True, "result": "done"}
    with capture_logs() as logs:
        async with running(room) as batcher:
            await room.put(batcher, Begin("$p", {"hops": 1}), Text("$p", "lost\n"), EndOfRun("$p", final))
            await room.until(lambda: len(room.calls) == 2)
            await room.put(batcher, Text("$q", "kept too\n"))
            await room.until(lambda: len(room.calls) == 4)
            await room.put(batcher, Text("$r", "after\n"))
            await room.until(lambda: len(room.calls) == 5)
    lost, notice, kept, notice_refused, after = room.calls
    assert notice.content["msgtype"] == "m.notice" and notice.content["m.mentions"] == {}
    assert (
        notice.body
        == f"⚠️ {content_size(lost.content)} bytes of output could not be delivered to this room (M_BAD_JSON: Bad JSON value)."
    )
    assert notice.content["org.aiagentchat"] == {"prompt": "$p", "hops": 1, "final": final}
    assert notice.txn_id != lost.txn_id
    assert notice_refused.content["msgtype"] == "m.notice" and kept.body == "kept too\n"
    assert after.body == "after\n"
    failures = [entry["reason"] for entry in logs if entry["event"] == "send_failed"]
    assert failures == ["M_BAD_JSON: Bad JSON value"] * 3


async def test_no_float_ever_reaches_an_event() -> None:
    room = FakeRoom()
    final = {"ok": True, "cost_usd": 9.999999999999999e-05, "parts": [0.5, 2]}
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "done\n"), EndOfRun("$p", final))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, EndOfRun("$p", final))
        await room.until(lambda: len(room.calls) == 2)
    markers = [call.content["org.aiagentchat"]["final"] for call in room.calls]
    assert markers == [{"ok": True, "cost_usd": "0.00009999999999999999", "parts": ["0.5", 2]}] * 2
    assert float(markers[0]["cost_usd"]) == final["cost_usd"]
    assert room.calls[1].body == "(end of run)"


async def test_two_prompts_never_share_an_event() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(
            batcher,
            Text("$a", "alpha\n"),
            Text("$a", "half a line"),
            Text("$b", "beta\n"),
            Block("$b", "✅ Done"),
            EndOfRun("$b"),
        )
        await room.until(lambda: len(room.calls) == 2)
    assert [(call.prompt, call.body) for call in room.calls] == [
        ("$a", "alpha\nhalf a line"),
        ("$b", "beta\n\n✅ Done\n"),
    ]


async def test_blocks_stand_on_their_own_lines() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(
            batcher,
            Text("$p", "Let me check."),
            Block("$p", "🔧 Bash: `pytest -q`"),
            Block("$p", "```\n3 passed\n```"),
            Text("$p", "All green."),
            EndOfRun("$p"),
        )
        await room.until(lambda: len(room.calls) == 1)
    assert room.calls[0].body == "Let me check.\n\n🔧 Bash: `pytest -q`\n\n```\n3 passed\n```\n\nAll green."
    assert "<p>Let me check.</p>" in room.calls[0].content["formatted_body"]
    assert "<p>All green.</p>" in room.calls[0].content["formatted_body"]


async def test_blank_output_never_becomes_an_event() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", "answer\n"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Text("$p", "\n\n"), EndOfRun("$p"), Text("$q", "next\n"))
        await room.until(lambda: len(room.calls) == 2)
    assert room.bodies() == ["answer\n", "next\n"]


async def test_large_output_is_split_into_events_that_fit() -> None:
    room = FakeRoom()
    text = "".join(f"{i:05} ✓ some output, 漢字 and <tags> & more\n" for i in range(4_500))
    assert len(text.encode()) > 200_000
    async with running(room, max_run_bytes=len(text.encode())) as batcher:
        await room.put(batcher, *(Text("$p", text[i : i + 777]) for i in range(0, len(text), 777)))
        await room.put(batcher, EndOfRun("$p"))
        await close(room, batcher)
    assert len(room.calls) > 10
    assert all(content_size(call.content) <= MAX_CONTENT_BYTES for call in room.calls)
    assert all(len(call.body.encode()) <= MAX_CHUNK_BYTES for call in room.calls)
    assert "".join(room.bodies()) == text
    assert batcher.stats.events_sent == len(room.calls)


async def test_close_delivers_everything_pending_then_ends_run() -> None:
    room = FakeRoom(RateLimited(retry_after_s=3.0))
    async with a_batcher(room) as batcher, asyncio.TaskGroup() as group:
        run = group.create_task(batcher.run())
        await room.put(batcher, Text("$p", "done\n"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Text("$p", "and a partial"))
        await close(room, batcher)
        assert run.done()
    assert room.bodies() == ["done\n", "done\n", "and a partial"]
    assert [call.at for call in room.calls] == [0.0, 3.0, 3.0]
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.put(Text("$p", "too late\n"))


async def test_run_markers_carry_hops_and_the_final_summary_on_the_last_event() -> None:
    room = FakeRoom()
    final = {"ok": True, "result": "done", "cost_usd": "0.01"}
    async with running(room) as batcher:
        await room.put(batcher, Begin("$p", {"hops": 2}), Text("$p", "working\n"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Block("$p", "✅ Done"), EndOfRun("$p", final))
        await room.until(lambda: len(room.calls) == 2)
        await room.put(batcher, Text("$q", "next\n"))
        await room.until(lambda: len(room.calls) == 3)
    markers = [call.content["org.aiagentchat"] for call in room.calls]
    assert markers == [
        {"prompt": "$p", "hops": 2},
        {"prompt": "$p", "hops": 2, "final": final},
        {"prompt": "$q"},
    ]


async def test_a_huge_final_result_never_makes_an_event_too_large() -> None:
    room = FakeRoom()
    answer = "é word\n" * 15_000
    final = {"ok": True, "result": answer, "cost_usd": 0.5}
    async with running(room) as batcher:
        await room.put(batcher, Text("$p", answer), Block("$p", "✅ Done"), EndOfRun("$p", final))
        await room.until(lambda: any("final" in call.content["org.aiagentchat"] for call in room.calls))
    assert all(content_size(call.content) <= MAX_CONTENT_BYTES for call in room.calls)
    assert "".join(body for body in room.bodies() if body != "(end of run)") == answer + "\n✅ Done\n"
    closing = room.calls[-1].content["org.aiagentchat"]["final"]
    assert closing["result_truncated"] is True and closing["cost_usd"] == "0.5"
    assert answer.startswith(closing["result"]) and len(closing["result"]) > 1000
    assert [i for i, call in enumerate(room.calls) if "final" in call.content["org.aiagentchat"]] == [
        len(room.calls) - 1
    ]


async def test_past_the_output_cap_the_room_gets_the_head_the_tail_and_the_whole_transcript() -> None:
    room = FakeRoom()
    lines = [f"line {i:02} " + "x" * 30 + "\n" for i in range(50)]  # 39 bytes each: 25 lines fit in 1,000
    final = {"ok": True, "result": "done"}
    async with running(room, max_run_bytes=1_000, tail_bytes=100) as batcher:
        await room.put(batcher, Begin("$p", {"hops": 1}), *(Text("$p", line) for line in lines[:10]))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, *(Text("$p", line) for line in lines[10:]), Block("$p", "✅ Done"))
        await room.put(batcher, EndOfRun("$p", final))
        await room.until(lambda: any("final" in call.content["org.aiagentchat"] for call in room.calls))
        transcripts = list(batcher._transcripts.iterdir())
    *texts, attachment = room.calls
    output = "".join(lines) + "\n✅ Done\n"
    tail = "".join(lines[48:]) + "\n✅ Done\n"
    left_out = len(output.encode()) - len("".join(lines[:25]).encode()) - len(tail.encode())
    assert (
        "".join(room.bodies(texts))
        == "".join(lines[:25])
        + (
            "✂️ This run's output passed 1,000 bytes: the rest stays out of the room; its end and the whole "
            "transcript come when the run ends.\n"
            f"\n✂️ {left_out:,} bytes left out here; the whole output is in the attached file. It ended with:\n\n"
        )
        + tail
    )
    assert texts[0].body == "".join(lines[:10])
    assert attachment.content["msgtype"] == "m.file" and attachment.content["url"] == "mxc://example.org/1"
    assert "org.aiagentchat.upload" not in attachment.content
    assert attachment.content["org.aiagentchat"] == {"prompt": "$p", "hops": 1, "final": final}
    ((name, mimetype, text),) = room.uploads
    assert name == attachment.content["body"] and mimetype == "text/markdown"
    assert text == output
    assert transcripts == [], "the transcript file is removed once uploaded"


@pytest.mark.parametrize("seed", range(20))
def test_pending_text_agrees_with_a_plain_string(seed: int) -> None:
    """PendingText keeps pieces instead of one growing string; what it reports must be what the string says."""
    rng = random.Random(seed)
    pending, plain = PendingText(), ""
    for _ in range(200):
        if rng.random() < 0.8:
            text = "".join(rng.choice(["a", " ", "\n", "\n\n", "word", "  \n"]) for _ in range(rng.randrange(6)))
            pending.add(text)
            plain += text
        else:
            everything = rng.random() < 0.3
            cut = len(plain) if everything else plain.rfind("\n") + 1
            assert pending.take(everything=everything) == plain[:cut]
            plain = plain[cut:]
        line_start = plain.rfind("\n") + 1
        assert bool(pending) == bool(plain)
        assert pending.lines_have_text == bool(plain[:line_start].strip())
        assert pending.partial_has_text == bool(plain[line_start:].strip())
        for suffix in ("\n", "\n\n"):
            assert pending.endswith(suffix) == plain.endswith(suffix)


def kinds(calls: list[Call]) -> list[str]:
    """Each call as its type and, for reactions, key; for redactions, the event taken back."""
    described = []
    for call in calls:
        if call.event_type == "m.reaction":
            described.append(
                f"react {call.content['m.relates_to']['key']} to {call.content['m.relates_to']['event_id']}"
            )
        elif call.event_type == "m.room.redaction":
            described.append(f"redact {call.content['redacts']}")
        else:
            described.append(call.content["msgtype"])
    return described


async def test_a_prompt_gets_one_status_reaction_at_a_time_and_a_final_one() -> None:
    room = FakeRoom()
    async with running(room, reactions=True) as batcher:
        await room.put(batcher, Accepted("$p", queued=True), Begin("$p", {}), Text("$p", "hi\n"))
        await room.put(batcher, EndOfRun("$p", {"ok": True}), Accepted("$q"), Begin("$q", {}))
        await room.put(batcher, React("$q", WAITING), React("$q", None), EndOfRun("$q", {"ok": False}, "failed"))
        await room.until(lambda: len(room.calls) == 8)
        await close(room, batcher)
    assert kinds(room.calls) == [
        "react ⏳ to $p",  # it waited behind another
        "redact $event1",  # the ⏳, once it runs
        "m.text",
        "react ✅ to $p",  # a prompt that did not wait gets only its end
        "react ✋ to $q",  # waiting for a person's approval
        "redact $event5",
        "m.notice",  # "(end of run)": the failed run said nothing
        "react ❌ to $q",
    ]
    for call in room.calls:
        if call.event_type != "m.room.message":
            assert not any(key.startswith("org.aiagentchat") for key in call.content)


async def test_without_reactions_a_run_sends_only_its_messages() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Accepted("$p", queued=True), Begin("$p", {}), Text("$p", "hi\n"))
        await room.put(batcher, React("$p", WAITING), React("$p", None), EndOfRun("$p", {"ok": True}))
        await close(room, batcher)
    assert kinds(room.calls) == ["m.text"]


async def test_a_notice_goes_out_at_once_mid_run_as_a_reply_and_leaves_the_run_alone(tmp_path: Path) -> None:
    room = FakeRoom()
    file = tmp_path / "copy"
    file.write_text("file body")
    async with running(room) as batcher:
        await room.put(batcher, Begin("$p", {}), Text("$p", "first\n"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Text("$p", "half a li"), Notice("$cmd", "**status**", {"command": "$cmd"}))
        await room.until(lambda: len(room.calls) == 2)
        notice = room.calls[1]
        assert notice.at == room.calls[0].at  # at once, not after the flush interval
        assert notice.content["msgtype"] == "m.notice" and notice.body == "**status**"
        assert "<strong>status</strong>" in notice.content["formatted_body"]
        assert notice.content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}
        assert notice.content["org.aiagentchat"] == {"command": "$cmd"}
        await room.put(batcher, Text("$p", "ne\n"), EndOfRun("$p", {"ok": True}))
        await room.put(batcher, Notice("$get", "📄 `a.txt`", {"command": "$get"}, file, "a.txt", "text/plain"))
        await room.until(lambda: len(room.calls) == 5)
    assert room.calls[2].body == "half a line\n"  # the partial line waited for its run, whole
    assert room.calls[3].body == "📄 `a.txt`"
    sent_file = room.calls[4]
    assert sent_file.content["msgtype"] == "m.file" and sent_file.content["filename"] == "a.txt"
    assert sent_file.content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$get"}}
    assert room.uploads == [("copy", "text/plain", "file body")] and not file.exists()


async def test_after_a_restart_the_end_of_a_run_edits_its_status_and_takes_back_its_reaction(tmp_path: Path) -> None:
    room = FakeRoom()
    store = await Store.open(tmp_path / "db.sqlite")

    def a_daemons_batcher() -> Batcher:
        outbox = Outbox(ROOM, room, store, clock=room.clock, jitter=lambda d: d)
        options = {"reactions": True, "live_status": True, "clock": room.clock, "sleep": room.sleep}
        return Batcher(ROOM, outbox, transcripts=tmp_path, **options)

    try:
        first = a_daemons_batcher()
        task = asyncio.create_task(first.run())
        await room.put(first, Accepted("$p", queued=True), Begin("$p", {}), Text("$p", "half way"))
        await room.until(lambda: len(room.calls) == 3)  # ⏳ on the prompt, taken back, then its status
        await room.put(first, React("$p", WAITING))
        await room.until(lambda: len(room.calls) == 4)
        await room.settled()  # and all recorded as delivered
        task.cancel()  # the daemon dies
        await asyncio.gather(task, return_exceptions=True)

        second = a_daemons_batcher()
        task = asyncio.create_task(second.run())
        interrupted = EndOfRun("$p", {"ok": False, "result": "interrupted"}, "interrupted")
        await room.put(second, Begin("$p", {}), Block("$p", "⚠️ Interrupted by a restart."), interrupted)
        await room.until(lambda: len(room.calls) == 8)
        await close(room, second)
        await asyncio.gather(task, return_exceptions=True)
        assert await store.refs(ROOM) == {}
    finally:
        await store.close()
    before = ["react ⏳ to $p", "redact $event1", "m.notice", "react ✋ to $p"]
    assert kinds(room.calls) == [*before, "redact $event4", "m.notice", "m.text", "react ❌ to $p"]
    edit = room.calls[5]
    assert edit.content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$event3"}
    assert edit.content["m.new_content"]["body"] == "❌ interrupted"
    assert room.calls[6].body == "⚠️ Interrupted by a restart."


async def test_a_redaction_of_an_event_never_sent_is_dropped(tmp_path: Path) -> None:
    room = FakeRoom()
    store = await Store.open(tmp_path / "db.sqlite")
    try:
        outbox = Outbox(ROOM, room, store, clock=room.clock)
        await outbox.queue([redaction_content("never-sent-here"), {"msgtype": "m.text", "body": "next"}], None)
        while outbox.ready_at() is not None:
            await outbox.send_next()
        assert kinds(room.calls) == ["m.text"] and await store.outbox(ROOM) == []
    finally:
        await store.close()


async def test_a_request_about_the_running_prompt_follows_its_output_notifies_and_can_be_found() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Begin("$p", {}), Text("$p", "working on it, half a li"))
        request = Notice("$p", "🔐 **Approval needed**", {"approval": "k"}, ref="approval:k", mentions=["@u:x"])
        await room.put(batcher, request)
        await room.until(lambda: batcher.event_of("approval:k") is not None)
        assert batcher.event_of("approval:k") == "$event2"
        assert batcher.forget("approval:k") == "$event2" and batcher.event_of("approval:k") is None
        await close(room, batcher)
    output, asked = room.calls[0], room.calls[1]
    assert output.body == "working on it, half a li"  # flushed first, partial line and all
    assert asked.content["msgtype"] == "m.text" and asked.content["m.mentions"] == {"user_ids": ["@u:x"]}
    assert asked.content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$p"}}
    assert "org.aiagentchat.ref" not in asked.content


async def test_in_a_thread_a_runs_events_continue_it_and_a_notice_replies_inside_it() -> None:
    room = FakeRoom()
    async with running(room) as batcher:
        await room.put(batcher, Begin("$p", {}, thread="$root"), Text("$p", "first\n"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Notice("$p", "🔐 asked", {"approval": "k"}, thread="$root"))
        await room.put(batcher, Text("$p", "last\n"), EndOfRun("$p", {"ok": True}))
        await room.put(batcher, Notice("$cmd", "status", {"command": "$cmd"}))
        await close(room, batcher)
    messages = [call for call in room.calls if call.event_type == "m.room.message"]
    assert [m.body for m in messages] == ["first\n", "🔐 asked", "last\n", "status"]
    continuing = {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$p"},
    }
    assert messages[0].content["m.relates_to"] == messages[2].content["m.relates_to"] == continuing
    assert messages[1].content["m.relates_to"] == continuing | {"is_falling_back": False}
    assert messages[3].content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}


async def test_a_live_status_is_one_message_edited_in_place_and_the_answer_one_new_reply() -> None:
    room = FakeRoom()
    final = {"ok": True, "result": "all done"}
    async with running(room, live_status=True, interval_s=1.0) as batcher:
        await room.put(batcher, Begin("$p", {"hops": 1}), Text("$p", "Let me look"))
        await room.settled()
        assert room.calls == []  # nothing before the status is due
        await room.until(lambda: len(room.calls) == 1)
        assert room.now == 1.0
        for n in range(3):
            await room.put(batcher, Block("$p", f"🔧 Bash: `step {n}`", "tool"), Block("$p", "```\nok\n```", "result"))
            await room.until(lambda: len(room.calls) == 2 + n)
        await room.put(batcher, Text("$p", " and here is the answer.\n"), Block("$p", "✅ Done · 4.0 s", "footer"))
        await room.put(batcher, EndOfRun("$p", final))
        await room.until(lambda: len(room.calls) == 6)
    status, *edits, answer = room.calls
    assert status.content["msgtype"] == "m.notice" and "👀 **Working** · 1 s" in status.body
    assert "✍️ Let me look" in status.body
    assert status.content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$p"}}
    assert status.content["org.aiagentchat"] == {"prompt": "$p", "hops": 1, "status": True}
    assert len(edits) == 4
    for edit in edits:
        assert edit.content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$event1"}
        assert edit.body.startswith("* ") and edit.content["m.new_content"]["body"] == edit.body[2:]
    assert edits[2].content["m.new_content"]["body"].split("\n\n")[-1] == (
        "- 🔧 Bash: `step 2`\n- 🔧 Bash: `step 1`\n- 🔧 Bash: `step 0`"
    )
    assert edits[-1].body.startswith("* ✅ Done · 4.0 s") and "```" not in "".join(e.body for e in edits)
    assert answer.content["msgtype"] == "m.text" and answer.body == "Let me look and here is the answer."
    assert answer.content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$p"}}
    assert answer.content["org.aiagentchat"]["final"]["ok"] is True
    assert not any(key.startswith("org.aiagentchat.") for call in room.calls for key in call.content)


async def test_a_run_over_before_its_status_was_due_is_one_answer_with_its_footer() -> None:
    room = FakeRoom()
    async with running(room, live_status=True) as batcher:
        items = [Begin("$p", {}), Text("$p", "quick"), Block("$p", "🔧 Read: `a`", "tool")]
        await room.put(batcher, *items, Block("$p", "✅ Done · 0.3 s", "footer"), EndOfRun("$p", {"ok": True}))
        await room.until(lambda: len(room.calls) == 1)
        await close(room, batcher)
    (answer,) = room.calls
    assert answer.body == "quick\n\n✅ Done · 0.3 s\n\n- 🔧 Read: `a`"
    assert "final" in answer.content["org.aiagentchat"]


async def test_a_refused_prompt_in_live_mode_is_answered_once_without_a_second_failure_line() -> None:
    room = FakeRoom()
    async with running(room, live_status=True) as batcher:
        items = [Begin("$p", {}, working=False), Block("$p", "⛔ Not run: busy.")]
        await room.put(batcher, *items, EndOfRun("$p", {"ok": False, "result": "busy"}, "refused"))
        await room.until(lambda: len(room.calls) == 1)
        await close(room, batcher)
    (answer,) = room.calls
    assert answer.body == "⛔ Not run: busy."
    assert answer.content["org.aiagentchat"]["final"]["ok"] is False


def test_a_long_live_answer_is_kept_in_its_file_with_only_its_ends_in_memory(tmp_path: Path) -> None:
    answer = AnswerText(tmp_path / "answer.md", keep_bytes=1_000)
    pieces = [f"word{n} " + ("\n" if n % 10 == 9 else "") for n in range(100_000)]
    for piece in pieces:
        answer.add(piece)
    answer.close()
    whole = "".join(pieces)
    assert answer.in_file and answer.size == len(whole.encode())
    assert answer.text() == "" and answer.head == whole[:1_000] and answer.tail == whole[-TAIL_CHARS:]
    assert (tmp_path / "answer.md").read_text() == whole
    assert (tmp_path / "answer.md").stat().st_mode & 0o777 == 0o600


async def test_a_live_answer_too_long_for_the_room_comes_as_a_file_with_its_first_lines() -> None:
    room = FakeRoom()
    lines = "".join(f"line {n:05d} " + "x" * 90 + "\n" for n in range(300))
    async with running(room, live_status=True) as batcher:
        answer = [Begin("$p", {}), Text("$p", "```\n" + lines + "```\n"), Block("$p", "✅ Done · 0.4 s", "footer")]
        await room.put(batcher, *answer, EndOfRun("$p", {"ok": True}))
        await room.until(lambda: len(room.calls) == 2)
    inline, attached = room.calls
    assert inline.body.startswith("```\nline 00000 ") and "line 00299" not in inline.body
    ((name, mimetype, uploaded),) = room.uploads
    assert name.startswith("answer-") and mimetype == "text/markdown"
    assert uploaded == "```\n" + lines + "```\n"
    assert inline.body.endswith(  # the footer of a run too quick for a status message stays in sight
        f"```\n\n📎 The whole answer ({len(uploaded.encode()):,} bytes) is in the attached file.\n\n✅ Done · 0.4 s"
    )
    assert attached.content["msgtype"] == "m.file" and attached.content["filename"] == "answer.md"
    assert attached.content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$p"}}
    assert "final" in attached.content["org.aiagentchat"]


async def test_an_edit_of_an_event_never_sent_is_dropped(tmp_path: Path) -> None:
    room = FakeRoom()
    store = await Store.open(tmp_path / "db.sqlite")
    try:
        outbox = Outbox(ROOM, room, store, clock=room.clock)
        edit = {"msgtype": "m.notice", "body": "* new", "org.aiagentchat.replaces": "status:gone"}
        await outbox.queue([edit, {"msgtype": "m.text", "body": "next"}], None)
        while outbox.ready_at() is not None:
            await outbox.send_next()
        assert room.bodies() == ["next"] and await store.outbox(ROOM) == []
    finally:
        await store.close()


async def test_the_bot_marks_a_prompt_read_and_types_while_its_agent_works_until_the_answer_is_delivered() -> None:
    room = FakeRoom(RateLimited(3.0))
    async with running(room, presence=room, live_status=True) as batcher:
        await room.put(batcher, Accepted("$p"), Begin("$p", {}))
        await room.until(lambda: len(room.signals) == 2)
        assert room.signals == [("read $p", 0.0, 0), ("typing on 30000", 0.0, 0)]
        await room.until(lambda: len(room.signals) == 3)
        assert room.signals[2] == ("typing on 30000", 20.0, 0)  # refreshed before the homeserver's timeout
        await room.put(batcher, React("$p", WAITING))  # waiting for a person is not working
        await room.until(lambda: len(room.signals) == 4)
        await room.put(batcher, React("$p", None))
        await room.until(lambda: len(room.signals) == 5)
        await room.put(batcher, Text("$p", "the answer"), EndOfRun("$p", {"ok": True}))
        await room.until(lambda: len(room.signals) == 6)
        assert [call.body for call in room.calls] == ["the answer", "the answer"]  # rate limited, then sent
    assert [what for what, _, _ in room.signals[3:]] == ["typing off 30000", "typing on 30000", "typing off 30000"]
    assert room.signals[-1][1:] == (23.0, 2)  # typing ended only once the answer was delivered


async def test_a_failed_typing_request_is_tried_again_and_a_refused_prompt_is_not_worked_on() -> None:
    room = FakeRoom()
    room.typing_works = [False]
    async with running(room, presence=room) as batcher:
        await room.put(batcher, Begin("$r", {}, working=False), EndOfRun("$r", {"ok": False}, "refused"))
        await room.until(lambda: len(room.calls) == 1)
        await room.put(batcher, Begin("$p", {}))
        await room.until(lambda: len(room.signals) == 2)
    assert room.signals == [("typing on 30000", 0.0, 1), ("typing on 30000", 5.0, 1)]


async def test_a_live_status_appears_once_the_run_has_lasted_status_after_s_and_shown_something() -> None:
    room = FakeRoom()
    async with running(room, live_status=True, interval_s=2.0, status_after_s=1.0) as batcher:
        await room.put(batcher, Begin("$p", {}), Text("$p", "First words"))
        await room.until(lambda: len(room.calls) == 1)
        assert room.calls[0].at == 1.0 and "✍️ First words" in room.calls[0].body
        await room.put(batcher, Text("$p", ", more\n"))
        await room.until(lambda: len(room.calls) == 2)
        assert room.calls[1].at == 3.0  # edits at most once per interval
        await room.put(batcher, EndOfRun("$p", {"ok": True}), Begin("$q", {}))
        await room.until(lambda: len(room.calls) == 4)
        room.advance(10.0)  # an agent that shows nothing gets no status: the typing notification says it works
        await room.put(batcher, Block("$q", "🔧 Bash: `make`", "tool"))
        await room.until(lambda: len(room.calls) == 5)
    assert room.calls[4].at == 13.0 and "🔧 Bash" in room.calls[4].body
