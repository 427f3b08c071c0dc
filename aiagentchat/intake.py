"""The intake: what one room event asks of the daemon, decided without a homeserver.

Every field of an event is chosen by whoever sent it. `read` checks the type of each value the daemon uses,
once, where the event enters, and turns the event into an `Incoming` (or says what is wrong with it:
`Malformed`). `decide` turns an `Incoming`, the room's settings and a snapshot of the room's state into one
decision: a prompt, a command, an approval answer, a stop, an upload, or a refusal with its reason. Both are
pure and total: they never raise, whatever the event holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from nio import (
    ReactionEvent,
    RoomEncryptedFile,
    RoomEncryptedImage,
    RoomMessageFile,
    RoomMessageImage,
    RoomMessageNotice,
    RoomMessageText,
)

from aiagentchat import commands
from aiagentchat.approvals import Answer, Pending, reaction_verdict, text_verdict
from aiagentchat.chatrooms import ADMIN_WORDS
from aiagentchat.commands import Command
from aiagentchat.settings import RoomSettings
from aiagentchat.wire import HOPS_KEY, MARKER_KEY

STOP_REACTION = "🛑"
CONFIRM_REACTION = "✅"  # on a request that asks for it (`!discard`)
LEGACY_ROOM_VERSIONS = frozenset(str(version) for version in range(1, 12))
_REPLY_FALLBACK = re.compile(r"\A(?:>[^\n]*\n)+\n?")

Kind = Literal["text", "reaction", "upload"]


class _Bad(Exception):
    """Raised inside `read` only: what is wrong with the event."""


@dataclass(frozen=True)
class Malformed:
    what: str


@dataclass(frozen=True)
class Relation:
    """The checked `m.relates_to` of an event."""

    rel_type: str | None = None
    event_id: str | None = None  # what `rel_type` points at: a thread's root, the annotated or replaced event
    reply_to: str | None = None  # `m.in_reply_to`
    falling_back: bool = False  # the reply is only a thread's fallback for clients without threads
    key: str | None = None  # a reaction's key


@dataclass(frozen=True)
class Upload:
    """Where an uploaded file is, and for an encrypted one, how to decrypt it."""

    url: str
    size: int  # as declared by the sender (0: not declared); checked again once downloaded
    image: bool
    key: str | None = None
    sha256: str | None = None
    iv: str | None = None


@dataclass(frozen=True)
class Incoming:
    """A room event the daemon reads, every value checked for type."""

    kind: Kind
    event_id: str
    sender: str
    body: str  # a message's text or a file's name; "" for a reaction
    relation: Relation = field(default_factory=Relation)
    agent: bool = False  # carries the marker of an agent's output
    final: str | None = None  # an agent's event: the result of its run's successful final event
    hops: int = 0
    decrypted: bool = False
    verified: bool = False
    upload: Upload | None = None

    @property
    def thread(self) -> str:
        """The root of the thread the event was posted in; "" for the room's main timeline."""
        relation = self.relation
        return relation.event_id or "" if relation.rel_type == "m.thread" else ""

    @property
    def replied_to(self) -> str | None:
        """The event this one replies to; None when none, or only a thread's fallback for old clients."""
        return None if self.relation.falling_back else self.relation.reply_to


# --- reading an event -----------------------------------------------------------------------------------


def strip_reply_fallback(body: str) -> str:
    """Drop the quoted `> ` lines a reply carries, so someone else's words never become the prompt."""
    return _REPLY_FALLBACK.sub("", body, count=1)


def kind_of(event: Any) -> Kind | None:
    """Which of the events the intake reads this is (by nio's parsing), or None for any other. A notice is read
    only when it carries an agent's marker: an agent's run may end with one ("(end of run)", its answer in the
    marker's `final`); other notices are never prompts."""
    if isinstance(event, RoomMessageText):
        return "text"
    if isinstance(event, RoomMessageNotice):
        content = event.source.get("content") if isinstance(event.source, dict) else None
        return "text" if isinstance(content, dict) and MARKER_KEY in content else None
    if isinstance(event, ReactionEvent):
        return "reaction"
    if isinstance(event, (RoomMessageFile, RoomMessageImage, RoomEncryptedFile, RoomEncryptedImage)):
        return "upload"
    return None


