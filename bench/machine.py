"""What the numbers were measured on: the machine, its load, and the versions of everything in the path."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from tests.harness import claude_binary, synapse_python


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _output(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def describe() -> dict[str, str]:
    """Machine and versions, as `label: value` rows for results.md."""
    synapse = _output(synapse_python(), "-c", "import importlib.metadata as m; print(m.version('matrix-synapse'))")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "ram": f"{_ram_gib():.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "matrix-nio": importlib.metadata.version("matrix-nio"),
        "synapse": f"{synapse} (SQLite)",
        "claude code cli": _output(claude_binary(), "--version"),
        "aiagentchat": _output("git", "rev-parse", "--short", "HEAD"),
        "load average at start (1/5/15 min)": load_average(),
    }


def table(described: dict[str, str]) -> list[str]:
    """The machine as a two-column Markdown table, for the head of a results file."""
    return ["|  |  |", "|---|---|", *(f"| {label} | {value} |" for label, value in described.items())]
