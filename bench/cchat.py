"""cchat's own cost (issue 17): `cchat --help` against starting Python; `cchat send` from the process's start
until the prompt is in a nio client's view of the room, with the room given by id and `--bot` (no settings read)
and by the daemon's settings file; and `send --wait` from the answer's last event in that client's view until
cchat exits. cchat runs as the installed command (the venv's `cchat`), logged in as its own device of the user
whose nio client watches the room. `scripts/bench --cchat RUNS` writes bench/cchat.md; a full run has the same
rows in bench/results.md."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from aiagentchat.private import Credentials
from bench import machine
from bench.stats import ms
from bench.world import Homeserver, run_final
from tests.harness import claude_binary
from tests.harness.matrix_user import MatrixUser

CCHAT = Path(sys.executable).with_name("cchat")
TIMEOUT_S = 120.0
HELP_MORE_S, SEND_S, WAIT_END_S = 0.3, 0.5, 0.5  # the targets


@dataclass(frozen=True)
class CchatCost:
    python_s: list[float]  # `python -c pass`
    help_s: list[float]
    send_s: list[float]  # room id and --bot: no settings read
    send_settings_s: list[float]  # the same with the daemon's settings file read
    wait_end_s: list[float]


async def _exits(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    """Run a command to its end; seconds from spawning it until it exited (0 expected)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*args, env=env, cwd=cwd, stdout=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise AssertionError(f"{args} exited {proc.returncode}")
    return time.monotonic() - started


def _prompt(text: str) -> Any:
    return lambda events: next((e["event_id"] for e in events if e.get("content", {}).get("body") == text), None)


async def _send(user: MatrixUser, room: str, env: dict[str, str], cwd: Path, *options: str) -> float:
    """Start `cchat send` in `cwd`; seconds until `user`'s client sees the prompt."""
    text = f"bench prompt {secrets.token_hex(4)}"
    watching = asyncio.create_task(user.wait_for(_prompt(text), timeout=TIMEOUT_S, room_id=room))
    await asyncio.sleep(0.2)  # the client's long poll is waiting
    started = time.monotonic()
    sending = asyncio.create_task(_exits(CCHAT, "send", *options, text, env=env, cwd=cwd))
    await watching
    seen = time.monotonic() - started
    await sending
    return seen


async def _wait_end(user: MatrixUser, room: str, env: dict[str, str], cwd: Path, bot: str) -> float:
    """`cchat send --wait`: seconds from `user`'s client seeing the answer's last event until cchat exited."""
    text = f"say bench answer {secrets.token_hex(4)}"
    proc = await asyncio.create_subprocess_exec(
        CCHAT, "send", room, text, "--wait", "--bot", bot, env=env, cwd=cwd, stdout=asyncio.subprocess.DEVNULL
    )
    prompt = await user.wait_for(_prompt(text), timeout=TIMEOUT_S, room_id=room)
    prompt_id = _prompt(text)(prompt)
    await user.wait_for(run_final(prompt_id), timeout=TIMEOUT_S, room_id=room)
    seen = time.monotonic()
    if await proc.wait() != 0:
        raise AssertionError(f"cchat send --wait exited {proc.returncode}")
    return time.monotonic() - seen


async def _login(base_url: str, user_id: str, password: str, path: Path) -> None:
    """cchat's own device of the user, saved where cchat looks for it."""
    payload = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user_id}, "password": password}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/_matrix/client/v3/login", json=payload) as r,
    ):
        login = await r.json()
    Credentials(base_url, login["user_id"], login["device_id"], login["access_token"]).save(path)


