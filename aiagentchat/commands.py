"""Room commands (`!help`, `!stop`, `!new`, `!status`, `!cost`, `!model`, `!get`, `!resume`, and in a room with
worktrees `!merge` and `!discard`): recognised in an allowed user's message and answered at once, even while a
prompt runs."""

from __future__ import annotations

import dataclasses
import datetime
import mimetypes
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from aiagentchat.approvals import rule_text
from aiagentchat.batcher import Notice
from aiagentchat.handover import HandoverError, Transcripts, session_id
from aiagentchat.runner import Lane, RoomWorker
from aiagentchat.settings import RoomSettings
from aiagentchat.store import Approval, Prompt, Store
from aiagentchat.uploads import FileRefused, copy_for_sending
from aiagentchat.worktrees import GitError, Worktrees, branch_name

log = structlog.get_logger(__name__)

_WORD = re.compile(r"([A-Za-z][\w-]*)(?:\s+(.*))?\Z", re.DOTALL)
COMMANDS = {
    "help": "this help",
    "stop": "interrupt the running prompt",
    "new": "start a fresh conversation with the next prompt",
    "status": "the running prompt, the queue, the session, the model and today's cost",
    "cost": "what this room's runs cost today and in all",
    "model NAME": "use model NAME for the next prompts (from the room's allowed list)",
    "get PATH": "send a file from the working directory",
    "resume ID": "go on with conversation ID, which `cchat adopt` copied here from a terminal",
    "merge": "in a thread with its own worktree: merge its branch into the room's checkout",
    "discard": "in a thread with its own worktree: remove the worktree and its branch (asks first)",
}
THREADED = {"stop", "merge", "discard"}  # they act on the thread they are posted in: given the whole command
CONFIRM = "✅"
CONFIRMING_KEPT = 20  # `!discard` questions a ✅ still confirms


@dataclass(frozen=True)
class Command:
    word: str  # lower case, without the prefix
    argument: str


def parse(body: str, prefix: str) -> Command | None:
    """The command in a message (`!word argument`), or None if the message is a prompt."""
    text = body.strip()
    if not text.startswith(prefix):
        return None
    match = _WORD.match(text[len(prefix) :])
    if match is None:
        return None
    return Command(match.group(1).lower(), (match.group(2) or "").strip())


def today_utc() -> datetime.datetime:
    """The start of the current budget day: midnight UTC."""
    return datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def usd(amount: float) -> str:
    """Dollars with the digits that matter: $12.34, $0.1234, $0.000075."""
    return f"${amount:.2f}" if amount >= 1 else f"${amount:.4f}" if amount >= 0.01 or amount == 0 else f"${amount:.6f}"


async def over_budget(store: Store, room_id: str, room: RoomSettings) -> str | None:
    """Why the room may not run another prompt today, or None."""
    if room.budget_usd_per_day is None:
        return None
    spent = await store.cost(room_id, since=today_utc())
    if spent < room.budget_usd_per_day:
        return None
    return (
        f"this room's budget of {usd(room.budget_usd_per_day)} per day is spent ({usd(spent)} today); "
        "prompts run again after 00:00 UTC"
    )


