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

from aiagentchat.batcher import WAITING, Batcher, Block, Notice, React
from aiagentchat.metrics import Metrics
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
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # ASCII punctuation: CommonMark lets a backslash escape each
# Programs that run code given in their arguments (or run another program named there): a 🔁 rule for them
# would allow any code at all, so 🔁 allows such a command once. Not exhaustive: the sandbox is the wall.
SHELLS = {"sh", "bash", "zsh", "dash", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "busybox"}
INTERPRETERS = {
    "python", "pypy", "perl", "ruby", "php", "node", "nodejs", "deno", "bun", "lua", "luajit", "tclsh",
    "expect", "Rscript", "julia", "osascript", "awk", "gawk", "mawk", "nawk", "sed", "vim", "vi", "ex", "emacs",
}  # fmt: skip
WRAPPERS = {
    "env", "xargs", "sudo", "doas", "su", "runuser", "pkexec", "exec", "eval", "source", ".", "command",
    "builtin", "nohup", "timeout", "nice", "ionice", "time", "setsid", "stdbuf", "chroot", "unshare", "nsenter",
    "flock", "watch", "parallel", "strace", "ltrace", "gdb", "script", "taskset", "chrt",
}  # fmt: skip
PACKAGE_RUNNERS = {"npx", "pnpx", "bunx", "uvx"}
RUNNING_SUBCOMMANDS = {
    "npm": {"exec", "x"}, "pnpm": {"exec", "dlx"}, "yarn": {"exec", "dlx"}, "uv": {"run", "tool"},
    "pipx": {"run"}, "poetry": {"run"}, "pdm": {"run"}, "hatch": {"run"},
}  # fmt: skip
RUNNING_OPTIONS = {  # any word after the program: `git config` sets commands git runs (alias.*, core.fsmonitor)
    "find": {"-exec", "-execdir", "-ok", "-okdir"}, "git": {"-c", "--config-env", "--exec-path", "config"},
}  # fmt: skip
_KEYWORDS = {"!", "{", "if", "then", "else", "elif", "do", "while", "until"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)


@dataclass(frozen=True)
class ToolDecision:
    allow: bool
    message: str = ""
    updated_input: dict[str, Any] | None = None  # what the tool runs with, when it is not what was asked
    told: bool = False  # the room was already told of the decision


class ToolPolicy(Protocol):
    """Decides a `can_use_tool` request of the agent, asking people if it must."""

    pending: Pending | None  # the request waiting for a person's answer

    async def decide(
        self, prompt: Prompt, tool_name: str, tool_input: dict[str, Any], suggested: str | None = None
    ) -> ToolDecision: ...

    def cancel(self, reason: str, prompt_id: str | None = None) -> bool:
        """Deny the request waiting for an answer, if any (`!stop` while it waits), with `prompt_id` only if
        that prompt's run asked it; True if there was one."""
        ...


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    by: str
    text: str = ""  # a denial's reason, or the answer to a question


def reaction_verdict(key: str) -> Verdict | None:
    return _REACTIONS.get(key.replace("\ufe0f", "").strip())


def text_verdict(text: str, whole: bool = False) -> tuple[Verdict, str] | None:
    """`yes`, `no [reason]`, `always` (or their emoji) as the first word of a reply; None for anything else.
    `whole`: the answer must be the whole message, but for a denial's reason (`no, not there`): a message
    that is not a reply answers only so, and "ok, what about…" or "Always check with me…" stay prompts."""
    match = _ANSWER.match(text)
    if match is None:
        return None
    word = match.group(1).lower()
    verdict = _WORDS.get(word) or reaction_verdict(word)
    rest = (match.group(2) or "").strip()
    if verdict is None or (whole and rest and verdict != "deny"):
        return None
    return verdict, rest


