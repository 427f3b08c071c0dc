"""The intake's decisions, from events parsed by nio as they come from a homeserver (no homeserver needed)."""

import math
from dataclasses import dataclass
from typing import Any

import pytest
from nio import Event

from aiagentchat import intake
from aiagentchat.approvals import Answer, Pending
from aiagentchat.intake import (
    Accept,
    ApprovalAnswer,
    Confirm,
    Ignore,
    Malformed,
    Refuse,
    RunCommand,
    SaveUpload,
    StopPrompt,
)
from aiagentchat.settings import RoomSettings
from aiagentchat.wire import HOPS_KEY, MARKER_KEY

ALICE, BOB, MALLORY, AGENT, BOT = "@alice:x", "@bob:x", "@mallory:x", "@agent:x", "@bot:x"
ROOM = RoomSettings(id="!r:x", allowed_users=[ALICE, BOB], allowed_bots=[AGENT], aliases={"t": "run the tests"})


@dataclass
class Approvals:
    """A room's approval requests as the intake sees them: at most one waiting, on event $request."""

    pending: Pending | None = None
    answerers: tuple[str, ...] = (ALICE,)
    closed_outcome: str | None = None

    def request_for(self, event_id: str) -> Pending | None:
        return self.pending if event_id == "$request" else None

    def closed(self, event_id: str) -> str | None:
        return self.closed_outcome if event_id == "$old-request" else None


def state(approvals: Approvals | None = None, *, encrypted: bool = False, level: float = 0) -> intake.RoomState:
    return intake.RoomState(BOT, encrypted, level, approvals or Approvals())


def event(content: dict[str, Any], sender: str = ALICE, kind: str = "m.room.message", event_id: str = "$e") -> Any:
    """The event as nio parses it from a sync (an encrypted file's content: as nio parses it once decrypted)."""
    source = {"type": kind, "event_id": event_id, "sender": sender, "origin_server_ts": 1, "content": content}
    if "file" in content:
        return Event.parse_decrypted_event(source)
    return Event.parse_event(source)


def text(body: str, **content: Any) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body, **content}


def decided(nio_event: Any, room: RoomSettings = ROOM, **room_state: Any) -> intake.Decision:
    incoming = intake.read(nio_event)
    assert isinstance(incoming, intake.Incoming), incoming
    return intake.decide(room, incoming, state(**room_state))


def test_the_relation_that_once_stopped_the_daemon_is_malformed_not_a_crash():
    found = intake.read(event(text("hello", **{"m.relates_to": "x"})))
    assert found == Malformed("m.relates_to is str, not an object")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (text("hi", **{"m.relates_to": {"m.in_reply_to": "$a"}}), "m.in_reply_to is str"),
        (text("hi", **{"m.relates_to": {"m.in_reply_to": {"event_id": 5}}}), "reply is int"),
        (text("hi", **{"m.relates_to": {"rel_type": ["m.thread"]}}), "rel_type is list"),
        (text("hi", **{"m.relates_to": {"is_falling_back": "yes"}}), "is_falling_back is str"),
        (text("hi", **{HOPS_KEY: "0"}), "org.aiagentchat.hops is '0'"),
        (text("hi", **{HOPS_KEY: -1}), "org.aiagentchat.hops is -1"),
        (text("hi", **{HOPS_KEY: True}), "org.aiagentchat.hops is True"),
        (text("hi", **{MARKER_KEY: "final"}), "org.aiagentchat is str"),
        (text("hi", **{MARKER_KEY: {"hops": 1.5}}), "org.aiagentchat.hops is 1.5"),
        (text("\ud800"), "body is not valid Unicode"),
        ({"msgtype": "m.file", "body": "a.txt", "url": "mxc://x/a", "info": "big"}, "info is str"),
        ({"msgtype": "m.file", "body": "a.txt", "url": "mxc://x/a", "info": {"size": "9"}}, "info.size is '9'"),
        ({"msgtype": "m.file", "body": "a.txt", "url": "mxc://x/a", "info": {"size": -1}}, "info.size is -1"),
    ],
)
def test_a_value_of_the_wrong_type_is_named(content, what):
    found = intake.read(event(content))
    assert isinstance(found, Malformed) and found.what.startswith(what), found


def test_events_the_intake_does_not_read_are_none():
    assert intake.read(event({"msgtype": "m.notice", "body": "hi"})) is None
    assert intake.read(event({"name": "room"}, kind="m.room.name")) is None