class Commands:
    """Answers the commands of one daemon's rooms; replies are notices in reply to the command."""

    def __init__(
        self,
        store: Store,
        scratch: Path,
        settings_lines: Callable[[str], Awaitable[list[str]]] | None = None,
        admin_commands: Callable[[str, str], Mapping[str, str]] | None = None,
    ) -> None:
        self._store = store
        self._scratch = scratch  # private copies of files on their way to the room
        self._settings_lines = settings_lines  # `!status`: where a room's settings come from
        self._admin_commands = admin_commands  # `!help`: (room id, sender) → the admin commands they may run there

    async def run(self, room_id: str, room: RoomSettings, worker: RoomWorker, asked: Prompt, command: Command) -> None:
        """Answer the command `asked` carries, in reply to it (in its thread, if it was posted in one)."""
        log.info("command", room_id=room_id, command=command.word, sender=asked.sender)
        notice = await self.answer(room_id, room, worker, asked.sender, command, asked)
        marker = notice.marker | {"command": asked.event_id}
        reply = {"reply_to": asked.event_id, "marker": marker, "thread": asked.thread or None}
        await worker.batcher.put(dataclasses.replace(notice, **reply))

    async def answer(
        self,
        room_id: str,
        room: RoomSettings,
        worker: RoomWorker,
        sender: str,
        command: Command,
        asked: Prompt | None = None,
    ) -> Notice:
        """What `command` from `sender` (a person, or the operator through the control socket) does and says;
        `asked`, the message that carried it, for the commands that act on its thread."""
        handler = getattr(self, f"_{command.word}", None) if command.word in _NAMES else None
        if handler is None:
            shown = help_text(room, self._admin(room_id, sender))
            return _answer(f"Unknown command `{room.command_prefix}{command.word}`.\n\n{shown}")
        if command.word in THREADED:
            if asked is None:
                return _answer(f"`{room.command_prefix}{command.word}` acts on the thread it is sent in.")
            return await handler(room_id, room, worker, asked, command.argument)
        return await handler(room_id, room, worker, sender, command.argument)

    def _admin(self, room_id: str, sender: str) -> Mapping[str, str]:
        return self._admin_commands(room_id, sender) if self._admin_commands is not None else {}

    async def _help(self, room_id: str, room: RoomSettings, worker: RoomWorker, sender: str, arg: str) -> Notice:
        return _answer(help_text(room, self._admin(room_id, sender)))

    async def _stop(self, room_id: str, room: RoomSettings, worker: RoomWorker, asked: Prompt, arg: str) -> Notice:
        if worker.stop(asked.sender, asked.thread or None):
            return _answer("🛑 Stopping the running prompt.")
        return _answer("Nothing is running.")

    async def _new(self, room_id: str, room: RoomSettings, worker: RoomWorker, sender: str, arg: str) -> Notice:
        worker.fresh = True
        later = " (the running prompt finishes in the current one)" if worker.current is not None else ""
        return _answer(f"🆕 The next prompt starts a new conversation{later}.")

    async def _status(self, room_id: str, room: RoomSettings, worker: RoomWorker, sender: str, arg: str) -> Notice:
        lines = []
        for runner in worker.running():
            running = runner.current
            assert running is not None
            excerpt = running.text.strip().splitlines()[0][:80] if running.text.strip() else "(empty)"
            age = time.time() - runner.current_since
            where = f" in `{branch_name(runner.thread)}`" if isinstance(runner, Lane) else ""
            lines.append(f"- **Running:** “{excerpt}” from {running.sender}, for {age:.0f} s{where}")
        if not lines:
            lines.append("- **Running:** nothing")
        if (waiting := worker.policy.pending) is not None:
            lines.append(f"- ✋ **Waiting for approval:** {waiting.what()}, asked {ago(waiting.asked_at)}")
        lines.append(f"- **Queued:** {worker.queued()}")
        if worker.worktrees is not None:
            lines += _worktree_lines(room, worker)
        session = await self._store.session_id(room_id)
        if room.session_scope == "thread":
            lines.append("- **Session:** one per thread; a new top-level message starts one")
        elif worker.fresh:
            lines.append("- **Session:** a new conversation starts with the next prompt")
        else:
            lines.append(f"- **Session:** `{session}`" if session else "- **Session:** none yet")
        lines.append(f"- **Model:** {worker.model or 'the CLI default'}")
        lines.append(f"- **Cost today (UTC):** {await self._cost_line(room_id, room)}")
        if (refusal := await over_budget(self._store, room_id, room)) is not None:
            lines.append(f"- ⛔ Prompts are refused: {refusal}.")
        if rules := await self._store.tool_rules(room_id):
            lines.append(f"- **Allowed in this conversation (🔁):** {', '.join(rule_text(rule) for rule in rules)}")
        if approvals := await self._store.approvals(room_id):
            lines.append("- **Latest approvals:**")
            lines += [f"  - {_approval_line(approval)}" for approval in approvals]
        if self._settings_lines is not None:
            lines += await self._settings_lines(room_id)
        return _answer("\n".join(lines))

    async def _cost(self, room_id: str, room: RoomSettings, worker: RoomWorker, sender: str, arg: str) -> Notice:
        total = await self._store.cost(room_id)
        return _answer(f"💰 Today (UTC): {await self._cost_line(room_id, room)}; in all: {usd(total)}.")

    async def _cost_line(self, room_id: str, room: RoomSettings) -> str:
        today = await self._store.cost(room_id, since=today_utc())
        if room.budget_usd_per_day is None:
            return usd(today)
        return f"{usd(today)} of {usd(room.budget_usd_per_day)} per day"

    async def _model(self, room_id: str, room: RoomSettings, worker: RoomWorker, sender: str, arg: str) -> Notice:
        allowed = ", ".join(f"`{name}`" for name in room.allowed_models) or "none (set `allowed_models`)"
        if not arg:
            return _answer(f"Model: {worker.model or 'the CLI default'}. Allowed here: {allowed}.")
        if arg not in room.allowed_models:
            return _answer(f"⛔ `{arg}` is not allowed in this room. Allowed here: {allowed}.")
        worker.model = arg
        await self._store.set_room_model(room_id, arg)
        return _answer(f"🧠 The next prompts use `{arg}`.")

    async def _get(self, room_id: str, room: RoomSettings, worker: RoomWorker, sender: str, arg: str) -> Notice:
        if not arg:
            return _answer(f"Usage: `{room.command_prefix}get PATH` (a file in the working directory).")
        try:
            copy, name = copy_for_sending(worker.workdir, arg, room.max_upload_bytes, self._scratch)
        except FileRefused as refused:
            return _answer(f"⛔ {refused}.")
        except OSError as exc:
            log.warning("get_failed", room_id=room_id, path=arg, error=str(exc))
            return _answer(f"⛔ `{arg}` could not be read: {exc.strerror or exc}.")
        mimetype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Notice("", f"📄 `{arg}`", {}, copy, name, mimetype)

    async def _resume(self, room_id: str, room: RoomSettings, worker: RoomWorker, sender: str, arg: str) -> Notice:
        """Take up a conversation whose transcript is in the room's home (put there by `cchat adopt`): its id
        becomes the room's session, and the next prompt's agent resumes it. The answer's marker says
        `resumed` when it did, for cchat."""
        if not arg:
            return _answer(f"Usage: `{room.command_prefix}resume ID`: {COMMANDS['resume ID']}.")
        try:
            session = session_id(arg)
        except HandoverError as exc:
            return _answer(f"⛔ {exc}.")
        if room.session_scope != "room":
            return _answer('⛔ This room keeps a conversation per thread (`session_scope = "thread"`): not here.')
        if worker.current is not None or (queued := worker.inbox.qsize()):
            busy = (
                "a prompt is running" if worker.current is not None else f"{queued} queued prompt{'s' * (queued != 1)}"
            )
            return _answer(f"⛔ Not now: {busy}. Resume once the room is idle.")
        home = worker.wall.home if worker.wall is not None else Path.home()
        try:
            present = Transcripts.in_home(home, worker.workdir).has(session)
        except (HandoverError, OSError) as exc:
            log.warning("resume_refused", room_id=room_id, session_id=session, error=str(exc))
            return _answer(f"⛔ The room's conversations cannot be read: {exc}.")
        if not present:
            return _answer(
                f"⛔ This room has no conversation `{session}` for its working directory: `cchat adopt` copies one "
                "here from a terminal."
            )
        await self._store.new_conversation(room_id)
        await self._store.set_session_id(room_id, session)
        worker.fresh, worker.restart = False, True
        log.info("conversation_adopted", room_id=room_id, session_id=session, by=sender)
        text = f"🔁 This room now goes on with conversation `{session}`: the next prompt resumes it."
        return Notice("", text, {"resumed": session})

    async def _merge(self, room_id: str, room: RoomSettings, worker: RoomWorker, asked: Prompt, arg: str) -> Notice:
        if (refused := _thread_refusal(room, worker, asked, "merge")) is not None:
            return _answer(refused)
        trees, thread = worker.worktrees, asked.thread
        assert trees is not None
        lock = trees.lock(thread)
        if lock.locked():
            return _answer("⛔ Not now: a prompt runs in this thread (or a merge or discard); try again after it.")
        async with lock:
            try:
                outcome = await trees.merge(thread, asked.sender)
            except GitError as exc:
                log.warning("merge_failed", room_id=room_id, thread=thread, error=str(exc))
                return _answer(f"❌ The merge failed: {exc}.")
        return _answer(outcome.message)

    async def _discard(self, room_id: str, room: RoomSettings, worker: RoomWorker, asked: Prompt, arg: str) -> Notice:
        if (refused := _thread_refusal(room, worker, asked, "discard")) is not None:
            return _answer(refused)
        trees, thread = worker.worktrees, asked.thread
        assert trees is not None
        if not trees.exists(thread) and not await _has_branch(trees, thread):
            return _answer("This thread has no worktree or branch to discard.")
        try:
            what = await trees.describe(thread)
        except GitError as exc:
            return _answer(f"❌ git failed: {exc}.")
        ref = f"discard:{asked.event_id}"
        trees.confirming[ref] = thread
        while len(trees.confirming) > CONFIRMING_KEPT:  # questions nobody answered: the oldest are forgotten
            oldest = next(iter(trees.confirming))
            del trees.confirming[oldest]
            worker.batcher.forget(oldest)
        question = (
            f"🗑️ Discard this thread's work? {what}. React {CONFIRM} to this message to remove the worktree "
            "and delete the branch; nothing is deleted without it."
        )
        return dataclasses.replace(_answer(question), ref=ref)

    async def confirmed(self, room_id: str, worker: RoomWorker, target: str, by: str) -> bool:
        """A ✅ from an allowed user on `target`: if that is a `!discard` request still waiting, discard the
        thread's worktree and branch and say so in the thread; False when `target` is no such request."""
        trees = worker.worktrees
        if trees is None:
            return False
        ref = next((ref for ref in trees.confirming if worker.batcher.event_of(ref) == target), None)
        if ref is None:
            return False
        thread = trees.confirming.pop(ref)
        worker.batcher.forget(ref)
        lock = trees.lock(thread)
        if lock.locked():
            message = "⛔ Not discarded: a prompt runs in this thread (or a merge); `!discard` again after it."
        else:
            async with lock:
                for lane in worker.workers(thread):
                    await lane._close_agent("worktree discarded")
                try:
                    outcome = await trees.discard(thread)
                    message = outcome.message
                except GitError as exc:
                    outcome, message = None, f"❌ The discard failed: {exc}."
                if outcome is not None and outcome.ok:  # its next prompt starts afresh, in a new worktree
                    await self._store.new_conversation(f"{room_id} {thread}")
        log.info("discard_confirmed", room_id=room_id, thread=thread, by=by)
        await worker.batcher.put(Notice(target, message, {"command": target}, thread=thread))
        return True


