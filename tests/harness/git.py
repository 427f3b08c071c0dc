"""Real git repositories for the tests of threads in worktrees."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def merging(repo: Path) -> bool:
    """Whether a merge is under way in the checkout (MERGE_HEAD is there)."""
    found = subprocess.run(["git", "-C", str(repo), "rev-parse", "-q", "--verify", "MERGE_HEAD"], check=False)
    return found.returncode == 0


def make_repository(path: Path) -> Path:
    """A new checkout at `path` on branch main, with one commit of README ("hello")."""
    path.mkdir()
    git(path, "init", "--quiet", "--initial-branch", "main")
    git(path, "config", "user.name", "Tester")
    git(path, "config", "user.email", "tester@example.org")
    (path / "README").write_text("hello\n")
    git(path, "add", "README")
    git(path, "commit", "--quiet", "-m", "first")
    return path