def test_a_reply_in_a_thread_is_read_with_its_thread_and_without_its_fallback():
    relates = {"rel_type": "m.thread", "event_id": "$root", "m.in_reply_to": {"event_id": "$root"}}
    incoming = intake.read(event(text("> quoted\n\nreal question", **{"m.relates_to": relates})))
    assert isinstance(incoming, intake.Incoming)
    assert (incoming.thread, incoming.replied_to) == ("$root", "$root")
    fallback = {**relates, "is_falling_back": True}
    incoming = intake.read(event(text("in the thread", **{"m.relates_to": fallback})))
    assert (incoming.thread, incoming.replied_to) == ("$root", None)
    assert decided(event(text("> someone else\n\nmy words"))) == Accept("my words")


def test_who_may_drive_the_room():
    assert decided(event(text("hi"), sender=BOT)) == Ignore()
    assert decided(event(text("hi"), sender=MALLORY)) == Refuse("sender not in allowed_users")
    edit = text("* new", **{"m.relates_to": {"rel_type": "m.replace", "event_id": "$e0"}})
    assert decided(event(edit)) == Refuse("an edit of an earlier message")
    assert decided(event(text("hi")), encrypted=True) == Refuse("unencrypted message in an encrypted room")
    verified_only = ROOM.model_copy(update={"require_verified_device": True})
    assert decided(event(text("hi")), verified_only) == Refuse("the sender's device is not verified")
    ranked = ROOM.model_copy(update={"min_power_level": 50})
    assert decided(event(text("hi")), ranked, level=10) == Refuse("power level 10 below 50")
    assert decided(event(text("hi")), ranked, level=math.inf) == Accept("hi")


def test_commands_aliases_and_prompts():
    assert decided(event(text("!status"))) == RunCommand("!status", intake.commands.Command("status", ""))
    assert decided(event(text("!t now"))) == Accept("run the tests now")
    assert decided(event(text("fix the bug", **{HOPS_KEY: 2}))) == Accept("fix the bug")
    assert decided(event(text("fix the bug", **{HOPS_KEY: 3}))) == Refuse("hop limit 3 reached")


def test_an_agent_is_heard_only_through_the_successful_final_answer_of_its_run():
    final = {MARKER_KEY: {"prompt": "$p", "hops": 1, "final": {"ok": True, "result": "the answer"}}}
    assert decided(event(text("shown text", **final), sender=AGENT)) == Accept("the answer")
    assert decided(event(text("!stop", **final), sender=AGENT)) == Accept("the answer")  # never a command
    streamed = {MARKER_KEY: {"prompt": "$p", "hops": 1}}
    refused = Refuse("not the successful final answer of an agent's run")
    assert decided(event(text("partial", **streamed), sender=AGENT)) == refused
    failed = {MARKER_KEY: {"prompt": "$p", "hops": 1, "final": {"ok": False, "result": "boom"}}}
    assert decided(event(text("x", **failed), sender=AGENT)) == refused
    assert decided(event(text("x", **final), sender=MALLORY)) == Refuse(
        "output of an agent that is not in allowed_bots"
    )
    end_of_run = {"msgtype": "m.notice", "body": "(end of run)", **final}  # the answer was streamed before it
    assert decided(event(end_of_run, sender=AGENT)) == Accept("the answer")
    status = {"msgtype": "m.notice", "body": "⏳ working", MARKER_KEY: {"prompt": "$p", "hops": 1, "status": True}}
    assert decided(event(status, sender=AGENT)) == refused
    deep = {MARKER_KEY: {"prompt": "$p", "hops": 3, "final": {"ok": True, "result": "again"}}}
    assert decided(event(text("x", **deep), sender=AGENT)) == Refuse("hop limit 3 reached")


def reaction(key: str, target: str = "$prompt", sender: str = ALICE) -> Any:
    content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}
    return event(content, sender=sender, kind="m.reaction")


def test_reactions_stop_prompts_confirm_what_asked_for_it_and_do_nothing_else():
    assert decided(reaction("🛑")) == StopPrompt("$prompt")
    assert decided(reaction("✅", "$question")) == Confirm("$question")  # the room checks that it asked
    assert decided(reaction("✅️", "$question")) == Confirm("$question")  # with a variation selector
    assert decided(reaction("👍")) == Ignore()
    assert decided(reaction("🛑", sender=MALLORY)) == Refuse("sender not in allowed_users")
    assert decided(reaction("✅", "$question", sender=MALLORY)) == Refuse("sender not in allowed_users")