def _visible(text: str) -> str:
    """`text` with each character that is not printable (a line break, an escape) written as its escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def escape(text: str) -> str:
    """`text` as one line of Markdown that shows as written: no character of it can start a construct."""
    return _PUNCTUATION.sub(r"\\\1", _visible(" ".join(text.split())))


def code(text: str) -> str:
    """`text` as a Markdown code span, whatever backticks or line breaks it holds."""
    text = _visible(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.strip(" ") and (text[0] in "` " or text[-1] in "` ") else ""  # CommonMark strips one
    return f"{ticks}{pad}{text or ' '}{pad}{ticks}"


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
            why = f"\n{escape(get('description'))}" if tool_input.get("description") else ""
            return _fence(get("command"), "sh") + why
        case "Write":
            content = get("content")
            size = f"{len(content.encode()):,} bytes, {len(content.splitlines())} lines"
            return f"{code(get('file_path'))} ({size})\n" + _fence(_excerpt(content))
        case "Edit":
            old = [f"- {line}" for line in get("old_string").splitlines()]
            new = [f"+ {line}" for line in get("new_string").splitlines()]
            every = " (every occurrence)" if tool_input.get("replace_all") else ""
            return f"{code(get('file_path'))}{every}\n" + _fence(_excerpt("\n".join(old + new)), "diff")
        case "WebFetch":
            return code(get("url")) + (f"\n{escape(get('prompt'))}" if tool_input.get("prompt") else "")
        case "WebSearch":
            return f"search for “{escape(get('query'))}”"
        case "NotebookEdit":
            return f"{code(get('notebook_path'))}\n" + _fence(_excerpt(get("new_source")))
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


def _programs(command: str) -> list[list[str]]:
    """Each simple command of `command` (between `;`, `&&`, `|`, `(`, line breaks…) as its program and its
    arguments, without the assignments, redirections and keywords in front. A command shlex cannot split (a
    quote in a here-document): each word, as if it were a program."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars="();<>|&\n")
        lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t\r", True, ""
        tokens = list(lexer)
    except ValueError:
        return [[word] for word in command.split()]
    found: list[list[str]] = [[]]
    target = False  # the next token is a redirection's target
    for token in tokens:
        current = found[-1]
        if target:
            target = False
        elif not token.strip(";&|()\n"):
            found.append([])
        elif not token.strip("<>&"):
            target = True
            if current and current[-1].isdigit():  # the `2` of `2>`
                current.pop()
        elif current or not (token in _KEYWORDS or _ASSIGNMENT.fullmatch(token)):
            current.append(token)
    return [words for words in found if words]


def runs_code(command: str) -> str | None:
    """What in `command` runs code given in its arguments: a program (`python3`, `sh`, `env`, `npx`), a
    program with an option or subcommand that does (`find -exec`, `git -c`, `git config`, `uv run`), a program
    named by a variable (`$X`), or a command substitution (`$(…)`); None when nothing does."""
    if any(mark in command for mark in ("$(", "`", "<(", ">(")):
        return "$(…)"
    for program, *rest in _programs(command):
        name = program.rsplit("/", 1)[-1]
        if name in SHELLS | WRAPPERS | PACKAGE_RUNNERS or name.rstrip("0123456789.") in INTERPRETERS:
            return name
        if program.startswith("$"):
            return program
        if rest and rest[0] in RUNNING_SUBCOMMANDS.get(name, ()):
            return f"{name} {rest[0]}"
        if option := next((word for word in rest if word in RUNNING_OPTIONS.get(name, ())), None):
            return f"{name} {option}"
    return None


def rule_for(tool_name: str, tool_input: dict[str, Any], suggested: str | None = None) -> str | None:
    """The conversation rule 🔁 records: the tool, or for Bash the rule the CLI suggested when it covers the
    command, else its command prefix (or the exact compound command); None for a Bash command that runs code
    given in its arguments, which 🔁 allows once only."""
    if tool_name != "Bash":
        return tool_name
    command = str(tool_input.get("command", ""))
    if runs_code(command) is not None:
        return None
    if suggested is not None and rule_allows(suggested, tool_name, tool_input):
        return suggested
    prefix = command_prefix(command)
    return f"Bash:{prefix}" if prefix is not None else f"Bash={command}"


