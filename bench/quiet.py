"""Quick and quiet (issue 17), against a Synapse with its default message rate limit (0.2 events/s, burst 10
per account) and the real CLI with the scripted model; the person's own account is exempt, so only the bot's
limit counts.

- Events per answer: a warm one-line answer (`say …`), counted in the person's view: the bot's messages and
  edits for the prompt, its reactions to the prompt and their redactions. In three modes: live status with
  reactions (the default), live status without reactions, and the streamed mode.
- First words: a streamed answer of about 4 s (`slow 20`: a word every 0.2 s), from the prompt's send to the
  person's client seeing the first word (in the live status or the streamed text), and to the run's last
  event, live status against streamed.
- In a row: eight quick prompts, each sent when the one before is answered, by a bot that is rate limited and
  one exempted through Synapse's admin API (as the built-in homeserver does): when each was answered, and the
  429s the daemon met.
- Live status under the rate limit: a `drip` of numbered lines for `--drip-seconds`, live status, the bot not
  exempt: its events, 429s, and prompt → first words / answer.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from aiagentchat.localserver import exempt_from_rate_limits
from bench.stats import Distribution, ms
from bench.world import Homeserver, final_marker, run_final
from tests.harness import claude_binary
from tests.harness.matrix_user import Event, MatrixUser
from tests.integration.conftest import bot_events

TIMEOUT_S = 120.0
ANSWERS = 5  # per mode
IN_A_ROW = 8
STREAMED_WORDS = 20  # `slow 20`: about 4 s
FIRST_WORDS_S, MAX_EVENTS = 1.5, 2  # the targets
MODES = {  # name → (live_status, reactions)
    "live status, reactions (default)": (True, True),
    "live status, no reactions": (True, False),
    "streamed, reactions": (False, True),
}
LINE_INTERVAL_MS = 100


@dataclass(frozen=True)
class Mode:
    name: str
    events: list[int]  # per warm one-line answer
    answer_s: list[float]  # prompt sent → the run's last event seen, warm one-line answer
    first_words_s: list[float]  # `slow 20`: prompt sent → first word seen
    streamed_answer_s: list[float]  # `slow 20`: prompt sent → the run's last event seen


@dataclass(frozen=True)
class InARow:
    exempt: bool
    answered_s: list[float]  # each prompt, sent → its ✅ seen
    rate_limited: int


@dataclass(frozen=True)
class LiveDrip:
    lines: int
    events: int
    rate_limited: int
    first_words_s: float
    answer_s: float
    final_ok: bool


@dataclass(frozen=True)
class Quiet:
    modes: list[Mode]
    in_a_row: list[InARow]
    drip: LiveDrip


def answer_events(events: list[Event], bot: str, prompt_id: str) -> int:
    """The bot's events for one prompt: messages and edits, reactions to it and their redactions."""
    reactions = {
        e["event_id"]
        for e in events
        if e["sender"] == bot
        and e["type"] == "m.reaction"
        and (e["content"].get("m.relates_to") or {}).get("event_id") == prompt_id
    }
    redactions = [
        e
        for e in events
        if e["sender"] == bot
        and e["type"] == "m.room.redaction"
        and (e.get("redacts") or e["content"].get("redacts")) in reactions
    ]
    return len(bot_events(events, prompt_id, status=True)) + len(reactions) + len(redactions)


def checked(bot: str, prompt_id: str) -> Any:
    """True once the bot's ✅ on the prompt is seen."""
    return lambda events: any(
        e["sender"] == bot
        and e["type"] == "m.reaction"
        and (e["content"].get("m.relates_to") or {}) == {"rel_type": "m.annotation", "event_id": prompt_id, "key": "✅"}
        for e in events
    )


def _first_word(prompt_id: str, word: str) -> Any:
    return lambda events: any(word in e["content"].get("body", "") for e in bot_events(events, prompt_id, status=True))


async def _timed(
    user: MatrixUser, room: str, text: str, *conditions: Any, timeout: float = TIMEOUT_S
) -> tuple[str, list[float]]:
    """Send `text`; seconds until each condition (given the prompt id) held, in order, each within `timeout`."""
    start = time.monotonic()
    prompt_id = await user.send_text(room, text)
    times = []
    for condition in conditions:
        await user.wait_for(condition(prompt_id), timeout=timeout, room_id=room)
        times.append(time.monotonic() - start)
    return prompt_id, times


async def _mode(server: Homeserver, user: MatrixUser, name: str, live: bool, reactions: bool) -> Mode:
    bot = await server.account("bot")
    await exempt_from_rate_limits(server.synapse.base_url, server.synapse.registration_shared_secret, bot[0])
    room = await user.create_room(invite=[bot[0]])
    daemon = server.daemon(f"quiet-{len(server.daemons)}", bot, [room], user.user_id, {"binary": claude_binary()},
                           live_status=live, reactions=reactions)  # fmt: skip
    await daemon.start()
    done = (lambda prompt_id: checked(bot[0], prompt_id)) if reactions else run_final
    await _timed(user, room, "say warming up", done)  # the agent starts: what follows is warm
    counted, answers = [], []
    for n in range(ANSWERS):
        prompt_id, (answered, _) = await _timed(user, room, f"say answer {n}", run_final, done)
        counted.append(prompt_id)
        answers.append(answered)
    first_words, streamed = [], []
    for _ in range(ANSWERS):
        _, (first, answered, _) = await _timed(
            user, room, f"slow {STREAMED_WORDS}", lambda p: _first_word(p, "w1"), run_final, done
        )
        first_words.append(first)
        streamed.append(answered)
    await daemon.stop()
    events = user.room_events(room)
    return Mode(name, [answer_events(events, bot[0], p) for p in counted], answers, first_words, streamed)


