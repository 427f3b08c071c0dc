"""bench/results.md: the machine, a summary against the issue's targets, then each measurement in detail."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from bench import quiet
from bench.cchat import CchatCost, section, summary_rows
from bench.first_output import FirstOutput
from bench.floor import Floor
from bench.pipeline import PipelineRun
from bench.profile import Profile
from bench.quiet import Quiet
from bench.ratelimit import RateLimited
from bench.scale import Scale
from bench.stats import Distribution, ms
from bench.throughput import EndToEnd

FINDINGS = Path(__file__).with_name("findings.md")
MB = 1e6


@dataclass(frozen=True)
class Results:
    command: str
    machine: dict[str, str]
    load_after: str
    duration_s: float
    floor: Floor
    first: FirstOutput
    pipeline: list[PipelineRun]
    pipeline_live: list[PipelineRun]
    end_to_end: list[EndToEnd]
    rate_limited: RateLimited
    scale: Scale
    profiles: list[Profile]
    cchat: CchatCost | None = None  # runs before cchat was measured have none
    quiet: Quiet | None = None  # the same for quick and quiet


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _verdict(met: bool, miss: str = "") -> str:
    return "met" if met else f"**missed**{': ' + miss if miss else ''}"


def _floor_s(results: Results, cli: list[float]) -> float:
    """The median floor for a prompt's first output: two homeserver trips (prompt in, output out) + the CLI."""
    return 2 * statistics.median(results.floor.matrix_s) + statistics.median(cli)


def overheads_ms(results: Results) -> tuple[float, float]:
    """(warm, cold) median first output minus the median floor, in ms."""
    warm = statistics.median(results.first.warm_s) - _floor_s(results, results.floor.cli_warm_s)
    cold = statistics.median(results.first.cold_s) - _floor_s(results, results.floor.cli_cold_s)
    return warm * 1000, cold * 1000


def _mb_per_s(run: PipelineRun) -> float:
    return run.input_bytes / MB / run.wall_s


def _by_size(runs: list[PipelineRun]) -> dict[int, list[PipelineRun]]:
    sizes: dict[int, list[PipelineRun]] = {}
    for run in runs:
        sizes.setdefault(run.input_bytes, []).append(run)
    return sizes


def _largest_mb_per_s(results: Results) -> Distribution:
    return Distribution.of([_mb_per_s(run) for run in _by_size(results.pipeline)[max(_by_size(results.pipeline))]])


def _summary(results: Results) -> list[str]:
    warm, _ = overheads_ms(results)
    speed = _largest_mb_per_s(results).median
    growth, slope = _memory_growth(results)
    limited = results.rate_limited
    delivered = limited.lost == limited.duplicated == 0 and not limited.out_of_order
    clean = limited.visible_errors == 0 and limited.final_ok
    within = limited.events <= limited.allowed_events
    largest = max(results.scale.rounds, key=lambda r: r.rooms)
    dispatch = ms(largest.dispatch_s)
    ready = Distribution.of(results.scale.startup.ready_s)
    rows = [
        ["(2) first output overhead, warm, median", "< 100 ms", f"{warm:.0f} ms",
         _verdict(warm < 100, f"by {warm - 100:.0f} ms")],
        ["(3) parser + batcher, median", ">= 50 MB/s", f"{speed:.1f} MB/s",
         _verdict(speed >= 50, f"{50 / speed:.0f}x too slow")],
        ["(3) daemon peak RSS, smallest to largest end-to-end flood", "flat within 20 MB",
         f"{growth:+.1f} MB ({slope:.2f} MB per MB of output)",
         _verdict(abs(growth) <= 20, f"by {abs(growth) - 20:.1f} MB") + (", but not flat" if slope > 0.1 else "")],
        ["(4) bytes lost / duplicated / out of order", "0 / 0 / no",
         f"{limited.lost} / {limited.duplicated} / {'yes' if limited.out_of_order else 'no'}", _verdict(delivered)],
        ["(4) user-visible errors", "none", f"{limited.visible_errors}, final ok: {limited.final_ok}", _verdict(clean)],
        ["(4) events vs. what the rate limit allows", "<= allowed", f"{limited.events} <= {limited.allowed_events}"
         if within else f"{limited.events} > {limited.allowed_events}", _verdict(within)],
        [f"(5) daemon RSS at {largest.rooms} active rooms", "< 150 MB", f"{largest.usage.peak_rss_mib:.0f} MB peak",
         _verdict(largest.usage.peak_rss_mib < 150, f"by {largest.usage.peak_rss_mib - 150:.0f} MB")],
        [f"(5) daemon CPU at {largest.rooms} active rooms", "< 1 core", f"{largest.usage.cores:.2f} cores",
         _verdict(largest.usage.cores < 1, f"by {largest.usage.cores - 1:.2f} cores")],
        [f"(5) dispatch p95 at {largest.rooms} active rooms", "< 100 ms", f"{dispatch.p95:.0f} ms",
         _verdict(dispatch.p95 < 100, f"by {dispatch.p95 - 100:.0f} ms")],
        *_live_dispatch(results),
        [f"(6) start-up, {results.scale.startup.rooms} rooms, median", "< 2 s", f"{ready.median:.2f} s",
         _verdict(ready.median < 2, f"by {ready.median - 2:.2f} s")],
        *(summary_rows(results.cchat) if results.cchat else []),
        *(quiet.summary_rows(results.quiet) if results.quiet else []),
    ]
    return ["## Against the targets", "", *_table(["what", "target", "measured", "verdict"], rows)]