async def measure(server: Homeserver, runs: int) -> CchatCost:
    python = [await _exits(sys.executable, "-c", "pass") for _ in range(runs)]
    help_s = [await _exits(CCHAT, "--help") for _ in range(runs)]
    user_id, password = await server.account("cchat")
    user = MatrixUser()
    server.users.append(user)
    await user.login(server.synapse.base_url, user_id, password)
    await user.sync_once()
    bot = await server.account("bot")
    room = await user.create_room(invite=[bot[0]])
    config_dir = server.scratch / "cchat-config"
    await _login(server.synapse.base_url, user_id, password, config_dir / "credentials.json")
    env = os.environ | {"CCHAT_CONFIG_DIR": str(config_dir)}
    daemon = server.daemon("cchat", bot, [room], user_id, {"binary": claude_binary()})
    await daemon.start()
    named = env | {"AIAGENTCHAT_CONFIG": str(daemon.config)}
    # in the scratch directory, which has no ./settings.toml: the room id alone, no settings read
    send = [await _send(user, room, env, server.scratch, room) for _ in range(runs)]
    send_settings = [await _send(user, room, named, server.scratch, room) for _ in range(runs)]
    await _wait_end(user, room, env, server.scratch, bot[0])  # the room's agent started: what follows is warm
    wait_end = [await _wait_end(user, room, env, server.scratch, bot[0]) for _ in range(runs)]
    await daemon.stop()
    return CchatCost(python, help_s, send, send_settings, wait_end)


def summary_rows(cost: CchatCost) -> list[list[str]]:
    """Rows for the table against the targets: what, target, measured, met."""
    more = (ms(cost.help_s).median - ms(cost.python_s).median) / 1000
    send, settings, end = (ms(s).median / 1000 for s in (cost.send_s, cost.send_settings_s, cost.wait_end_s))
    return [
        ["cchat --help beyond starting Python, median", f"<= {HELP_MORE_S * 1000:.0f} ms", f"{more * 1000:.0f} ms",
         _met(more <= HELP_MORE_S, more - HELP_MORE_S)],
        ["cchat send: start → prompt seen, room id, median", f"<= {SEND_S * 1000:.0f} ms", f"{send * 1000:.0f} ms",
         _met(send <= SEND_S, send - SEND_S)],
        ["cchat send: start → prompt seen, settings file, median", f"<= {SEND_S * 1000:.0f} ms",
         f"{settings * 1000:.0f} ms", _met(settings <= SEND_S, settings - SEND_S)],
        ["cchat send --wait: answer seen → cchat exited, median", f"<= {WAIT_END_S * 1000:.0f} ms",
         f"{end * 1000:.0f} ms", _met(end <= WAIT_END_S, end - WAIT_END_S)],
    ]  # fmt: skip


def _met(met: bool, by_s: float) -> str:
    return "met" if met else f"**missed**: by {by_s * 1000:.0f} ms"


def detail_rows(cost: CchatCost) -> list[list[str]]:
    return [
        ["`python -c pass` (the floor)", ms(cost.python_s).cell()],
        ["`cchat --help`", ms(cost.help_s).cell()],
        ["`cchat send ROOM_ID TEXT`: start → prompt in the watching client's view", ms(cost.send_s).cell()],
        ["the same, settings read (`AIAGENTCHAT_CONFIG`: the daemon's file)", ms(cost.send_settings_s).cell()],
        ["`cchat send --wait`: answer's last event in that view → cchat exited", ms(cost.wait_end_s).cell()],
    ]


INTRO = (
    "cchat as installed (the venv's `cchat` command), logged in as its own device of the user whose nio client "
    "watches the room (an unencrypted room, as the built-in homeserver's `local`); the real CLI answers. Both "
    "clients' views are their own syncs, so the first row of each pair includes the watching client's sync."
)


def section(cost: CchatCost, heading: str) -> list[str]:
    return [heading, "", INTRO, "", "| what | median / p95 |", "|---|---|",
            *(f"| {what} | {value} |" for what, value in detail_rows(cost)), ""]  # fmt: skip


@dataclass(frozen=True)
class CchatRun:
    machine: dict[str, str]
    command: str
    cost: CchatCost


def render(run: CchatRun) -> str:
    intro = (
        f"Written by `{run.command}`. Median / p95 (nearest rank) over n samples, against a local Synapse (the "
        "machine is shared: see the load averages)."
    )
    lines = [
        "# What cchat costs",
        "",
        intro,
        "",
        *machine.table(run.machine),
        "",
        "| what | target | measured | verdict |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in summary_rows(run.cost)),
        "",
        *section(run.cost, "## Detail"),
    ]
    return "\n".join(lines)
