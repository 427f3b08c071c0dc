"""The git side of threads as parallel tasks, against real git repositories made in tmp dirs: branch names,
worktrees made, merged (fast-forward, merge commit, conflict that changes nothing), discarded, listed as idle."""

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiagentchat.worktrees import BRANCH_PREFIX, Git, GitError, Worktrees, branch_name, short_name
from tests.harness.git import git, make_repository, merging

pytestmark = pytest.mark.anyio


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "project")


@pytest.fixture
def trees(repo: Path, tmp_path: Path) -> Worktrees:
    return Worktrees(repo, tmp_path / "data" / "worktrees" / "room", None, timeout_s=30)


def commit_in(path: Path, name: str, text: str) -> str:
    (path / name).write_text(text)
    git(path, "add", name)
    git(path, "commit", "--quiet", "-m", f"{name}: {text.strip()}")
    return git(path, "rev-parse", "HEAD")


def state(repo: Path) -> tuple[str, str, dict[str, str]]:
    """HEAD, `git status`, and every file of the checkout: what a refused merge must leave as it was."""
    files = {str(p.relative_to(repo)): p.read_text() for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts}
    return git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain", "--untracked-files=all"), files


@given(st.text(max_size=80))
def test_a_branch_name_is_short_safe_and_accepted_by_git_whatever_the_event_id(event_id):
    if not event_id:
        with pytest.raises(ValueError):
            short_name(event_id)
        return
    name = short_name(event_id)
    assert re.fullmatch(r"[A-Za-z0-9]{0,10}-?[0-9a-f]{8}", name) and len(name) <= 19
    assert branch_name(event_id) == BRANCH_PREFIX + name


@pytest.mark.parametrize("event_id", ["$AbC-dEf_123:example.org", "../../etc/passwd", "-x --force", "a\nb", "$é✓"])
def test_git_accepts_the_branch_of_hostile_event_ids(event_id):
    checked = subprocess.run(
        ["git", "check-ref-format", "--branch", branch_name(event_id)], check=False, capture_output=True
    )
    assert checked.returncode == 0
    assert "/" not in short_name(event_id) and ".." not in short_name(event_id)


def test_the_name_is_readable_and_two_ids_alike_in_their_letters_still_differ():
    assert short_name("$AbCdEf123456:example.org").startswith("AbCdEf1234-")
    assert short_name("$abc!") != short_name("$abc?")


async def test_a_worktree_is_made_on_its_own_branch_from_head_once_and_stays_out_of_the_checkout(repo, trees):
    path = await trees.ensure("$root1")
    assert path.parent == trees.root and not path.is_relative_to(repo)
    assert git(path, "symbolic-ref", "--short", "HEAD") == branch_name("$root1")
    assert git(path, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
    assert (path / "README").read_text() == "hello\n"
    assert await trees.ensure("$root1") == path  # the second prompt of the thread: the same one
    commit_in(path, "a.txt", "from the thread\n")
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""  # nothing new in the main checkout
    assert git(repo, "rev-parse", "main") != git(repo, "rev-parse", branch_name("$root1"))


async def test_a_worktree_removed_by_hand_is_made_again_on_its_branch_with_its_commits(repo, trees):
    path = await trees.ensure("$root1")
    tip = commit_in(path, "a.txt", "kept\n")
    git(repo, "worktree", "remove", "--force", str(path))
    assert await trees.ensure("$root1") == path
    assert git(path, "rev-parse", "HEAD") == tip


async def test_a_checkout_without_commits_gives_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "--quiet")
    trees = Worktrees(empty, tmp_path / "trees", None)
    with pytest.raises(GitError, match="could not make the worktree"):
        await trees.ensure("$root1")


async def test_available_only_at_the_top_of_a_git_checkout(repo, tmp_path):
    assert Worktrees(repo, tmp_path / "t", None).available()
    assert not Worktrees(repo / "sub", tmp_path / "t", None).available()
    assert not Worktrees(tmp_path, tmp_path / "t", None).available()


async def test_merge_fast_forwards_when_the_checkout_has_not_moved(repo, trees):
    path = await trees.ensure("$root1")
    tip = commit_in(path, "a.txt", "one\n")
    outcome = await trees.merge("$root1", "@alice:x")
    assert outcome.ok and "fast-forward" in outcome.message and "`a.txt`" in outcome.message
    assert git(repo, "rev-parse", "HEAD") == tip and (repo / "a.txt").read_text() == "one\n"
    again = await trees.merge("$root1", "@alice:x")
    assert again.ok and "already has everything" in again.message