def read(event: Any) -> Incoming | Malformed | None:
    """The event as the intake sees it; None for an event it does not read; Malformed when a value it needs
    has the wrong type."""
    kind = kind_of(event)
    if kind is None:
        return None
    try:
        return _read(kind, event)
    except _Bad as bad:
        return Malformed(str(bad))


def encrypted_problem(event: Any) -> str | None:
    """What is wrong with an encrypted event (nio's MegolmEvent) that makes it impossible to decrypt ever, or
    None."""
    try:
        for name in ("event_id", "sender", "session_id", "sender_key"):
            if not _text(getattr(event, name, None), name):
                raise _Bad(f"{name} is empty")
    except _Bad as bad:
        return str(bad)
    return None


def _read(kind: Kind, event: Any) -> Incoming:
    source = _mapping(getattr(event, "source", None), "the event")
    content = _mapping(source.get("content"), "content")
    relation = _relation(content.get("m.relates_to"), kind)
    agent, final, marker_hops = _marker(content)
    hops = marker_hops if agent else _count(content.get(HOPS_KEY), HOPS_KEY)
    body = "" if kind == "reaction" else _text(content.get("body"), "body")
    return Incoming(
        kind,
        _text(getattr(event, "event_id", None), "event_id"),
        _text(getattr(event, "sender", None), "sender"),
        body,
        relation,
        agent,
        final,
        hops,
        getattr(event, "decrypted", False) is True,
        getattr(event, "verified", False) is True,
        _upload(content, isinstance(event, (RoomMessageImage, RoomEncryptedImage))) if kind == "upload" else None,
    )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is {type(value).__name__}, not an object")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(f"{where} is not valid Unicode (a lone surrogate)") from None
    return value


