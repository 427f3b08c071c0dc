"""Threads as parallel tasks: each thread of a room with `worktrees = true` works in a git worktree of its own,
on its own branch (`aiagentchat/<name>`), made on the thread's first prompt; `!merge` brings the branch into
the branch the room's checkout is on, `!discard` removes it.

Where they live: `data_dir/worktrees/<room digest>/<checkout digest>/<name>`, outside the room's checkout, so they never show
up there as untracked files. A thread's agent is walled in with its worktree as its working directory and
the repository's `.git` read-write (where its commits go), and sees neither the main checkout nor the other
threads' files.

git runs without a shell and with a time limit. Whatever it does in the repository runs inside the room's wall
when the room has one: the repository's configuration, hooks and attributes (filters, merge drivers) are the
agent's to write, so what they name must run with the agent's rights, never the daemon's."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from aiagentchat.processes import terminate_tree
from aiagentchat.sandbox import Wall, prepare_home

log = structlog.get_logger(__name__)

GIT_TIMEOUT_S = 60.0
BRANCH_PREFIX = "aiagentchat/"
REGISTRY = "threads.json"  # name → {"thread": root event id, "used": seconds since the epoch}
FALLBACK_IDENTITY = ("-c", "user.name=aiagentchat", "-c", "user.email=aiagentchat@localhost")
SHOWN_FILES = 10  # a list of files in a message is cut after this many
KILL_WAIT_S = 3.0


class GitError(Exception):
    """git could not be run, took too long, or failed where it must not."""


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str

    def why(self) -> str:
        """git's own explanation (its last lines), for the room."""
        lines = [line for line in (self.err or self.out).strip().splitlines() if line.strip()]
        return " ".join(lines[-3:])[-500:] or f"exit code {self.code}"


@dataclass(frozen=True)
class Outcome:
    """What a merge or discard did, for the room: `ok` False when it was refused or failed (nothing changed)."""

    ok: bool
    message: str


@dataclass(frozen=True)
class Idle:
    thread: str
    branch: str
    path: Path
    days: float


def short_name(thread: str) -> str:
    """A short name for a thread, safe as a directory and in a branch name whatever the event id holds: up to
    10 of its ASCII letters and digits, then 8 hex digits of its SHA-256 (so two ids never share one)."""
    if not isinstance(thread, str) or not thread:
        raise ValueError("a thread is named by the event id of its root")
    readable = "".join(ch for ch in thread if ch.isascii() and ch.isalnum())[:10]
    digest = hashlib.sha256(thread.encode()).hexdigest()[:8]
    return f"{readable}-{digest}" if readable else digest


def branch_name(thread: str) -> str:
    return BRANCH_PREFIX + short_name(thread)


def _not_merged(reason: str) -> Outcome:
    return Outcome(False, f"⛔ Not merged: {reason}.")


def file_list(names: list[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:SHOWN_FILES])
    return shown + (f" and {len(names) - SHOWN_FILES} more" if len(names) > SHOWN_FILES else "")


