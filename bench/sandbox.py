"""What the wall costs (issue 15): the same measurements with each agent in its bubblewrap sandbox and
without it (`sandbox = "off"`): the CLI's own first text, cold and warm (as in the floor), and a prompt's first
output in the room, cold and warm (as in first output). `scripts/bench --sandbox` writes bench/sandbox.md."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from bench import first_output, floor, machine
from bench.first_output import FirstOutput
from bench.stats import ms
from bench.world import Homeserver

MODES = ("off", "bwrap")


@dataclass(frozen=True)
class Mode:
    cli_cold_s: list[float]
    cli_warm_s: list[float]
    first: FirstOutput


@dataclass(frozen=True)
class SandboxCost:
    machine: dict[str, str]
    command: str
    modes: dict[str, Mode]


async def measure(server: Homeserver, scratch: Path, cold_runs: int, warm_runs: int) -> dict[str, Mode]:
    """The modes take turns (one cold CLI start each, then half of the first-output runs each, twice), so that
    a machine shared with other work drifts into both alike. The walled CLI keeps one home, as a room does."""
    cli: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in MODES}
    for run in range(cold_runs):
        for mode in MODES:
            wall_home = scratch / "cli-home-walled" if mode == "bwrap" else None
            cold, warm = await floor.cli_first_text(
                scratch / f"cli-{mode}-{run}", 1, warm_runs if run == 0 else 0, wall_home=wall_home
            )
            cli[mode][0].extend(cold)
            cli[mode][1].extend(warm)
    first: dict[str, FirstOutput] = {mode: FirstOutput([], []) for mode in MODES}
    for turn, order in enumerate((MODES, MODES[::-1])):
        for mode in order:
            half = await first_output.measure(
                server, cold_runs // 2, warm_runs // 2, sandbox=mode, name=f"first-output-{mode}-{turn}"
            )
            first[mode].cold_s.extend(half.cold_s)
            first[mode].warm_s.extend(half.warm_s)
    return {mode: Mode(*cli[mode], first[mode]) for mode in MODES}


def _difference_ms(off: list[float], walled: list[float]) -> str:
    return f"{(statistics.median(walled) - statistics.median(off)) * 1000:+.0f} ms"


def render(cost: SandboxCost) -> str:
    off, walled = cost.modes["off"], cost.modes["bwrap"]
    rows = [
        ("CLI cold: spawn, initialise, prompt → first text line", off.cli_cold_s, walled.cli_cold_s),
        ("CLI warm: prompt → first text line", off.cli_warm_s, walled.cli_warm_s),
        ("first output in the room, cold (first prompt of a room)", off.first.cold_s, walled.first.cold_s),
        ("first output in the room, warm (live agent)", off.first.warm_s, walled.first.warm_s),
    ]
    lines = [
        "# What the sandbox costs",
        "",
        f"Written by `{cost.command}`. Median / p95 (nearest rank) over n samples; the same measurements as the "
        "floor (the CLI driven by the daemon's AgentProcess) and first output (through the daemon and Synapse) "
        "in bench/results.md, with `sandbox = \"off\"` and in bubblewrap, taking turns (the machine is shared: "
        "see the load averages).",
        "",
        *machine.table(cost.machine),
        "",
        "| what | sandbox off | bwrap | cost (median) |",
        "|---|---|---|---|",
        *(f"| {what} | {ms(a).cell()} | {ms(b).cell()} | {_difference_ms(a, b)} |" for what, a, b in rows),
        "",
    ]
    return "\n".join(lines)
