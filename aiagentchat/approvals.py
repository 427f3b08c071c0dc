"""Tool approval: what the agent may use without asking, asking the room's people the rest (and the agent's
questions, `AskUserQuestion`), and reading their answers from reactions and replies."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from aiagentchat.batcher import WAITING, WORKING, Batcher, Block, Notice, React
from aiagentchat.settings import ClaudeSettings, RoomSettings
from aiagentchat.store import Prompt, Store

log = structlog.get_logger(__name__)

Verdict = Literal["allow", "deny", "always"]
ALLOW, DENY, ALWAYS = "✅", "❌", "🔁"
QUESTION_TOOL = "AskUserQuestion"
SUMMARY_LINES = 12
SUMMARY_CHARS = 1_500
CLOSED_KEPT = 200  # answered requests remembered, so a late answer to one is told, not taken as a prompt
_REACTIONS: dict[str, Verdict] = {ALLOW: "allow", "👍": "allow", DENY: "deny", "👎": "deny", ALWAYS: "always"}
_WORDS: dict[str, Verdict] = {
    "yes": "allow", "y": "allow", "allow": "allow", "ok": "allow", "no": "deny", "n": "deny", "deny": "deny",
    "always": "always",
}  # fmt: skip
_ANSWER = re.compile(r"\s*(\S+?)[\s,.:;!-]*(?:\s(.*))?\Z", re.DOTALL)
_OBJECTS = {
    "Bash": "command", "Write": "file_path", "Edit": "file_path", "MultiEdit": "file_path", "Read": "file_path",
    "NotebookEdit": "notebook_path", "WebFetch": "url", "WebSearch": "query",
}  # fmt: skip
_COMPOUND = re.compile(r"[;&|<>`\n]|\$\(")


@dataclass(frozen=True)
class ToolDecision:
    allow: bool
    message: str = ""
    updated_input: dict[str, Any] | None = None  # what the tool runs with, when it is not what was asked
    told: bool = False  # the room was already told of the decision


class ToolPolicy(Protocol):
    """Decides a `can_use_tool` request of the agent, asking people if it must."""

    pending: Pending | None  # the request waiting for a person's answer

    async def decide(self, prompt: Prompt, tool_name: str, tool_input: dict[str, Any]) -> ToolDecision: ...

    def cancel(self, reason: str) -> bool:
        """Deny the request waiting for an answer, if any (`!stop` while it waits); True if there was one."""
        ...


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    by: str
    text: str = ""  # a denial's reason, or the answer to a question


def reaction_verdict(key: str) -> Verdict | None:
    return _REACTIONS.get(key.replace("\ufe0f", "").strip())


def text_verdict(text: str) -> tuple[Verdict, str] | None:
    """`yes`, `no [reason]`, `always` (or their emoji) as the first word of a reply; None for anything else."""
    match = _ANSWER.match(text)
    if match is None:
        return None
    word = match.group(1).lower()
    verdict = _WORDS.get(word) or reaction_verdict(word)
    if verdict is None:
        return None
    return verdict, (match.group(2) or "").strip()


def _fence(text: str, language: str = "") -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{language}\n{text}\n{ticks}"


def _excerpt(text: str) -> str:
    lines = text.splitlines()
    shown = "\n".join(lines[:SUMMARY_LINES])[:SUMMARY_CHARS]
    hidden = len(lines) - len(shown.splitlines())
    return shown + (f"\n… {hidden} more lines" if hidden > 0 else "")


def summarize(tool_name: str, tool_input: dict[str, Any]) -> str:
    """What the tool will do, in Markdown a person can judge at a glance."""
    get = lambda key: str(tool_input.get(key, ""))  # noqa: E731
    match tool_name:
        case "Bash":
            why = f"\n{get('description')}" if tool_input.get("description") else ""
            return _fence(get("command"), "sh") + why
        case "Write":
            content = get("content")
            size = f"{len(content.encode()):,} bytes, {len(content.splitlines())} lines"
            return f"`{get('file_path')}` ({size})\n" + _fence(_excerpt(content))
        case "Edit":
            old = [f"- {line}" for line in get("old_string").splitlines()]
            new = [f"+ {line}" for line in get("new_string").splitlines()]
            every = " (every occurrence)" if tool_input.get("replace_all") else ""
            return f"`{get('file_path')}`{every}\n" + _fence(_excerpt("\n".join(old + new)), "diff")
        case "WebFetch":
            return f"<{get('url')}>" + (f"\n{get('prompt')}" if tool_input.get("prompt") else "")
        case "WebSearch":
            return f"search for “{get('query')}”"
        case "NotebookEdit":
            return f"`{get('notebook_path')}`\n" + _fence(_excerpt(get("new_source")))
    return _fence(_excerpt(str(tool_input)))


def command_prefix(command: str) -> str | None:
    """The prefix 🔁 allows for a Bash command: its program and a subcommand word (`git commit`, `npm test`,
    `touch`); None for a compound command (`;`, `&&`, pipes, redirections, substitutions), which only its
    exact text may match."""
    if _COMPOUND.search(command):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words:
        return None
    prefix = words[:1]
    if len(words) > 1 and re.fullmatch(r"[a-z][a-z0-9_-]*", words[1]):
        prefix.append(words[1])
    return " ".join(prefix)


def rule_for(tool_name: str, tool_input: dict[str, Any]) -> str:
    """The conversation rule 🔁 records: the tool, or for Bash its command prefix (or exact compound command)."""
    if tool_name != "Bash":
        return tool_name
    command = str(tool_input.get("command", ""))
    prefix = command_prefix(command)
    return f"Bash:{prefix}" if prefix is not None else f"Bash={command}"


def rule_allows(rule: str, tool_name: str, tool_input: dict[str, Any]) -> bool:
    if tool_name != "Bash":
        return rule == tool_name
    command = str(tool_input.get("command", ""))
    if rule.startswith("Bash="):
        return rule[len("Bash=") :] == command
    prefix = command_prefix(command)
    return prefix is not None and rule.startswith("Bash:") and prefix == rule[len("Bash:") :]


def rule_text(rule: str) -> str:
    if rule.startswith("Bash:"):
        return f"Bash commands starting with `{rule[len('Bash:') :]}`"
    if rule.startswith("Bash="):
        return f"the Bash command `{rule[len('Bash=') :]}`"
    return rule


def question_answers(questions: list[dict[str, Any]], text: str) -> dict[str, str]:
    """A reply's answers to the agent's questions: one line per question when there are as many lines as
    questions, else the whole reply for each; an option's number stands for its label."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    parts = lines if len(lines) == len(questions) > 1 else [text.strip()] * len(questions)
    answers = {}
    for question, part in zip(questions, parts, strict=True):
        options = [str(option.get("label", "")) for option in question.get("options") or []]
        chosen = part.rstrip(".)")
        if chosen.isdigit() and 1 <= int(chosen) <= len(options):
            part = options[int(chosen) - 1]
        answers[str(question.get("question", ""))] = part
    return answers