def _live_dispatch(results: Results) -> list[list[str]]:
    live = results.scale.live
    if live is None:
        return []
    p95 = ms(live.dispatch_s).p95
    return [[f"(5) the same with live status", "< 100 ms", f"{p95:.0f} ms", _verdict(p95 < 100, f"by {p95 - 100:.0f} ms")]]


def _memory_growth(results: Results) -> tuple[float, float]:
    """Peak daemon RSS of the largest end-to-end flood minus that of the smallest (MB), and per MB of flood."""
    runs = sorted(results.end_to_end, key=lambda run: run.megabytes)
    growth = runs[-1].usage.peak_rss_mib - runs[0].usage.peak_rss_mib
    return growth, growth / max(runs[-1].megabytes - runs[0].megabytes, 1e-9)


def _floor(results: Results) -> list[str]:
    floor = results.floor
    rows = [
        ["Matrix: nio client → Synapse → second nio client's sync", ms(floor.matrix_s).cell(digits=1)],
        ["CLI cold: spawn, initialise, prompt → first text line", ms(floor.cli_cold_s).cell()],
        ["CLI warm: prompt → first text line", ms(floor.cli_warm_s).cell()],
    ]
    return ["## 1. Floor", "", *_table(["path", "median / p95"], rows)]


def _first_output(results: Results) -> list[str]:
    warm, cold = overheads_ms(results)
    first = results.first
    rows = [
        ["warm (live agent)", ms(first.warm_s).cell(), f"{_floor_s(results, results.floor.cli_warm_s) * 1000:.0f} ms",
         f"{warm:.0f} ms"],
        ["cold (first prompt of a room)", ms(first.cold_s).cell(),
         f"{_floor_s(results, results.floor.cli_cold_s) * 1000:.0f} ms", f"{cold:.0f} ms"],
    ]
    return [
        "## 2. First output",
        "",
        "Prompt posted by the user's nio client → the bot's first event seen by that client (real CLI, scripted "
        "model, default 2 s flush interval). Floor = 2 × the Matrix median (the prompt travels in, the output "
        "out) + the CLI's median; overhead = median − floor.",
        "",
        *_table(["agent", "median / p95", "floor", "overhead"], rows),
    ]


def _pipeline_row(size: int, runs: list[PipelineRun]) -> list[str]:
    verdicts = sorted({run.verdict for run in runs})
    return [
        f"{size / MB:.1f} MB",
        Distribution.of([_mb_per_s(run) for run in runs]).cell("MB/s", 2),
        f"{statistics.median(run.cpu_s for run in runs) / (size / MB):.3f}",
        f"{min(run.baseline_rss_mib for run in runs):.0f} → {max(run.peak_rss_mib for run in runs):.0f} MB",
        f"{runs[0].text_bytes / MB:.2f} MB in {runs[0].events}",
        "; ".join(verdicts),
    ]


def _pipeline_rows(runs: list[PipelineRun]) -> list[list[str]]:
    return [_pipeline_row(size, same) for size, same in sorted(_by_size(runs).items())]


def _e2e_rows(results: Results) -> list[list[str]]:
    return [
        [f"{run.megabytes:.1f} MB", f"{run.wall_s:.1f} s", f"{run.megabytes / run.wall_s:.2f} MB/s",
         f"{run.usage.cpu_s / run.megabytes:.3f}", f"{run.idle_rss_mib:.0f} → {run.usage.peak_rss_mib:.0f} MB",
         str(run.events), f"{run.verdict}; final ok: {run.final_ok}"]
        for run in results.end_to_end
    ]


def _throughput(results: Results) -> list[str]:
    return [
        "## 3. Throughput",
        "",
        "The fake CLI copies generated stream-json to its stdout as fast as it can: per turn, 100 text lines "
        "streamed in two deltas each plus the CLI's repeated `assistant` message, one tool call and a 64 KB tool "
        "result (shown as an excerpt). Every line carries a running number: the room's text is checked line by "
        "line, in order, byte for byte.",
        "",
        "In process (`bench/pipeline.py`: RoomWorker → read_lines → parse_line → Translator → Batcher → render, "
        "an instant sender; each size run several times, each run in a fresh process; CPU s/MB is the median run's):",
        "",
        *_table(["stream-json", "throughput median / p95", "CPU s/MB", "RSS baseline → peak", "room text in events",
                 "check"],
                _pipeline_rows(results.pipeline)),
        "The same in process with a live status (`live_status = true`, the rooms' default; the benchmark's daemons "
        "stream): one status message edited at most once per interval, the answer as one event with its text in an "
        "attached file, which is checked; tool calls and results are left out of the answer, so only text lines "
        "are counted:",
        "",
        *_table(["stream-json", "throughput median / p95", "CPU s/MB", "RSS baseline → peak", "answer text in events",
                 "check"],
                _pipeline_rows(results.pipeline_live)),
        "End to end (daemon subprocess → Synapse → the user's client; one run per size, in this order, in one "
        "daemon; daemon CPU and RSS from /proc):",
        "",
        *_table(["stream-json", "prompt → last event", "throughput", "daemon CPU s/MB", "daemon RSS idle → peak",
                 "events", "check"], _e2e_rows(results)),
    ]