async def test_merge_makes_a_merge_commit_when_both_moved(repo, trees):
    path = await trees.ensure("$root1")
    tip = commit_in(path, "a.txt", "one\n")
    main_tip = commit_in(repo, "b.txt", "two\n")
    outcome = await trees.merge("$root1", "@alice:x")
    assert outcome.ok and "merge commit" in outcome.message
    assert git(repo, "rev-parse", "HEAD^1") == main_tip and git(repo, "rev-parse", "HEAD^2") == tip
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "main"
    assert "@alice:x" in git(repo, "log", "-1", "--format=%s")
    assert (repo / "a.txt").read_text() == "one\n" and (repo / "b.txt").read_text() == "two\n"


async def test_work_left_uncommitted_in_the_thread_is_committed_first_and_said_so(repo, trees):
    path = await trees.ensure("$root1")
    (path / "new.txt").write_text("not committed\n")
    (path / "README").write_text("changed\n")
    outcome = await trees.merge("$root1", "@alice:x")
    assert outcome.ok and outcome.message.startswith("📝") and "`new.txt`" in outcome.message
    assert git(path, "status", "--porcelain") == ""
    assert "Work left uncommitted in thread $root1" in git(path, "log", "-1", "--format=%B")
    assert (repo / "new.txt").read_text() == "not committed\n" and (repo / "README").read_text() == "changed\n"


async def test_a_dirty_main_checkout_is_refused_with_its_files_and_nothing_is_committed_anywhere(repo, trees):
    path = await trees.ensure("$root1")
    (path / "wip.txt").write_text("thread work\n")
    (repo / "README").write_text("edited by hand\n")
    before, thread_head = state(repo), git(path, "rev-parse", "HEAD")
    outcome = await trees.merge("$root1", "@alice:x")
    assert not outcome.ok and "uncommitted changes" in outcome.message and "`README`" in outcome.message
    assert state(repo) == before
    assert git(path, "rev-parse", "HEAD") == thread_head and (path / "wip.txt").exists()


async def test_a_conflict_is_reported_with_its_files_and_leaves_the_checkout_as_it_was(repo, trees):
    path = await trees.ensure("$root1")
    commit_in(path, "README", "thread's\n")
    commit_in(path, "c.txt", "thread's c\n")
    commit_in(repo, "README", "main's\n")
    commit_in(repo, "c.txt", "main's c\n")
    before = state(repo)
    outcome = await trees.merge("$root1", "@alice:x")
    assert not outcome.ok and "conflict" in outcome.message
    assert "`README`" in outcome.message and "`c.txt`" in outcome.message
    assert "Nothing in the room's checkout changed" in outcome.message
    assert state(repo) == before
    assert not merging(repo)


async def test_merge_refuses_a_detached_checkout_and_a_thread_without_worktree(repo, trees):
    assert "no worktree" in (await trees.merge("$never", "@a:x")).message
    await trees.ensure("$root1")
    git(repo, "checkout", "--quiet", "--detach")
    outcome = await trees.merge("$root1", "@a:x")
    assert not outcome.ok and "detached HEAD" in outcome.message


async def test_discard_removes_the_worktree_and_its_branch_and_says_what_it_would_lose_first(repo, trees):
    path = await trees.ensure("$root1")
    commit_in(path, "a.txt", "one\n")
    (path / "loose.txt").write_text("x\n")
    described = await trees.describe("$root1")
    assert "1 commit(s) not in `main`" in described and "`loose.txt`" in described
    outcome = await trees.discard("$root1")
    assert outcome.ok and not path.exists() and not trees.exists("$root1")
    assert git(repo, "branch", "--list", branch_name("$root1")) == ""
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert trees.idle(0) == []


async def test_worktrees_of_threads_idle_long_enough_are_listed_longest_first_and_kept(repo, trees):
    for thread in ("$old", "$older", "$fresh"):
        await trees.ensure(thread)
    now = trees._registry()[short_name("$fresh")]["used"]
    registry = trees._registry()
    registry[short_name("$old")]["used"] = now - 15 * 86400
    registry[short_name("$older")]["used"] = now - 30 * 86400
    trees._save(registry)
    idle = trees.idle(14, now=now)
    assert [(tree.thread, round(tree.days)) for tree in idle] == [("$older", 30), ("$old", 15)]
    assert idle[0].branch == branch_name("$older") and idle[0].path.is_dir()
    assert all(trees.exists(thread) for thread in ("$old", "$older", "$fresh"))
    trees.touch("$older")  # a new prompt in it
    assert [tree.thread for tree in trees.idle(14)] == ["$old"]


async def test_a_registry_that_is_not_json_lists_nothing_and_is_written_afresh(repo, trees):
    await trees.ensure("$root1")
    (trees.root / "threads.json").write_text("{not json")
    assert trees.idle(0) == []
    trees.touch("$root1")
    assert [tree.thread for tree in trees.idle(0)] == ["$root1"]


async def test_git_that_takes_too_long_is_stopped(repo):
    slow = Git(None, timeout_s=0.5)
    with pytest.raises(GitError, match="took longer than 0.5 s"):
        await slow(repo, "-c", "alias.wait=!sleep 10", "wait")
