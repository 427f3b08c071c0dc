"""Hard limits on every tool call of the agent, checked through the CLI's PreToolUse hook.

They hold whatever the permission mode, allowed_tools or an approval say. Paths are compared as paths,
never as substrings, under every name they have: as given (made absolute against the working directory),
each name they take as the symbolic links along them are followed one at a time, and fully resolved.

- No tool reaches into the daemon's data directory, other than the room's own working directory.
- A write (Write, Edit, MultiEdit, NotebookEdit) stays inside the working directory, and never touches what
  the CLI or git read as configuration that runs commands: `.claude/` (settings, hooks; unless the room sets
  `allow_claude_config_writes`), `.mcp.json`, anything in `.git` (its config and hooks; a file named
  `.git` would point git at a directory of the agent's making), or a file named `HEAD` (with it, `config`,
  `objects/` and `refs/` in a folder, git run there takes the folder for a git directory and runs the
  commands its config names).
- A Bash command is split into words (shlex), and each word, and the value of each `name=value` word, is
  taken as a path: one naming the data directory, `.claude/`, `.mcp.json` or a path inside `.git` is
  refused. This is a guard rail, not a wall: a command can always build a path the words do not show
  (variables, `$(…)`), and a command may write anywhere its words do not name. The wall is
  the room's sandbox (SECURITY.md).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

PATH_KEYS = ("file_path", "notebook_path", "path")
GLOB_KEY = "pattern"  # Glob's pattern is a path with wildcards (Grep's is a regular expression)
WRITING_TOOLS = {"Write", "Edit", "MultiEdit", "NotebookEdit"}
MAX_LINKS = 40  # as the kernel: a path needing more symbolic links than this cannot be opened (ELOOP)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def names_of(path: Path) -> list[Path]:
    """Every name of the absolute `path`: itself (normalised), then the name it has after each symbolic link
    along it is followed, one at a time, the last one fully resolved."""
    names = [Path(os.path.normpath(path))]
    done, todo, follows = Path("/"), list(path.parts[1:]), 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            done = done.parent  # `done` holds no link: its parent is the real one
            continue
        if part == ".":
            continue
        step = done / part
        try:
            target = os.readlink(step)
        except (OSError, ValueError):  # not a link (or gone, or a name with a NUL in it)
            done = step
            continue
        follows += 1
        if follows > MAX_LINKS:
            break
        todo = list(Path(target).parts) + todo
        if os.path.isabs(target):
            done, todo = Path("/"), todo[1:]
        names.append(Path(os.path.normpath(done.joinpath(*todo))))
    return names


class ToolGuard:
    def __init__(self, data_dir: Path, workdir: Path, allow_claude_config_writes: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.workdir = workdir.resolve()
        self.allow_claude_config_writes = allow_claude_config_writes

    def _names(self, raw: str) -> list[Path]:
        return names_of(self.workdir / os.path.expanduser(raw))

    def _configuration(self, name: Path, writing: bool, linked: list[tuple[Path, str]]) -> str | None:
        """Which configuration that runs commands `name` is part of (for a write: or is the `.git` file);
        `linked`: the working directory's configuration that is a link, by where it leads."""
        parts = name.relative_to(self.workdir).parts if _inside(name, self.workdir) else name.parts
        if ".claude" in parts and not self.allow_claude_config_writes:
            return "Claude Code settings or hooks (.claude/)"
        if parts and parts[-1] == ".mcp.json":
            return "MCP server configuration (.mcp.json)"
        if ".git" in parts[:-1] or (writing and parts and parts[-1] == ".git"):
            return "git's configuration or hooks (.git)"
        if writing and parts and parts[-1] == "HEAD":
            return "a file named HEAD (git takes a folder with HEAD, config, objects/ and refs/ for a git directory)"
        for link, what in linked:
            if _inside(name, link):
                return what
        return None

    def _linked_configuration(self) -> list[tuple[Path, str]]:
        """The working directory's configuration that is a symbolic link, by the name it leads to."""
        found = []
        for name, what in (
            (".claude", "Claude Code settings or hooks (.claude/)"),
            (".mcp.json", "MCP server configuration (.mcp.json)"),
            (".git", "git's configuration or hooks (.git)"),
        ):
            if name == ".claude" and self.allow_claude_config_writes:
                continue
            link = self.workdir / name
            if link.is_symlink():
                found.append((link.resolve(), what))
        return found

    def _in_data_dir(self, name: Path) -> bool:
        return _inside(name, self.data_dir) and not _inside(name, self.workdir)

    def check(self, tool_name: str, tool_input: dict[str, Any]) -> str | None:
        """Why this call must not run, or None when it may."""
        writing, linked = tool_name in WRITING_TOOLS, self._linked_configuration()
        for key in PATH_KEYS + ((GLOB_KEY,) if tool_name == "Glob" else ()):
            raw = tool_input.get(key)
            if not isinstance(raw, str) or not raw:
                continue
            for name in self._names(raw):
                if self._in_data_dir(name):
                    return f"{raw} is inside aiagentchat's own data directory"
                if writing and not _inside(name, self.workdir):
                    return f"{raw} leads outside the working directory"
                if writing and (what := self._configuration(name, True, linked)) is not None:
                    return f"writing {what} is not allowed"
        command = tool_input.get("command")
        if tool_name != "Bash" or not isinstance(command, str):
            return None
        for word in command_words(command):
            for name in self._names(word):
                if self._in_data_dir(name):
                    return "the command names aiagentchat's own data directory"
                if (what := self._configuration(name, False, linked)) is not None:
                    return f"commands naming {what} are not allowed"
        return None


def command_words(command: str) -> list[str]:
    """The words of a shell command that may be paths: each word (operators split off), and the value of each
    `name=value` word (`--file=x`, `X=y`). A command shlex cannot split (a quote in a here-document) is split at
    white space."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""  # `a#/x` is one word to the shell; a real comment's words are checked too
        words = list(lexer)
    except ValueError:
        words = command.split()
    found = []
    for word in words:
        if word.strip(";&|<>()"):
            found.append(word)
            if "=" in word:
                found.append(word.split("=", 1)[1])
    return [word for word in found if word]
