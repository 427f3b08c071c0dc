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


def coverage_env() -> dict[str, str]:
    """Coverage's own variables (`COVERAGE_PROCESS_CONFIG`, set when `scripts/test` runs the tests under
    coverage), for a python subprocess of ours (the daemon, cchat) started with an environment of its own:
    without them it is not measured. Empty when the tests run without coverage."""
    return {key: value for key, value in os.environ.items() if key.startswith("COVERAGE_")}
