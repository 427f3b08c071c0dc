"""Integration-test harness: a real Synapse, a scripted Anthropic Messages API for the real Claude Code CLI,
and a real Matrix client acting as the human user."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def synapse_python() -> str:
    """The python of Synapse's own virtual environment (`AIAGENTCHAT_SYNAPSE_PYTHON`)."""
    return os.environ.get("AIAGENTCHAT_SYNAPSE_PYTHON", str(REPO_ROOT / ".cache" / "synapse-venv" / "bin" / "python"))


def claude_binary() -> str:
    """The real Claude Code CLI (`AIAGENTCHAT_CLAUDE_BIN`)."""
    return os.environ.get("AIAGENTCHAT_CLAUDE_BIN", str(REPO_ROOT / "node_modules" / ".bin" / "claude"))