def _optional_text(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _count(value: Any, where: str) -> int:
    """A hop count: absent is 0; anything but a whole number ≥ 0 is malformed (never silently 0, which would
    let an agent reset its own hop count)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"{where} is {value!r:.40}, not a whole number ≥ 0")
    return value


def _relation(value: Any, kind: Kind) -> Relation:
    if value is None and kind != "reaction":
        return Relation()
    relates = _mapping(value, "m.relates_to")
    reply = relates.get("m.in_reply_to")
    reply_to = None if reply is None else _optional_text(_mapping(reply, "m.in_reply_to").get("event_id"), "reply")
    falling_back = relates.get("is_falling_back", False)
    if not isinstance(falling_back, bool):
        raise _Bad(f"is_falling_back is {type(falling_back).__name__}, not a boolean")
    relation = Relation(
        _optional_text(relates.get("rel_type"), "rel_type"),
        _optional_text(relates.get("event_id"), "m.relates_to.event_id"),
        reply_to,
        falling_back,
        _optional_text(relates.get("key"), "key"),
    )
    if kind == "reaction" and (relation.event_id is None or relation.key is None):
        raise _Bad("a reaction without the event it reacts to or its key")
    return relation


def _marker(content: Mapping[str, Any]) -> tuple[bool, str | None, int]:
    """Whether the event is an agent's output, the result of its run if this is its successful final event,
    and the hops it carries."""
    if MARKER_KEY not in content:
        return False, None, 0
    marker = _mapping(content[MARKER_KEY], MARKER_KEY)
    final = marker.get("final")
    result = None
    if isinstance(final, dict) and final.get("ok") is True:
        result = _optional_text(final.get("result"), "final.result")
    return True, result, _count(marker.get("hops"), f"{MARKER_KEY}.hops")


def _upload(content: Mapping[str, Any], image: bool) -> Upload:
    info = content.get("info")
    size = 0 if info is None else _mapping(info, "info").get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _Bad(f"info.size is {size!r:.40}, not a size in bytes")
    if "file" not in content:
        return Upload(_text(content.get("url"), "url"), size, image)
    file = _mapping(content["file"], "file")
    key = _mapping(file.get("key"), "file.key")
    hashes = _mapping(file.get("hashes"), "file.hashes")
    return Upload(
        _text(file.get("url"), "file.url"),
        size,
        image,
        _text(key.get("k"), "file.key.k"),
        _text(hashes.get("sha256"), "file.hashes.sha256"),
        _text(file.get("iv"), "file.iv"),
    )


# --- deciding what it asks ------------------------------------------------------------------------------


class Approvals(Protocol):
    """What the intake asks of a room's approval requests (`approvals.RoomToolPolicy`)."""

    @property
    def pending(self) -> Pending | None: ...

    @property
    def answerers(self) -> list[str]: ...

    def request_for(self, event_id: str) -> Pending | None: ...

    def closed(self, event_id: str) -> str | None: ...


@dataclass(frozen=True)
class RoomState:
    """What the intake needs to know of the room when an event arrives."""

    own_user_id: str
    encrypted: bool
    sender_level: float  # the sender's power level (math.inf: a creator of a version 12+ room)
    approvals: Approvals
    admin: bool = False  # the sender is one of the daemon's admins: its admin commands pass without allowed_users


@dataclass(frozen=True)
class Ignore:
    """Nothing to do and nothing to log: the bot's own event."""


@dataclass(frozen=True)
class Refuse:
    """The event must not act on the agent; `answering`: it answered an approval request."""

    reason: str
    answering: bool = False


@dataclass(frozen=True)
class ApprovalAnswer:
    """A reaction or reply to an approval request (or a message that is only a verdict while one waits)."""

    pending: Pending | None  # the request if it still waits
    answer: Answer | None = None  # give it to `pending`
    notice: str = ""  # tell the answerer this instead
    stop: bool = False  # 🛑 on the request: stop the run
    record: bool = False  # a message: record its event first, so it is handled once


@dataclass(frozen=True)
class StopPrompt:
    """🛑 on a prompt: stop it if it runs, drop it if it waits."""

    prompt_id: str


@dataclass(frozen=True)
class Confirm:
    """✅ on an event that is not an approval request: it confirms it if it asked (`!discard`)."""

    target: str


@dataclass(frozen=True)
class SaveUpload:
    upload: Upload


@dataclass(frozen=True)
class RunCommand:
    text: str
    command: Command


@dataclass(frozen=True)
class Accept:
    """A prompt for the agent (the room's queue, budget and records decide whether it runs)."""

    text: str


Decision = Ignore | Refuse | ApprovalAnswer | StopPrompt | Confirm | SaveUpload | RunCommand | Accept


def decide(room: RoomSettings, event: Incoming, state: RoomState) -> Decision:
    """What the event asks of the daemon, and whether it may."""
    if event.sender == state.own_user_id:
        return Ignore()
    if (answering := _answering(room, event, state.approvals)) is not None:
        refusal = refusal_of(room, event, state, answerers=state.approvals.answerers)
        if refusal is not None:
            return Refuse(refusal, answering=True)
        target, pending = answering
        return _approval_answer(event, pending, state.approvals.closed(target) if target else None)
    if (refusal := refusal_of(room, event, state, admin=state.admin and _admin_command(room, event))) is not None:
        return Refuse(refusal)
    if event.hops >= room.max_hops:
        return Refuse(f"hop limit {room.max_hops} reached")
    if event.kind == "reaction":
        if _is_stop(event):
            return StopPrompt(event.relation.event_id or "")
        confirming = (event.relation.key or "").startswith(CONFIRM_REACTION) and event.relation.event_id
        return Confirm(event.relation.event_id or "") if confirming else Ignore()
    if event.kind == "upload" and event.upload is not None:
        return SaveUpload(event.upload)
    return _prompt_or_command(room, event)


def _prompt_or_command(room: RoomSettings, event: Incoming) -> RunCommand | Accept:
    text = event.final if event.agent and event.final is not None else strip_reply_fallback(event.body)
    command = None if event.agent else commands.parse(text, room.command_prefix)
    if command is not None and (alias := room.aliases.get(command.word)) is not None:
        return Accept(f"{alias} {command.argument}".strip())
    return Accept(text) if command is None else RunCommand(text, command)


def _admin_command(room: RoomSettings, event: Incoming) -> bool:
    """Whether the event is a person's room admin command (`!allow`, `!leave`, ...)."""
    if event.kind != "text" or event.agent:
        return False
    command = commands.parse(strip_reply_fallback(event.body), room.command_prefix)
    return command is not None and command.word in ADMIN_WORDS


def _is_stop(event: Incoming) -> bool:
    return (event.relation.key or "").startswith(STOP_REACTION)


def _answering(room: RoomSettings, event: Incoming, approvals: Approvals) -> tuple[str, Pending | None] | None:
    """If the event answers an approval request: the request's event id ("" for a plain answer) and the
    request if it still waits. Commands and uploads are never answers."""
    if event.kind == "reaction":
        target = event.relation.event_id
    elif event.kind == "text":
        if commands.parse(strip_reply_fallback(event.body), room.command_prefix) is not None:
            return None
        target = event.replied_to
        waiting = approvals.pending
        if target is None and waiting is not None and event.sender in approvals.answerers:
            # not a reply: a message that is only `yes`, `no [reason]` or `always` answers the waiting request,
            # and in the request's own thread any message answers the agent's question
            in_its_thread = waiting.thread is not None and event.thread == waiting.thread
            if text_verdict(event.body, whole=True) if not waiting.question else in_its_thread:
                return "", waiting
    else:
        return None
    if target is None:
        return None
    if (pending := approvals.request_for(target)) is not None or approvals.closed(target) is not None:
        return target, pending
    return None


def _approval_answer(event: Incoming, pending: Pending | None, closed: str | None) -> ApprovalAnswer:
    """What the answer does; `closed`: what became of the request when it no longer waits."""
    if event.kind == "reaction":
        verdict = reaction_verdict(event.relation.key or "")
        answer = Answer(verdict, event.sender) if pending is not None and verdict is not None else None
        return ApprovalAnswer(pending, answer, stop=_is_stop(event))
    text = strip_reply_fallback(event.body).strip()
    if pending is None:
        decided = f"That request was already decided: {closed or 'it no longer waits'}"
        return ApprovalAnswer(None, notice=decided, record=True)
    if pending.question:
        declined = reaction_verdict(text) == "deny"
        answer = Answer("deny" if declined else "allow", event.sender, "" if declined else text)
        return ApprovalAnswer(pending, answer, record=True)
    if (parsed := text_verdict(text)) is None:
        usage = "Answer with `yes`, `no [reason]` or `always` (or react ✅ ❌ 🔁)."
        return ApprovalAnswer(pending, notice=usage, record=True)
    if parsed[0] == "always" and event.replied_to is None:
        reply = "🔁 is given only on the request itself: react 🔁 to it, or reply `always` to it. It still waits."
        return ApprovalAnswer(pending, notice=reply, record=True)
    return ApprovalAnswer(pending, Answer(parsed[0], event.sender, parsed[1]), record=True)


def refusal_of(
    room: RoomSettings, event: Incoming, state: RoomState, answerers: list[str] | None = None, *, admin: bool = False
) -> str | None:
    """Why this event (a message, a reaction, a file) must not act on the agent, or None if it may. With
    `answerers`, it answers an approval request: only they may, and never an agent. With `admin`, it is an
    admin's admin command: allowed_users does not apply."""
    if answerers is not None:
        if event.agent or event.sender not in answerers:
            return "not one of the room's approvers"
    elif event.agent:
        if event.sender not in room.allowed_bots:
            return "output of an agent that is not in allowed_bots"
        if event.kind != "text" or event.final is None:
            return "not the successful final answer of an agent's run"
    elif event.sender not in room.allowed_users and not admin:
        return "sender not in allowed_users"
    if event.relation.rel_type == "m.replace":
        return "an edit of an earlier message"
    if state.encrypted and not event.decrypted:
        return "unencrypted message in an encrypted room"
    if room.require_verified_device and not event.verified:
        return "the sender's device is not verified"
    if room.min_power_level is not None and state.sender_level < room.min_power_level:
        return f"power level {state.sender_level} below {room.min_power_level}"
    return None


def power_level(room_version: str, creators: set[str], user_id: str, level: int) -> float:
    """The user's power level; creators of version 12+ rooms rank above every level."""
    if room_version not in LEGACY_ROOM_VERSIONS and user_id in creators:
        return math.inf
    return level