def pending(question: bool = False) -> Pending:
    return Pending("$prompt", "Bash", {"command": "ls"}, question, answer=None)  # type: ignore[arg-type]


def test_answers_to_an_approval_request():
    waiting = pending()
    approvals = Approvals(waiting)
    yes = decided(reaction("✅", "$request"), approvals=approvals)
    assert yes == ApprovalAnswer(waiting, Answer("allow", ALICE))
    stop = decided(reaction("🛑", "$request"), approvals=approvals)
    assert stop == ApprovalAnswer(waiting, None, stop=True)
    reply = text("no, not there", **{"m.relates_to": {"m.in_reply_to": {"event_id": "$request"}}})
    assert decided(event(reply), approvals=approvals) == ApprovalAnswer(
        waiting, Answer("deny", ALICE, "not there"), record=True
    )
    always = text("always", **{"m.relates_to": {"m.in_reply_to": {"event_id": "$request"}}})
    assert decided(event(always), approvals=approvals) == ApprovalAnswer(waiting, Answer("always", ALICE), record=True)
    unclear = decided(
        event(text("hmm", **{"m.relates_to": {"m.in_reply_to": {"event_id": "$request"}}})), approvals=approvals
    )
    assert isinstance(unclear, ApprovalAnswer) and unclear.answer is None and "Answer with `yes`" in unclear.notice
    assert decided(event(text("!stop")), approvals=approvals) == RunCommand(
        "!stop", intake.commands.Command("stop", "")
    )
    assert decided(event(text("yes")), approvals=Approvals(waiting, answerers=(BOB,))) == Accept("yes")


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        ("yes", Answer("allow", ALICE)),
        ("No.", Answer("deny", ALICE)),
        ("no, use the other file", Answer("deny", ALICE, "use the other file")),
        ("✅", Answer("allow", ALICE)),
    ],
)
def test_a_message_that_is_only_an_answer_answers_the_waiting_request(body, answer):
    waiting = pending()
    assert decided(event(text(body)), approvals=Approvals(waiting)) == ApprovalAnswer(waiting, answer, record=True)


@pytest.mark.parametrize(
    "body", ["ok, what about the tests?", "Always check with me before you push", "yes please, and run the tests"]
)
def test_a_message_that_only_starts_like_an_answer_is_a_prompt(body):
    assert decided(event(text(body)), approvals=Approvals(pending())) == Accept(body)


@pytest.mark.parametrize("body", ["always", "🔁"])
def test_always_is_given_only_on_the_request_itself(body):
    waiting = pending()
    told = decided(event(text(body)), approvals=Approvals(waiting))
    assert isinstance(told, ApprovalAnswer) and told.pending is waiting and told.answer is None and told.record
    assert told.notice.startswith("🔁 is given only on the request itself: react 🔁 to it, or reply `always`")


def test_approval_answers_from_others_are_refused_and_late_ones_told():
    approvals = Approvals(pending())
    assert decided(reaction("✅", "$request", sender=BOB), approvals=approvals) == Refuse(
        "not one of the room's approvers", answering=True
    )
    late = text("yes", **{"m.relates_to": {"m.in_reply_to": {"event_id": "$old-request"}}})
    told = decided(event(late), approvals=Approvals(closed_outcome="✅ allowed once by @alice:x"))
    assert told == ApprovalAnswer(
        None, notice="That request was already decided: ✅ allowed once by @alice:x", record=True
    )


def test_uploads_plain_and_encrypted():
    plain = {"msgtype": "m.image", "body": "a.png", "url": "mxc://x/a", "info": {"size": 5}}
    assert decided(event(plain)) == SaveUpload(intake.Upload("mxc://x/a", 5, True))
    key = {"alg": "A256CTR", "k": "key"}
    file = {"url": "mxc://x/b", "key": key, "hashes": {"sha256": "hash"}, "iv": "iv", "v": "v2"}
    encrypted = {"msgtype": "m.file", "body": "b.bin", "file": file}
    assert decided(event(encrypted)) == SaveUpload(intake.Upload("mxc://x/b", 0, False, "key", "hash", "iv"))
    assert decided(event(plain, sender=MALLORY)) == Refuse("sender not in allowed_users")


def test_creators_of_new_rooms_outrank_every_level():
    assert intake.power_level("12", {ALICE}, ALICE, 0) == math.inf
    assert intake.power_level("11", {ALICE}, ALICE, 0) == 0
    assert intake.power_level("12", {ALICE}, BOB, 50) == 50
