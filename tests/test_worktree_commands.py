"""`!merge`, `!discard` (and its ✅) and `!status` in a room whose threads have worktrees, against a real git
repository and a worker that runs nothing."""

from pathlib import Path

import pytest

from aiagentchat.approvals import RoomToolPolicy
from aiagentchat.batcher import Notice
from aiagentchat.commands import Command, Commands
from aiagentchat.guard import ToolGuard
from aiagentchat.runner import RoomWorker
from aiagentchat.settings import ClaudeSettings, RoomSettings
from aiagentchat.store import Prompt
from aiagentchat.worktrees import Worktrees, branch_name
from tests.harness.git import git, make_repository

pytestmark = pytest.mark.anyio
ROOM = "!room:x"


class Room:
    """A batcher fake: keeps the notices, 'sends' those with a ref (an event id at once)."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.refs: dict[str, str] = {}

    async def put(self, item) -> None:
        if isinstance(item, Notice):
            self.notices.append(item)
            if item.ref is not None:
                self.refs[item.ref] = f"$sent{len(self.refs)}"

    def event_of(self, ref: str) -> str | None:
        return self.refs.get(ref)

    def forget(self, ref: str) -> str | None:
        return self.refs.pop(ref, None)


def setup(tmp_path: Path, store, workdir: Path, *, worktrees: bool = True) -> tuple[RoomSettings, RoomWorker, Room]:
    settings = RoomSettings(
        id=ROOM, allowed_users=["@u:x"], reply_mode="thread", session_scope="thread", worktrees=worktrees
    )
    claude, room = ClaudeSettings(), Room()
    trees = Worktrees(workdir, tmp_path / "trees", None) if worktrees else None
    worker = RoomWorker(
        ROOM, claude, workdir, store, room, RoomToolPolicy(claude), ToolGuard(tmp_path / "data", workdir),
        "thread", "thread", None, None, None, trees, 2,
    )  # fmt: skip
    return settings, worker, room


async def command(commands: Commands, settings, worker, room: Room, text: str, thread: str = "") -> Notice:
    asked = Prompt(ROOM, f"$cmd{len(room.notices)}", "@u:x", text, thread=thread)
    word, _, argument = text[1:].partition(" ")
    await commands.run(ROOM, settings, worker, asked, Command(word, argument))
    return room.notices[-1]


async def test_merge_and_discard_say_why_they_cannot_act_where_they_cannot(tmp_path, store):
    commands = Commands(store, tmp_path / "out")
    plain = tmp_path / "plain"
    plain.mkdir()
    for workdir, worktrees, thread, expected in [
        (make_repository(tmp_path / "repo"), True, "", "Send `!merge` in the thread whose work it is about"),
        (plain, True, "$t", "not a git checkout"),
        (plain, False, "$t", "Threads have no worktrees in this room"),
    ]:
        settings, worker, room = setup(tmp_path, store, workdir, worktrees=worktrees)
        assert expected in (await command(commands, settings, worker, room, "!merge", thread)).markdown
    settings, worker, room = setup(tmp_path, store, tmp_path / "repo")
    assert "no worktree or branch" in (await command(commands, settings, worker, room, "!discard", "$t")).markdown
    assert "no worktree" in (await command(commands, settings, worker, room, "!merge", "$t")).markdown


async def test_merge_waits_for_nothing_while_the_thread_is_busy(tmp_path, store):
    settings, worker, room = setup(tmp_path, store, make_repository(tmp_path / "repo"))
    await worker.worktrees.ensure("$t")
    async with worker.worktrees.lock("$t"):  # a prompt runs in the thread
        notice = await command(Commands(store, tmp_path / "out"), settings, worker, room, "!merge", "$t")
    assert notice.markdown.startswith("⛔ Not now") and notice.thread == "$t"


async def test_discard_asks_and_only_a_confirmation_of_that_question_discards(tmp_path, store):
    commands = Commands(store, tmp_path / "out")
    repo = make_repository(tmp_path / "repo")
    settings, worker, room = setup(tmp_path, store, repo)
    path = await worker.worktrees.ensure("$t")
    (path / "loose.txt").write_text("x\n")
    await store.set_session_id(f"{ROOM} $t", "session-1")
    question = await command(commands, settings, worker, room, "!discard", "$t")
    assert "React ✅ to this message" in question.markdown and "`loose.txt`" in question.markdown
    assert path.is_dir()  # nothing deleted by asking
    assert not await commands.confirmed(ROOM, worker, "$some-other-event", "@u:x")
    assert path.is_dir()
    assert await commands.confirmed(ROOM, worker, room.event_of(question.ref), "@u:x")
    done = room.notices[-1]
    assert done.markdown == f"🗑️ Discarded `{branch_name('$t')}` and its worktree." and done.thread == "$t"
    assert not path.exists() and git(repo, "branch", "--list", branch_name("$t")) == ""
    assert await store.session_id(f"{ROOM} $t") is None  # the thread starts afresh
    assert not await commands.confirmed(ROOM, worker, "$sent0", "@u:x")  # a question is confirmed once


async def test_status_lists_worktrees_idle_long_enough(tmp_path, store):
    settings, worker, room = setup(tmp_path, store, make_repository(tmp_path / "repo"))
    trees = worker.worktrees
    await trees.ensure("$old")
    await trees.ensure("$new")
    registry = trees._registry()
    registry[trees.path_of("$old").name]["used"] -= 20 * 86400
    trees._save(registry)
    status = (await command(Commands(store, tmp_path / "out"), settings, worker, room, "!status")).markdown
    assert "Threads running at once:** 0 of 2" in status
    assert f"`{branch_name('$old')}`: 20 days" in status and branch_name("$new") not in status