async def _in_a_row(server: Homeserver, user: MatrixUser, exempt: bool) -> InARow:
    bot = await server.account("bot")
    if exempt:
        await exempt_from_rate_limits(server.synapse.base_url, server.synapse.registration_shared_secret, bot[0])
    room = await user.create_room(invite=[bot[0]])
    daemon = server.daemon(f"in-a-row-{exempt}", bot, [room], user.user_id, {"binary": claude_binary()})
    await daemon.start()
    answered = []
    for n in range(IN_A_ROW):
        _, (seen,) = await _timed(user, room, f"say quick {n}", lambda p: checked(bot[0], p))
        answered.append(seen)
    limited = sum(1 for entry in daemon.logs if entry.get("event") == "rate_limited")
    await daemon.stop()
    return InARow(exempt, answered, limited)


async def _drip(server: Homeserver, user: MatrixUser, seconds: float) -> LiveDrip:
    bot = await server.account("bot")
    room = await user.create_room(invite=[bot[0]])
    daemon = server.daemon("live-drip", bot, [room], user.user_id, {"binary": claude_binary()}, live_status=True)
    await daemon.start()
    count = int(seconds * 1000 / LINE_INTERVAL_MS)
    prompt_id, (first, answered) = await _timed(
        user,
        room,
        f"drip {count} {LINE_INTERVAL_MS}",
        lambda p: _first_word(p, "line "),
        run_final,
        timeout=seconds * 5 + TIMEOUT_S,
    )
    limited = sum(1 for entry in daemon.logs if entry.get("event") == "rate_limited")
    await daemon.stop()
    events = user.room_events(room)
    final_ok = bool(final_marker(events, prompt_id)["ok"])
    return LiveDrip(count, answer_events(events, bot[0], prompt_id), limited, first, answered, final_ok)


async def measure(server: Homeserver, drip_seconds: float) -> Quiet:
    """`server` runs Synapse's default `rc_message`."""
    user = await server.person()
    await exempt_from_rate_limits(server.synapse.base_url, server.synapse.registration_shared_secret, user.user_id)
    modes = [await _mode(server, user, name, *options) for name, options in MODES.items()]
    in_a_row = [await _in_a_row(server, user, exempt) for exempt in (False, True)]
    return Quiet(modes, in_a_row, await _drip(server, user, drip_seconds))


def summary_rows(quiet: Quiet) -> list[list[str]]:
    """Rows for the table against the targets: what, target, measured, verdict."""
    default, no_reactions = quiet.modes[0], quiet.modes[1]
    events, bare = max(default.events), max(no_reactions.events)
    first = Distribution.of(default.first_words_s)
    return [
        ["(17) events per warm one-line answer, live status, reactions", f"<= {MAX_EVENTS}", f"{events} (max)",
         _verdict(events <= MAX_EVENTS, f"by {events - MAX_EVENTS}")],
        ["(17) the same without reactions", "<= 1", f"{bare} (max)", _verdict(bare <= 1, f"by {bare - 1}")],
        ["(17) streamed answer: prompt → first words, live status, median", f"<= {FIRST_WORDS_S:.1f} s",
         f"{first.median:.2f} s", _verdict(first.median <= FIRST_WORDS_S, f"by {first.median - FIRST_WORDS_S:.2f} s")],
    ]  # fmt: skip


def _verdict(met: bool, miss: str) -> str:
    return "met" if met else f"**missed**: {miss}"


def section(quiet: Quiet, heading: str) -> list[str]:
    lines = [heading, "", __doc__.split("\n\n", 1)[1].strip(), ""]
    lines += ["| mode | events per warm answer | prompt → answer, warm | `slow 20`: prompt → first words | "
              "`slow 20`: prompt → answer |", "|---|---|---|---|---|"]  # fmt: skip
    for mode in quiet.modes:
        events = f"{statistics.median(mode.events):g} (max {max(mode.events)})"
        cells = [ms(s).cell() for s in (mode.answer_s, mode.first_words_s, mode.streamed_answer_s)]
        lines.append(f"| {mode.name} | {events} | " + " | ".join(cells) + " |")
    lines += ["", f"{IN_A_ROW} quick prompts in a row (each sent once the one before had its ✅), seconds from each "
              "prompt to its ✅:", "", "| the bot | answered in | 429s |", "|---|---|---|"]  # fmt: skip
    for row in quiet.in_a_row:
        who = "exempt (as on the built-in homeserver)" if row.exempt else "rate limited (Synapse's default)"
        lines.append(f"| {who} | {', '.join(f'{s:.2f}' for s in row.answered_s)} | {row.rate_limited} |")
    drip = quiet.drip
    lines += ["", f"Live status under the rate limit, `drip {drip.lines} {LINE_INTERVAL_MS}`: {drip.events} events, "
              f"{drip.rate_limited} × 429, first words after {drip.first_words_s:.2f} s, the answer after "
              f"{drip.answer_s:.1f} s, final ok: {drip.final_ok}.", ""]  # fmt: skip
    return lines