def rule_allows(rule: str, tool_name: str, tool_input: dict[str, Any]) -> bool:
    """Whether `rule` covers the call: the tool's name; a Bash command's exact text (`Bash=`), or, for a simple
    command, its first words (`Bash:git commit` covers `git commit -m x`)."""
    if tool_name != "Bash":
        return rule == tool_name
    command = str(tool_input.get("command", ""))
    if runs_code(command) is not None:  # never, whatever rule an earlier version recorded
        return False
    if rule.startswith("Bash="):
        return rule[len("Bash=") :] == command
    if not rule.startswith("Bash:") or command_prefix(command) is None:
        return False
    words, wanted = shlex.split(command), rule[len("Bash:") :].split()
    return bool(wanted) and words[: len(wanted)] == wanted


def suggested_rule(suggestions: Any) -> str | None:
    """The rule the CLI suggests with a Bash permission request (2.1.197: `permission_suggestions`, whose entry
    `{"type": "addRules", "behavior": "allow", "rules": [{"toolName": "Bash", "ruleContent": "git commit *"}]}`
    names a prefix with ` *`, or an exact command), as a conversation rule; None when it suggests none."""
    for suggestion in suggestions if isinstance(suggestions, list) else []:
        if isinstance(suggestion, dict) and (content := _bash_rule_content(suggestion)) is not None:
            return f"Bash:{content[:-2].strip()}" if content.endswith(" *") else f"Bash={content}"
    return None


def _bash_rule_content(suggestion: dict[str, Any]) -> str | None:
    """The `ruleContent` of a suggestion that allows exactly one Bash rule, else None."""
    if suggestion.get("type") != "addRules" or suggestion.get("behavior") != "allow":
        return None
    rules = suggestion.get("rules") if isinstance(suggestion.get("rules"), list) else []
    bash = [rule for rule in rules if isinstance(rule, dict) and rule.get("toolName") == "Bash"]
    content = bash[0].get("ruleContent") if len(bash) == 1 else None
    return content if isinstance(content, str) and content.strip() not in ("", "*") else None


def rule_text(rule: str) -> str:
    if rule.startswith("Bash:"):
        return f"Bash commands starting with {code(rule[len('Bash:') :])}"
    if rule.startswith("Bash="):
        return f"the Bash command {code(rule[len('Bash=') :])}"
    return escape(rule)


