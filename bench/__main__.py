"""`python -m bench` (or `scripts/bench`): run all six measurements of issue 7 and write bench/results.md.

Run counts are options; `--quick` is a smoke run of a few minutes whose numbers mean little. The raw results
of the last run are kept in bench/.last-run.pickle, so `--render-only` can rewrite results.md without
measuring again.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from bench import cchat, first_output, floor, identity, machine, quiet, ratelimit, sandbox, scale, throughput
from bench.profile import Profiler
from bench.report import Results, render
from bench.world import cli_environment, homeserver
from tests.harness.model_server import model_server

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.md"
SANDBOX = HERE / "sandbox.md"
IDENTITY = HERE / "identity.md"
CCHAT = HERE / "cchat.md"
CCHAT_RUNS = 10  # in a full run
LAST_RUN = HERE / ".last-run.pickle"


def _sizes(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def _counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix-runs", type=int, default=40, help="floor: Matrix round trips")
    parser.add_argument("--cli-cold", type=int, default=10, help="floor: cold CLI processes")
    parser.add_argument("--cli-warm", type=int, default=20, help="floor: warm CLI turns")
    parser.add_argument("--first-cold", type=int, default=10, help="first output: cold runs (one room each)")
    parser.add_argument("--first-warm", type=int, default=20, help="first output: warm runs")
    parser.add_argument("--pipeline-mb", type=_sizes, default=[5.0, 50.0], help="in-process floods, MB")
    parser.add_argument("--pipeline-runs", type=int, default=3, help="in-process runs per flood size")
    parser.add_argument("--e2e-mb", type=_sizes, default=[2.0, 10.0, 20.0], help="end-to-end floods, MB")
    parser.add_argument("--drip-seconds", type=float, default=120.0, help="rate-limited run length")
    parser.add_argument("--scale", type=_counts, default=[1, 10, 50, 100], help="active rooms per round")
    parser.add_argument("--scale-lines", type=int, default=40, help="lines each active room streams")
    parser.add_argument("--scale-interval-ms", type=int, default=500, help="between those lines")
    parser.add_argument("--startup-runs", type=int, default=10, help="restarts with 100 joined rooms")
    parser.add_argument("--quick", action="store_true", help="a smoke run with small counts")
    parser.add_argument("--render-only", action="store_true", help="rewrite results.md from the last run")
    parser.add_argument("--sandbox", action="store_true",
                        help="only the sandbox's cost: the CLI floor and first output with and without bwrap "
                        "(--cli-cold and --cli-warm runs each), written to bench/sandbox.md")
    parser.add_argument("--identity", type=int, default=0, metavar="RUNS",
                        help="only cross-signing's cost, over RUNS fresh accounts, written to bench/identity.md")
    parser.add_argument("--cchat", type=int, default=0, metavar="RUNS",
                        help="only cchat's cost (--help, send, the end of --wait), RUNS of each, written to "
                        "bench/cchat.md; a full run measures it too, for results.md")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the largest in-process flood, the largest scale round and one start-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.matrix_runs, args.cli_cold, args.cli_warm, args.first_cold, args.first_warm = 5, 2, 3, 2, 3
        args.pipeline_mb, args.e2e_mb, args.drip_seconds, args.scale = [1.0, 5.0], [1.0, 2.0], 20.0, [1, 10]
        args.scale_lines, args.startup_runs, args.pipeline_runs = 10, 3, 2
    return args


def progress(message: str) -> None:
    print(f"bench: {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


async def measure(args: argparse.Namespace, scratch: Path, command: str) -> Results:
    started = time.monotonic()
    described = machine.describe()
    profiler = Profiler(scratch) if args.profile else None
    async with model_server() as model:
        cli_environment(model, scratch / "cli-home")
        floods = {size: throughput.flood(scratch, size) for size in {*args.pipeline_mb, *args.e2e_mb}}
        progress("(3) parser + batcher in process")
        largest = max(args.pipeline_mb)
        pipeline = [await throughput.in_process(floods[size], profiler if (size, run) == (largest, 0) else None)
                    for size in args.pipeline_mb for run in range(args.pipeline_runs)]
        progress("(3) parser + batcher in process, live status")
        pipeline_live = [await throughput.in_process(floods[size], live=True)
                         for size in args.pipeline_mb for _ in range(args.pipeline_runs)]
        async with homeserver(model, scratch) as server:
            progress("(1) floor")
            floor_result = await floor.measure(server, scratch / "floor", args.matrix_runs, args.cli_cold,
                                               args.cli_warm)
            progress("(2) first output")
            first = await first_output.measure(server, args.first_cold, args.first_warm)
            progress("(3) end to end")
            end_to_end = await throughput.end_to_end(server, [floods[size] for size in args.e2e_mb])
            progress("(5) scale and (6) start-up")
            scaled = await scale.measure(server, args.scale, args.scale_lines, args.scale_interval_ms,
                                         args.startup_runs, profiler)
            progress("cchat")
            cchat_cost = await cchat.measure(server, 3 if args.quick else CCHAT_RUNS)
        async with homeserver(model, scratch, default_rc_message=True) as server:
            progress("(4) rate-limited delivery")
            limited = await ratelimit.measure(server, args.drip_seconds)
            progress("quick and quiet")
            quieted = await quiet.measure(server, args.drip_seconds)
    return Results(command, described, machine.load_average(), time.monotonic() - started, floor_result, first,
                   pipeline, pipeline_live, end_to_end, limited, scaled, profiler.profiles if profiler else [],
                   cchat_cost, quieted)


async def measure_sandbox(args: argparse.Namespace, scratch: Path, command: str) -> sandbox.SandboxCost:
    described = machine.describe()
    async with model_server() as model:
        cli_environment(model, scratch / "cli-home")
        async with homeserver(model, scratch) as server:
            progress("sandbox off and on: CLI floor and first output")
            modes = await sandbox.measure(server, scratch, args.cli_cold, args.cli_warm)
    described["load average at end (1/5/15 min)"] = machine.load_average()
    return sandbox.SandboxCost(described, command, modes)


async def measure_identity(args: argparse.Namespace, scratch: Path, command: str) -> identity.IdentityCost:
    described = machine.describe()
    async with model_server() as model, homeserver(model, scratch) as server:
        progress(f"cross-signing: {args.identity} fresh accounts")
        samples = await identity.measure(server, scratch, args.identity)
    described["load average at end (1/5/15 min)"] = machine.load_average()
    return identity.IdentityCost(described, command, *samples)


async def measure_cchat(args: argparse.Namespace, scratch: Path, command: str) -> cchat.CchatRun:
    described = machine.describe()
    async with model_server() as model:
        cli_environment(model, scratch / "cli-home")
        async with homeserver(model, scratch) as server:
            progress(f"cchat: {args.cchat} runs of each")
            cost = await cchat.measure(server, args.cchat)
    described["load average at end (1/5/15 min)"] = machine.load_average()
    return cchat.CchatRun(described, command, cost)


def in_scratch(
    measuring: Callable[[argparse.Namespace, Path, str], Awaitable[T]], args: argparse.Namespace, argv: list[str]
) -> T:
    """Run a measurement in a scratch directory of its own, removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="aiagentchat-bench-"))
    try:
        return asyncio.run(measuring(args, scratch, shlex.join(["scripts/bench", *argv])))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.identity:
        IDENTITY.write_text(identity.render(in_scratch(measure_identity, args, argv)))
        progress(f"wrote {IDENTITY}")
        return
    if args.cchat:
        CCHAT.write_text(cchat.render(in_scratch(measure_cchat, args, argv)))
        progress(f"wrote {CCHAT}")
        return
    if args.sandbox:
        SANDBOX.write_text(sandbox.render(in_scratch(measure_sandbox, args, argv)))
        progress(f"wrote {SANDBOX}")
        return
    if not args.render_only:
        LAST_RUN.write_bytes(pickle.dumps(in_scratch(measure, args, argv)))
    results = pickle.loads(LAST_RUN.read_bytes())
    RESULTS.write_text(render(results))
    progress(f"wrote {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:])