def _rate_limited(results: Results) -> list[str]:
    run = results.rate_limited
    rows = [
        ["lines streamed by the model", f"{run.lines} (one per 100 ms)"],
        ["events sent", str(run.events)],
        ["events the rate limit allows over that span (10 + 0.2/s)", str(run.allowed_events)],
        ["bytes delivered (bodies / whole contents)", f"{run.body_bytes} / {run.content_bytes}"],
        ["429s met", str(run.rate_limited)],
        ["gap between events, median / p95", ms(run.gaps_s).cell()],
        ["agent's last line → last byte visible", f"{run.tail_s * 1000:.0f} ms"],
        ["lines lost / duplicated / order", f"{run.lost} / {run.duplicated} / "
         f"{'differs' if run.out_of_order else 'same'}"],
        ["user-visible errors", f"{run.visible_errors}; final ok: {run.final_ok}"],
    ]
    return ["## 4. Rate-limited delivery (Synapse's default rc_message)", "", *_table(["", ""], rows)]


def _scale(results: Results) -> list[str]:
    rounds = [(f"{r.rooms}", r) for r in results.scale.rounds]
    if results.scale.live is not None:
        rounds.append((f"{results.scale.live.rooms}, live status", results.scale.live))
    rows = [
        [name, f"{r.usage.peak_rss_mib:.0f} MB", f"{r.usage.cores:.2f}", ms(r.dispatch_s).cell(),
         ms(r.sync_lag_s).cell(), f"{r.wall_s:.1f} s", _events(r.events)]
        for name, r in rounds
    ]
    return [
        "## 5. Scale (fake CLI)",
        "",
        f"One daemon serving {results.scale.startup.rooms} rooms (idle RSS {results.scale.idle_rss_mib:.0f} MB); "
        "N rooms get a prompt at once, each streaming lines for a while. CPU is the daemon's own (agents "
        "excluded) over the round. Dispatch: prompt's arrival in the daemon's sync → its agent process started; "
        "sync lag: the prompt's origin_server_ts → that arrival.",
        "",
        *_table(["active rooms", "daemon peak RSS", "daemon CPU (cores)", "dispatch median / p95",
                 "sync lag median / p95", "round", "events per answer"], rows),
        "Dispatch split at the daemon's log lines (median / p95):",
        "",
        *_table(["active rooms", *results.scale.rounds[0].phases_s],
                [[name, *(ms(samples).cell() for samples in r.phases_s.values())] for name, r in rounds]),
    ]


def _events(events: list[int]) -> str:
    return f"{statistics.median(events):g} (max {max(events)})" if events else "not counted"


def _startup(results: Results) -> list[str]:
    startup = results.scale.startup
    rows = [
        ["process start → logged in", ms(startup.logged_in_s).cell()],
        ["process start → ready (first sync handled)", ms(startup.ready_s).cell()],
        [f"for comparison, a plain nio client: {startup.rooms} joins of rooms it is in, one after another",
         ms(startup.joins_s).cell()],
        [f"for comparison, a plain nio client: one full-state sync since a token ({startup.rooms} rooms)",
         ms(startup.full_sync_s).cell()],
    ]
    return [f"## 6. Start-up ({startup.rooms} joined rooms, persisted sync token)", "", *_table(["", ""], rows)]


def render(results: Results) -> str:
    lines = [
        "# aiagentchat benchmark results",
        "",
        f"Written by `{results.command}` in {results.duration_s / 60:.1f} minutes. Distributions are "
        "median / p95 (nearest rank) over n samples. The machine is shared: load averages are shown."
        + (" py-spy sampled the daemon in the largest scale round and the largest in-process flood (100 Hz, "
           "non-blocking), and one extra, unmeasured start-up." if results.profiles else ""),
        "",
        "## Machine and versions",
        "",
        *_table(["", ""], [[key, value] for key, value in results.machine.items()]
                + [["load average at end (1/5/15 min)", results.load_after]]),
        *_summary(results),
        *_floor(results),
        *_first_output(results),
        *_throughput(results),
        *_rate_limited(results),
        *_scale(results),
        *_startup(results),
        *(section(results.cchat, "## 7. cchat") if results.cchat else []),
        *(quiet.section(results.quiet, "## 8. Quick and quiet") if results.quiet else []),
    ]
    if FINDINGS.exists():
        lines += [FINDINGS.read_text()]
    if results.profiles:
        lines += ["## Profiles of this run (py-spy)", ""]
        lines += [line for profile in results.profiles for line in profile.lines()]
    return "\n".join(lines)
