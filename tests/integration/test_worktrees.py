"""Threads as parallel tasks, end to end (real Synapse, real CLI in its sandbox, scripted model, a real git
repository made here): two threads write different files at the same time, each in its own worktree; `!merge`
in each brings both into the main checkout; a conflicting third is reported and changes nothing; `!discard`
removes a worktree and its branch once ✅ confirms it; after a restart a thread goes on in its worktree."""

from pathlib import Path

import pytest

from aiagentchat.worktrees import branch_name
from tests.harness.git import git, make_repository, merging
from tests.integration.test_approval import ended
from tests.integration.test_conversation import react, replies
from tests.integration.test_threads import in_thread

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def worktrees(repo: Path) -> dict[str, Path]:
    """The repository's worktrees other than the main checkout, by branch."""
    found, path = {}, None
    for line in git(repo, "worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            path = Path(line.removeprefix("worktree "))
        elif line.startswith("branch refs/heads/") and path != repo:
            found[line.removeprefix("branch refs/heads/")] = path
    return found


def checkout_state(repo: Path) -> tuple[str, str, dict[str, str]]:
    files = {str(p.relative_to(repo)): p.read_text() for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts}
    return git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain", "--untracked-files=all"), files


async def in_its_thread(world, room: str, root: str, text: str) -> str:
    """Send `text` in the thread of `root`; the body of the bot's reply."""
    sent = await world.user.send_text(room, text, **in_thread(root, root))
    events = await world.user.wait_for(lambda ev: replies(ev, world.bot_id, sent), timeout=60, room_id=room)
    (answer,) = replies(events, world.bot_id, sent)
    assert answer["content"]["m.relates_to"]["event_id"] == root  # answered in the thread
    return answer["content"]["body"]


async def test_two_threads_work_at_once_in_their_worktrees_and_merge_and_a_conflicting_third_changes_nothing(world):
    repo = make_repository(world.tmp_path / "project")
    room = await world.room()
    settings = {"reply_mode": "thread", "session_scope": "thread", "worktrees": True, "allowed_tools": ["Bash"]}
    daemon = world.daemon([{"id": room, "workdir": str(repo)} | settings])
    await daemon.start()

    # the first holds its model call at the gate until the second's has arrived: they can only both end if the
    # second thread started while the first still ran
    first = await world.user.send_text(room, "gate g1 bash echo one > one.txt && git add one.txt && git commit -qm one")
    second = await world.user.send_text(room, "open g1 bash echo two > two.txt")
    first_said, second_said = await ended(world, room, first, timeout=90), await ended(world, room, second, timeout=90)
    assert "tool said" in first_said and "never opened" not in first_said and "tool said" in second_said

    trees = worktrees(repo)
    assert set(trees) == {branch_name(first), branch_name(second)}
    one, two = trees[branch_name(first)], trees[branch_name(second)]
    assert not one.is_relative_to(repo) and not two.is_relative_to(repo)
    assert (one / "one.txt").read_text() == "one\n" and not (one / "two.txt").exists()
    assert (two / "two.txt").read_text() == "two\n" and not (two / "one.txt").exists()
    assert git(one, "log", "-1", "--format=%s") == "one"  # the agent committed in its worktree, from its wall
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""  # the main checkout saw nothing
    assert not (repo / "one.txt").exists() and not (repo / "two.txt").exists()

    # a third thread, made from the same main commit, writes one.txt otherwise
    third = await world.user.send_text(room, "bash echo three > one.txt && git add one.txt && git commit -qm three")
    assert "tool said" in await ended(world, room, third, timeout=90)

    merged = await in_its_thread(world, room, first, "!merge")
    assert f"Merged `{branch_name(first)}` into `main` (fast-forward)" in merged
    merged = await in_its_thread(world, room, second, "!merge")
    assert merged.startswith("📝 First committed") and "`two.txt`" in merged and "merge commit" in merged
    assert (repo / "one.txt").read_text() == "one\n" and (repo / "two.txt").read_text() == "two\n"
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""

    before = checkout_state(repo)
    refused = await in_its_thread(world, room, third, "!merge")
    assert "was not merged into `main`: a conflict in `one.txt`" in refused
    assert "Nothing in the room's checkout changed" in refused
    assert checkout_state(repo) == before
    assert not merging(repo)

    asked = await world.user.send_text(room, "!discard", **in_thread(third, third))
    events = await world.user.wait_for(lambda ev: replies(ev, world.bot_id, asked), timeout=60, room_id=room)
    (question,) = replies(events, world.bot_id, asked)
    assert "1 commit(s) not in `main`" in question["content"]["body"] and "React ✅" in question["content"]["body"]
    assert branch_name(third) in worktrees(repo)  # nothing deleted yet
    await react(world.user, room, question["event_id"], "✅")
    events = await world.user.wait_for(
        lambda ev: replies(ev, world.bot_id, question["event_id"]), timeout=60, room_id=room
    )
    (done,) = replies(events, world.bot_id, question["event_id"])
    assert done["content"]["body"] == f"🗑️ Discarded `{branch_name(third)}` and its worktree."
    assert branch_name(third) not in worktrees(repo) and git(repo, "branch", "--list", branch_name(third)) == ""
    assert checkout_state(repo) == before

    # after a restart a thread goes on in its worktree, with its conversation
    assert await daemon.stop() == 0
    await daemon.start()
    again = await world.user.send_text(room, "recall", **in_thread(second, second))
    recalled = await ended(world, room, again, timeout=90)
    assert "open g1 bash echo two > two.txt" in recalled and "gate g1" not in recalled
    assert set(worktrees(repo)) == {branch_name(first), branch_name(second)}