def _names(porcelain: str) -> list[str]:
    """The paths in `git status --porcelain -z` output (a rename's old name skipped)."""
    names, entries = [], iter(porcelain.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        names.append(entry[3:])
        if entry[0] in "RC":
            next(entries, None)
    return names


class Git:
    """Runs git for one room, inside `wall` when the room has one."""

    def __init__(self, wall: Wall | None, timeout_s: float = GIT_TIMEOUT_S) -> None:
        self.wall = wall
        self.timeout_s = timeout_s

    async def __call__(self, cwd: Path, *args: str) -> Done:
        binary = shutil.which("git")
        if binary is None:
            raise GitError("git is not installed on the daemon's machine")
        command = [binary, "-C", str(cwd), *args]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8",
            "GIT_TERMINAL_PROMPT": "0",
        }
        if self.wall is not None:
            prepare_home(self.wall)
            command, env["HOME"] = self.wall.argv(command), str(self.wall.home)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise GitError(f"git could not be run: {exc.strerror or exc}") from exc
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            await terminate_tree(proc, KILL_WAIT_S)
            raise GitError(f"git {args[0]} took longer than {self.timeout_s:g} s and was stopped") from None
        done = Done(proc.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        log.debug("git", args=args[:2], code=done.code)
        return done


class Worktrees:
    """The worktrees of one room's threads. `repo`: the room's working directory (the main checkout);
    `root`: the directory they live in; `wall`: the room's, if it has one."""

    def __init__(self, repo: Path, root: Path, wall: Wall | None, timeout_s: float = GIT_TIMEOUT_S) -> None:
        self.repo = repo
        self.root = root
        self.git_dir = repo / ".git"
        # git in the room's wall reaches the main checkout (its workdir) and the worktrees
        self.git = Git(None if wall is None else dataclasses.replace(wall, writable=(*wall.writable, root)), timeout_s)
        self._locks: dict[str, asyncio.Lock] = {}
        self.confirming: dict[str, str] = {}  # `!discard` requests waiting for ✅: the notice's ref → thread

    def available(self) -> bool:
        """Whether the working directory is the top of a git repository (its `.git` a directory here)."""
        return self.git_dir.is_dir()

    def path_of(self, thread: str) -> Path:
        return self.root / short_name(thread)

    def exists(self, thread: str) -> bool:
        return (self.path_of(thread) / ".git").is_file()

    def lock(self, thread: str) -> asyncio.Lock:
        """Held while the thread's worktree is in use: a prompt running in it, a merge or a discard."""
        return self._locks.setdefault(thread, asyncio.Lock())

    def lane_wall(self, wall: Wall, path: Path) -> Wall:
        """The wall of a thread's agent: its worktree as the working directory, the repository's .git too."""
        return dataclasses.replace(wall, workdir=path, writable=(*wall.writable, self.git_dir))

    async def ensure(self, thread: str) -> Path:
        """The thread's worktree, made (with its branch, from the checkout's HEAD) if it is not there yet."""
        path, branch = self.path_of(thread), branch_name(thread)
        if not self.exists(thread):
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            await self.git(self.repo, "worktree", "prune")
            known = await self.git(self.repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}")
            if known.code == 0:  # the worktree went, the branch stayed: check it out again
                args = ["worktree", "add", "--quiet", str(path), branch]
            else:
                args = ["worktree", "add", "--quiet", "-b", branch, str(path), "HEAD"]
            made = await self.git(self.repo, *args)
            if made.code != 0:
                raise GitError(f"git could not make the worktree: {made.why()}")
            log.info("worktree_made", thread=thread, branch=branch, path=str(path))
        self.touch(thread)
        return path

    def touch(self, thread: str) -> None:
        """Note that the thread was used now (for `idle`)."""
        registry = self._registry()
        registry[short_name(thread)] = {"thread": thread, "used": time.time()}
        self._save(registry)

    def idle(self, days: float, now: float | None = None) -> list[Idle]:
        """The worktrees whose thread has had no prompt for `days` days, longest idle first."""
        now = time.time() if now is None else now
        found = []
        for name, entry in self._registry().items():
            thread, used = entry.get("thread"), entry.get("used")
            if not isinstance(thread, str) or not isinstance(used, int | float) or not self.exists(thread):
                continue
            if (idle_days := (now - used) / 86400) >= days:
                found.append(Idle(thread, BRANCH_PREFIX + name, self.path_of(thread), idle_days))
        return sorted(found, key=lambda idle: -idle.days)

    def _registry(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads((self.root / REGISTRY).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("worktree_registry_unreadable", path=str(self.root / REGISTRY), error=str(exc))
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def _save(self, registry: dict[str, dict[str, object]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.root / f".{REGISTRY}.tmp"
        temporary.write_text(json.dumps(registry, indent=1), encoding="utf-8")
        temporary.replace(self.root / REGISTRY)

    async def changes(self, cwd: Path, *, untracked: bool) -> list[str]:
        """The files with changes not committed in `cwd` (with `untracked`, new files too)."""
        mode = "--untracked-files=all" if untracked else "--untracked-files=no"
        status = await self.git(cwd, "status", "--porcelain=v1", "-z", mode)
        if status.code != 0:
            raise GitError(f"git status failed in {cwd}: {status.why()}")
        return _names(status.out)

    async def _identity(self, cwd: Path) -> tuple[str, ...]:
        """Who commits: the repository's (or the home's) user, else `aiagentchat`."""
        email = await self.git(cwd, "config", "user.email")
        return () if email.code == 0 and email.out.strip() else FALLBACK_IDENTITY

    async def _head(self, cwd: Path, ref: str = "HEAD") -> str:
        head = await self.git(cwd, "rev-parse", "--verify", "--quiet", ref)
        if head.code != 0:
            raise GitError(f"git could not read {ref}: {head.why()}")
        return head.out.strip()

    async def merge(self, thread: str, by: str) -> Outcome:
        """Merge the thread's branch into the branch the main checkout is on (fast-forward or a merge commit).
        Work left uncommitted in the worktree is committed first; a main checkout with changes of its own is
        refused; a conflict is undone (`git merge --abort`) and its files named."""
        path, branch = self.path_of(thread), branch_name(thread)
        if not self.exists(thread):
            return _not_merged("this thread has no worktree (nothing ran in it yet, or it was discarded)")
        target = await self.git(self.repo, "symbolic-ref", "--quiet", "--short", "HEAD")
        if target.code != 0:
            return _not_merged("the room's checkout is not on a branch (detached HEAD); check out a branch first")
        into = target.out.strip()
        if (await self.git(self.repo, "rev-parse", "--verify", "--quiet", "MERGE_HEAD")).code == 0:
            return _not_merged("the room's checkout is in the middle of a merge; finish or abort it first")
        if dirty := await self.changes(self.repo, untracked=False):
            return _not_merged(
                f"the room's checkout has uncommitted changes ({file_list(dirty)}); commit or stash them first"
            )
        notes = []
        if pending := await self.changes(path, untracked=True):
            identity = await self._identity(path)
            added = await self.git(path, "add", "--all")
            message = f"Work left uncommitted in thread {thread}\n\nCommitted by aiagentchat for !merge by {by}."
            committed = added if added.code else await self.git(path, *identity, "commit", "--quiet", "-m", message)
            if committed.code != 0:
                return _not_merged(f"the thread's uncommitted work could not be committed: {committed.why()}")
            sha = (await self._head(path))[:10]
            notes.append(
                f"📝 First committed the work left uncommitted in this thread ({file_list(pending)}) as `{sha}`."
            )
        before = await self._head(self.repo)
        tip = await self._head(self.repo, f"refs/heads/{branch}")
        identity = await self._identity(self.repo)
        title = f"Merge {branch} (thread {thread}), asked by {by}"
        merged = await self.git(self.repo, *identity, "merge", "--no-edit", "-m", title, f"refs/heads/{branch}")
        if merged.code != 0:
            conflicted = await self.git(self.repo, "diff", "--name-only", "--diff-filter=U", "-z")
            files = [name for name in conflicted.out.split("\0") if name]
            if (await self.git(self.repo, "rev-parse", "--verify", "--quiet", "MERGE_HEAD")).code == 0:
                aborted = await self.git(self.repo, "merge", "--abort")
                if aborted.code != 0:
                    raise GitError(f"git merge --abort failed: {aborted.why()}")
            if await self._head(self.repo) != before:
                raise GitError(f"the checkout moved from {before[:10]} while a failed merge was undone")
            log.info("worktree_merge_refused", thread=thread, branch=branch, conflicts=len(files))
            why = f"a conflict in {file_list(files)}" if files else f"git refused: {merged.why()}"
            refused = f"⛔ `{branch}` was not merged into `{into}`: {why}. Nothing in the room's checkout changed."
            return Outcome(False, "\n".join([*notes, refused]))
        after = await self._head(self.repo)
        if after == before:
            notes.append(f"✅ `{into}` already has everything of `{branch}`.")
        else:
            kind = "fast-forward" if after == tip else f"merge commit `{after[:10]}`"
            changed = await self.git(self.repo, "diff", "--name-only", "-z", before, after)
            files = [name for name in changed.out.split("\0") if name]
            notes.append(f"✅ Merged `{branch}` into `{into}` ({kind}): {file_list(files) or 'no file changed'}.")
        log.info("worktree_merged", thread=thread, branch=branch, into=into, head=after)
        return Outcome(True, "\n".join(notes))

    async def describe(self, thread: str) -> str:
        """What discarding the thread's worktree would lose, in a few words."""
        path, branch = self.path_of(thread), branch_name(thread)
        into = await self.git(self.repo, "symbolic-ref", "--quiet", "--short", "HEAD")
        base = into.out.strip() if into.code == 0 else "HEAD"
        ahead = await self.git(self.repo, "rev-list", "--count", f"refs/heads/{base}..refs/heads/{branch}")
        commits = ahead.out.strip() if ahead.code == 0 else "?"
        pending = await self.changes(path, untracked=True) if self.exists(thread) else []
        uncommitted = f", uncommitted changes in {file_list(pending)}" if pending else ", nothing uncommitted"
        return f"`{branch}` has {commits} commit(s) not in `{base}`{uncommitted}"

    async def discard(self, thread: str) -> Outcome:
        """Remove the thread's worktree and delete its branch, merged or not."""
        path, branch = self.path_of(thread), branch_name(thread)
        if self.exists(thread):
            removed = await self.git(self.repo, "worktree", "remove", "--force", "--force", str(path))
            if removed.code != 0:
                return Outcome(False, f"⛔ Not discarded: git could not remove the worktree: {removed.why()}.")
        await self.git(self.repo, "worktree", "prune")
        known = await self.git(self.repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}")
        if known.code == 0:
            deleted = await self.git(self.repo, "branch", "--delete", "--force", branch)
            if deleted.code != 0:
                return Outcome(False, f"⛔ The worktree is gone, but git could not delete `{branch}`: {deleted.why()}.")
        registry = self._registry()
        if registry.pop(short_name(thread), None) is not None:
            self._save(registry)
        log.info("worktree_discarded", thread=thread, branch=branch)
        return Outcome(True, f"🗑️ Discarded `{branch}` and its worktree.")