@dataclass
class Pending:
    """A request waiting for a person's answer."""

    prompt_id: str
    tool_name: str
    tool_input: dict[str, Any]
    question: bool
    thread: str | None = None  # the thread the request goes in, if any
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    asked_at: float = field(default_factory=time.time)
    answer: asyncio.Future[Answer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def ref(self) -> str:
        return f"approval:{self.key}"

    def what(self) -> str:
        """The tool and its object, in a few words: Bash `make test`, Write `/w/a.py`."""
        if self.question:
            return "an answer to the agent's question"
        key = _OBJECTS.get(self.tool_name)
        target = str(self.tool_input.get(key, "")) if key else ""
        if not target:
            return self.tool_name
        return f"{self.tool_name} `{target if len(target) <= 200 else target[:199] + '…'}`"


class RoomToolPolicy:
    """A room's tool policy. A tool in allowed_tools, or covered by a 🔁 rule of the current conversation, is
    allowed; anything else is asked of the room's people (`unlisted_tools = "ask"`) or denied.

    Without `room` (a room that cannot ask: unit tests, the benchmark) unlisted tools are denied."""

    def __init__(
        self,
        claude: ClaudeSettings,
        room: RoomSettings | None = None,
        room_id: str = "",
        store: Store | None = None,
        batcher: Batcher | None = None,
    ) -> None:
        self._allowed = set(claude.allowed_tools)
        self._room = room if room is not None and room.unlisted_tools == "ask" else None
        self._room_id = room_id
        self._store = store
        self._batcher = batcher
        self.pending: Pending | None = None
        self._closed: collections.OrderedDict[str, str] = collections.OrderedDict()  # request event id → outcome

    @property
    def answerers(self) -> list[str]:
        room = self._room
        return [] if room is None else room.approvers or room.allowed_users

    async def decide(self, prompt: Prompt, tool_name: str, tool_input: dict[str, Any]) -> ToolDecision:
        question = tool_name == QUESTION_TOOL
        if tool_name in self._allowed and not question:
            return ToolDecision(True)
        if self._room is None or self._store is None or self._batcher is None:
            if question:
                return ToolDecision(False, "Nobody can answer questions in this room: decide yourself and say so.")
            return ToolDecision(False, f"{tool_name} is not in this room's allowed_tools, so aiagentchat denied it.")
        if not question:
            rules = await self._store.tool_rules(prompt.conversation(self._room.session_scope))
            if (rule := next((r for r in rules if rule_allows(r, tool_name, tool_input)), None)) is not None:
                log.info("tool_allowed_by_rule", tool=tool_name, rule=rule)
                return ToolDecision(True)
        thread = prompt.output_thread(self._room.reply_mode)
        return await self._ask(prompt, Pending(prompt.event_id, tool_name, tool_input, question, thread))

    async def _ask(self, prompt: Prompt, pending: Pending) -> ToolDecision:
        assert self._room is not None and self._store is not None and self._batcher is not None
        room, batcher = self._room, self._batcher
        self.pending = pending
        log.info("approval_asked", tool=pending.tool_name, key=pending.key)
        text = self._request_text(pending)
        mentions = self.answerers
        marker = {"approval": pending.key}
        await batcher.put(
            Notice(prompt.event_id, text, marker, ref=pending.ref, mentions=mentions, thread=pending.thread)
        )
        await batcher.put(React(prompt.event_id, WAITING))
        try:
            async with asyncio.timeout(room.approval_timeout_s):
                answer = await pending.answer
        except TimeoutError:
            answer = Answer("deny", "", f"nobody answered within {room.approval_timeout_s:g} s")
        finally:
            self.pending = None
        decision, outcome = self._decision(pending, answer)
        decision = dataclasses.replace(decision, told=True)
        request_event = batcher.forget(pending.ref)
        if request_event is not None:
            self._closed[request_event] = outcome
            while len(self._closed) > CLOSED_KEPT:
                self._closed.popitem(last=False)
        async with self._store.transaction():  # a 🔁 rule is never kept without the decision that made it
            if answer.verdict == "always" and not pending.question:
                rule = rule_for(pending.tool_name, pending.tool_input)
                await self._store.add_tool_rule(prompt.conversation(room.session_scope), rule, answer.by)
            await self._store.add_approval(
                self._room_id, prompt.event_id, pending.what(), answer.verdict, answer.by, answer.text
            )
        log.info("approval_answered", tool=pending.tool_name, verdict=answer.verdict, by=answer.by or None)
        await batcher.put(Block(prompt.event_id, outcome, "tool"))
        await batcher.put(React(prompt.event_id, WORKING))
        return decision

    def _decision(self, pending: Pending, answer: Answer) -> tuple[ToolDecision, str]:
        """The decision for the agent, and what the room is told of it."""
        by = f" by {answer.by}" if answer.by else ""
        if pending.question:
            if answer.verdict == "deny":
                why = answer.text or "the user declined to answer"
                return ToolDecision(False, f"No answer: {why}."), f"❌ Question not answered{by}: {why}."
            questions = pending.tool_input.get("questions") or []
            answers = question_answers(questions, answer.text)
            shown = "; ".join(f"“{a}”" for a in answers.values())
            decision = ToolDecision(True, updated_input=pending.tool_input | {"answers": answers})
            return decision, f"💬 Answered{by}: {shown}"
        what = pending.what()
        if answer.verdict == "deny":
            if not answer.by:  # nobody answered in time, or the run was stopped
                return ToolDecision(False, f"Denied: {answer.text}."), f"🚫 {what} denied: {answer.text}."
            reason = f": {answer.text}" if answer.text else ""
            message = f"The user denied this{reason}." if answer.text else "The user denied this."
            return ToolDecision(False, message), f"❌ {what} denied{by}{reason}."
        if answer.verdict == "always":
            rule = rule_text(rule_for(pending.tool_name, pending.tool_input))
            return ToolDecision(True), f"🔁 {what} allowed{by}; {rule} now run without asking in this conversation."
        return ToolDecision(True), f"✅ {what} allowed once{by}."

    def _request_text(self, pending: Pending) -> str:
        assert self._room is not None
        timeout = f"{self._room.approval_timeout_s:g} s"
        who = ", ".join(self.answerers) or "nobody (set allowed_users or approvers)"
        if pending.question:
            lines = ["❓ **The agent asks** (reply to this message to answer):"]
            for number, question in enumerate(pending.tool_input.get("questions") or [], start=1):
                lines.append(f"\n**{number}. {question.get('question', '')}**")
                options = question.get("options") or []
                lines += [f"{n}. {o.get('label', '')} — {o.get('description', '')}" for n, o in enumerate(options, 1)]
            lines.append(
                f"\nReply with an option's number or label, or in your own words; {DENY} declines. "
                f"Answers from: {who}. Waiting up to {timeout}."
            )
            return "\n".join(lines)
        always = rule_text(rule_for(pending.tool_name, pending.tool_input))
        return (
            f"🔐 **Approval needed: {pending.tool_name}**\n\n{summarize(pending.tool_name, pending.tool_input)}\n\n"
            f"React or reply: {ALLOW} `yes` allows once, {DENY} `no [reason]` denies, {ALWAYS} `always` allows "
            f"{always} for the rest of this conversation. Answers from: {who}. Denied if nobody answers within "
            f"{timeout}."
        )

    def cancel(self, reason: str) -> bool:
        pending = self.pending
        return pending is not None and self.answer(pending, Answer("deny", "", reason))

    def request_for(self, event_id: str) -> Pending | None:
        """The waiting request that `event_id` (the event of a reaction or reply) is about."""
        pending = self.pending
        if pending is None or self._batcher is None or self._batcher.event_of(pending.ref) != event_id:
            return None
        return pending

    def closed(self, event_id: str) -> str | None:
        """What became of an earlier request, if `event_id` is its event."""
        return self._closed.get(event_id)

    def answer(self, pending: Pending, answer: Answer) -> bool:
        """Give a waiting request its answer; False if it has one already."""
        if pending.answer.done():
            return False
        pending.answer.set_result(answer)
        return True