async def _has_branch(trees: Worktrees, thread: str) -> bool:
    known = await trees.git(trees.repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch_name(thread)}")
    return known.code == 0


def _thread_refusal(room: RoomSettings, worker: RoomWorker, asked: Prompt, word: str) -> str | None:
    """Why `!merge` or `!discard` cannot act here, or None."""
    if worker.worktrees is None:
        return '⛔ Threads have no worktrees in this room (`worktrees = true` with `session_scope = "thread"`).'
    if not worker.worktrees.available():
        return "⛔ The room's working directory is not a git checkout, so its threads have no worktrees."
    if not asked.thread:
        return f"⛔ Send `{room.command_prefix}{word}` in the thread whose work it is about."
    return None


def _worktree_lines(room: RoomSettings, worker: RoomWorker) -> list[str]:
    trees = worker.worktrees
    assert trees is not None
    if not trees.available():
        return ["- **Worktrees:** none: the working directory is not a git checkout (threads take turns in it)"]
    lines = [f"- **Threads running at once:** {len(worker.running())} of {worker.max_parallel}"]
    idle = trees.idle(room.worktree_idle_days)
    if idle:
        lines.append(
            f"- **Worktrees idle for {room.worktree_idle_days:g} days or more** (`!merge` or `!discard` them):"
        )
        lines += [f"  - `{tree.branch}`: {tree.days:.0f} days, `{tree.path}`" for tree in idle]
    return lines