def once_only(tool_input: dict[str, Any]) -> str:
    """Why 🔁 allows this Bash command once only."""
    program = runs_code(str(tool_input.get("command", ""))) or ""
    return f"🔁 never covers {code(program)}: its arguments can make it run any code, so it is asked each time"


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
    suggested: str | None = None  # the rule the CLI suggests for 🔁, if any
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    asked_at: float = field(default_factory=time.time)
    answer: asyncio.Future[Answer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def rule(self) -> str | None:
        """What 🔁 would allow for the rest of the conversation; None: a question, or allowed once only."""
        return None if self.question else rule_for(self.tool_name, self.tool_input, self.suggested)

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
            return escape(self.tool_name)
        return f"{escape(self.tool_name)} {code(target if len(target) <= 200 else target[:199] + '…')}"


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
        metrics: Metrics | None = None,
    ) -> None:
        self._allowed = set(claude.allowed_tools)
        self._room = room if room is not None and room.unlisted_tools == "ask" else None
        self._room_id = room_id
        self._store = store
        self._batcher = batcher
        self._metrics = metrics or Metrics()  # the daemon's; one of its own in tests
        self.pending: Pending | None = None
        self._asking = asyncio.Lock()  # one request waits at a time; runs in parallel threads take turns
        self._closed: collections.OrderedDict[str, str] = collections.OrderedDict()  # request event id → outcome

    def update(self, claude: ClaudeSettings, room: RoomSettings) -> None:
        """The room's settings changed from the chat (`!allow`, `!tools`): decide by the new ones from now on."""
        self._allowed = set(claude.allowed_tools)
        self._room = room if room.unlisted_tools == "ask" else None

    @property
    def answerers(self) -> list[str]:
        room = self._room
        return [] if room is None else room.approvers or room.allowed_users

    async def decide(
        self, prompt: Prompt, tool_name: str, tool_input: dict[str, Any], suggested: str | None = None
    ) -> ToolDecision:
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
        pending = Pending(prompt.event_id, tool_name, tool_input, question, thread, suggested)
        return await self._ask(prompt, pending)

    async def _ask(self, prompt: Prompt, pending: Pending) -> ToolDecision:
        async with self._asking:
            return await self._ask_now(prompt, pending)

    async def _ask_now(self, prompt: Prompt, pending: Pending) -> ToolDecision:
        assert self._room is not None and self._store is not None and self._batcher is not None
        room, batcher = self._room, self._batcher
        pending.asked_at, self.pending = time.time(), pending
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
        rule = pending.rule()
        verdict = "allow" if answer.verdict == "always" and rule is None else answer.verdict
        async with self._store.transaction():  # a 🔁 rule is never kept without the decision that made it
            if verdict == "always" and rule is not None:
                await self._store.add_tool_rule(prompt.conversation(room.session_scope), rule, answer.by)
            await self._store.add_approval(
                self._room_id, prompt.event_id, pending.what(), verdict, answer.by, answer.text
            )
        log.info("approval_answered", tool=pending.tool_name, verdict=answer.verdict, by=answer.by or None)
        self._metrics.approvals.labels(answer.verdict if answer.by else "unanswered").inc()
        await batcher.put(Block(prompt.event_id, outcome, "tool"))
        await batcher.put(React(prompt.event_id, None))
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
            rule = pending.rule()
            if rule is None:
                return ToolDecision(True), f"✅ {what} allowed once{by} ({once_only(pending.tool_input)})."
            rules = rule_text(rule)
            return ToolDecision(True), f"🔁 {what} allowed{by}; {rules} now run without asking in this conversation."
        return ToolDecision(True), f"✅ {what} allowed once{by}."

    def _request_text(self, pending: Pending) -> str:
        assert self._room is not None
        timeout = f"{self._room.approval_timeout_s:g} s"
        who = ", ".join(self.answerers) or "nobody (set allowed_users or approvers)"
        if pending.question:
            lines = ["❓ **The agent asks** (reply to this message to answer):"]
            for number, question in enumerate(pending.tool_input.get("questions") or [], start=1):
                lines.append(f"\n**{number}. {escape(str(question.get('question', '')))}**")
                options = question.get("options") or []
                lines += [
                    f"{n}. {escape(str(o.get('label', '')))} — {escape(str(o.get('description', '')))}"
                    for n, o in enumerate(options, 1)
                ]
            lines.append(
                f"\nReply with an option's number or label, or in your own words; {DENY} declines. "
                f"Answers from: {who}. Waiting up to {timeout}."
            )
            return "\n".join(lines)
        rule = pending.rule()
        always = (
            f"{ALWAYS} (a reaction, or `always` in a reply) allows {rule_text(rule)} for the rest of this conversation"
            if rule is not None
            else once_only(pending.tool_input)
        )
        return (
            f"🔐 **Approval needed: {escape(pending.tool_name)}**\n\n"
            f"{summarize(pending.tool_name, pending.tool_input)}\n\n"
            f"React or reply: {ALLOW} `yes` allows once, {DENY} `no [reason]` denies; {always}. "
            f"Answers from: {who}. Denied if nobody answers within {timeout}."
        )

    def cancel(self, reason: str, prompt_id: str | None = None) -> bool:
        pending = self.pending
        if pending is None or (prompt_id is not None and pending.prompt_id != prompt_id):
            return False
        return self.answer(pending, Answer("deny", "", reason))

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
