"""Hard limits on every tool call of the agent, checked through the CLI's PreToolUse hook.

They hold whatever the permission mode or allowed_tools say: the agent never reaches into the daemon's
data directory (other than its own working directory) and never writes Claude Code settings or hooks
into its working directory. This is a guard rail, not a sandbox: a shell command can always be written
to hide a path. The real boundary is an OS user or a container (SECURITY.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PATH_KEYS = ("file_path", "notebook_path", "path")
WRITING_TOOLS = {"Write", "Edit", "MultiEdit", "NotebookEdit"}
DAEMON_FILES = ("credentials.json", "pickle_key", "aiagentchat.db")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


class ToolGuard:
    def __init__(self, data_dir: Path, workdir: Path, allow_claude_config_writes: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.workdir = workdir.resolve()
        self.allow_claude_config_writes = allow_claude_config_writes

    def _resolve(self, raw: str) -> Path:
        path = Path(os.path.expanduser(raw))
        return (path if path.is_absolute() else self.workdir / path).resolve()

    def _in_data_dir(self, path: Path) -> bool:
        return _inside(path, self.data_dir) and not _inside(path, self.workdir)

    def check(self, tool_name: str, tool_input: dict[str, Any]) -> str | None:
        """Why this call must not run, or None when it may."""
        for key in PATH_KEYS:
            raw = tool_input.get(key)
            if not isinstance(raw, str) or not raw:
                continue
            path = self._resolve(raw)
            if self._in_data_dir(path):
                return f"{raw} is inside aiagentchat's own data directory"
            if (
                tool_name in WRITING_TOOLS
                and not self.allow_claude_config_writes
                and _inside(path, self.workdir / ".claude")
            ):
                return "writing Claude Code settings or hooks (.claude/) in the working directory is not allowed"
        command = tool_input.get("command")
        if tool_name != "Bash" or not isinstance(command, str):
            return None
        outside_workdir = command.replace(str(self.workdir), "")
        if str(self.data_dir) in outside_workdir:
            return "the command names aiagentchat's own data directory"
        if any(name in outside_workdir for name in DAEMON_FILES):
            return "the command names one of aiagentchat's own files"
        if not self.allow_claude_config_writes and ".claude/" in command:
            return "commands touching .claude/ (Claude Code settings and hooks) are not allowed"
        return None