_NAMES = {key.split()[0] for key in COMMANDS}


def _answer(markdown: str) -> Notice:
    """A reply's text; `run` fills in what it answers and its marker."""
    return Notice("", markdown, {})


def ago(at: float) -> str:
    seconds = max(0, time.time() - at)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


_VERDICTS = {"allow": "✅ allowed once", "always": "🔁 allowed for the conversation", "deny": "❌ denied"}


def _approval_line(approval: Approval) -> str:
    verdict = _VERDICTS.get(approval.verdict, approval.verdict)
    by = f" by {approval.by}" if approval.by else ""
    reason = f" ({approval.reason})" if approval.reason else ""
    return f"{approval.what}: {verdict}{by}{reason}, {ago(approval.at)}"


def help_text(room: RoomSettings, admin: Mapping[str, str] | None = None) -> str:
    """The room's commands and aliases; `admin`, the admin commands of a room made from the chat, for an admin."""
    prefix = room.command_prefix
    lines = ["**Commands**", *(f"- `{prefix}{name}`: {what}" for name, what in COMMANDS.items())]
    if admin:
        lines += [
            "",
            "**Admin commands** (a room made from the chat; you are one of the daemon's admins)",
            *(f"- `{prefix}{name}`: {what}" for name, what in admin.items()),
        ]
    if room.aliases:
        lines += ["", "**Aliases**", *(f"- `{prefix}{name}` → {text}" for name, text in room.aliases.items())]
    lines += [
        "",
        (
            "React 🛑 to a prompt to stop it (or drop it if it waits). Answer an approval request by reacting ✅ ❌ 🔁 "
            "or replying `yes`, `no [reason]`, `always`; answer the agent's question by replying. Anything else is "
            "a prompt."
        ),
    ]
    return "\n".join(lines)
