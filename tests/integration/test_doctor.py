"""`aiagentchat doctor` as a subprocess against the tests' Synapse and the real CLI: a good set-up passes while
the daemon runs (and the daemon goes on undisturbed), then one broken thing at a time gives its ❌ and exit 1."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import World, bot_text, encrypted_room, run_ended
from tests.integration.daemon import Daemon, write_settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def doctor(daemon: Daemon, config: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `python -m aiagentchat doctor --config` with the daemon's environment; its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiagentchat",
        "doctor",
        "--config",
        str(config or daemon.config),
        env=daemon.env | (env or {}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def variant(daemon: Daemon, name: str, change: Callable[[dict[str, Any]], None]) -> Path:
    """The daemon's settings file with one change, as a file of its own beside it."""
    data = tomllib.loads(daemon.config.read_text())
    change(data)
    path = daemon.config.with_name(f"{name}.toml")
    rooms = data.pop("rooms", [])
    write_settings(path, data, rooms)
    return path


def not_ok(output: str) -> list[str]:
    return [line for line in output.splitlines() if not line.startswith("✅")]


async def bot_devices(world: World) -> set[str]:
    token = json.loads((world.tmp_path / "data" / "credentials.json").read_text())["access_token"]
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{world.synapse.base_url}/_matrix/client/v3/devices", headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        return {device["device_id"] for device in (await response.json())["devices"]}


async def test_a_good_set_up_passes_while_the_daemon_runs_undisturbed(world):
    user = await world.device()
    room, daemon = await encrypted_room(world, user)
    code, output = await doctor(daemon)
    assert code == 0, output
    assert [line.split(":")[0] for line in not_ok(output)] == ["⚠️ rate limit"], output
    assert "README#rate-limits" in output
    device_id = json.loads((world.tmp_path / "data" / "credentials.json").read_text())["device_id"]
    assert f"✅ login: {world.bot_id}, device {device_id} (saved login" in output
    assert f"✅ room {room}: {world.bot_id} is in the room" in output
    assert f"✅ room {room}: encrypted; trust cross_signed" in output
    assert f"✅ room {room}: allowed users: {world.user.user_id}" in output
    assert f"✅ cross-signing: device {device_id} is signed by the bot's identity" in output
    assert "✅ sandbox: " in output
    assert "version 2.1" in output and "handshake, run in its sandbox, answered" in output
    assert "✅ model credentials: the agent gets ANTHROPIC_API_KEY" in output
    assert world.bot_password not in output and "test-key" not in output
    # the daemon went on as it was: its device, its lock, its crypto store
    prompt = await user.send_text(room, "say still here after the doctor")
    events = await user.wait_for(run_ended(prompt), timeout=60, room_id=room)
    assert "still here after the doctor" in bot_text(events, prompt)


async def test_each_broken_thing_gives_its_failure_and_exit_1(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}])
    await daemon.start()
    assert await daemon.stop() == 0
    code, output = await doctor(daemon)
    assert code == 0, output
    assert f"✅ room {room}: not encrypted" in output
    devices = await bot_devices(world)

    # no saved login yet: the password is tried with a device logged out again; a wrong one is refused
    def fresh_data(data: dict[str, Any]) -> None:
        data["paths"]["data_dir"] = str(world.tmp_path / "fresh")

    fresh = variant(daemon, "fresh", fresh_data)
    code, output = await doctor(daemon, fresh)
    assert code == 0, output
    assert f"✅ login: the password of {world.bot_id} works" in output
    assert "⚠️ cross-signing: the bot's identity (master key" in output and "private keys missing here" in output
    assert await bot_devices(world) == devices
    wrong = "not-the-password-4711"
    code, output = await doctor(daemon, fresh, {"AIAGENTCHAT_MATRIX__PASSWORD": wrong})
    assert code == 1
    assert f"❌ login: the homeserver refused the password of {world.bot_id}" in output
    assert wrong not in output
    assert not (world.tmp_path / "fresh").exists()  # doctor made nothing there
    token = json.loads((world.tmp_path / "data" / "credentials.json").read_text())["access_token"]
    code, output = await doctor(daemon, fresh, {"AIAGENTCHAT_MATRIX__ACCESS_TOKEN": token})
    assert code == 0, output
    assert f"✅ login: {world.bot_id}, device" in output and "(configured access token)" in output
    code, output = await doctor(daemon, fresh, {"AIAGENTCHAT_MATRIX__ACCESS_TOKEN": "syt_not_a_token"})
    assert code == 1
    assert "❌ login: the configured access token was refused (M_UNKNOWN_TOKEN)" in output
    assert "nio" not in output  # no library warnings among the lines

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def wrong_url(data: dict[str, Any]) -> None:
        data["matrix"]["homeserver"] = f"http://127.0.0.1:{port}"

    code, output = await doctor(daemon, variant(daemon, "down", wrong_url))
    assert code == 1
    assert f"❌ homeserver: http://127.0.0.1:{port}: no answer" in output
    assert "⚠️ login: not checked" in output

    elsewhere = await world.user.create_room()

    def another_room(data: dict[str, Any]) -> None:
        data["rooms"].append({"id": elsewhere, "allowed_users": [world.user.user_id]})

    code, output = await doctor(daemon, variant(daemon, "elsewhere", another_room))
    assert code == 1
    assert f"❌ room {elsewhere}: {world.bot_id} is not in the room → invite {world.bot_id}" in output
    assert f"✅ room {room}: {world.bot_id} is in the room" in output

    def nobody(data: dict[str, Any]) -> None:
        data["rooms"][0]["allowed_users"] = []

    code, output = await doctor(daemon, variant(daemon, "nobody", nobody))
    assert code == 1
    assert f"❌ room {room}: nobody can prompt: allowed_users is empty" in output

    def no_cli(data: dict[str, Any]) -> None:
        data["claude"]["binary"] = str(world.tmp_path / "no-such-claude")

    code, output = await doctor(daemon, variant(daemon, "no-cli", no_cli))
    assert code == 1
    assert "❌ Claude Code CLI: claude.binary" in output and "is not found" in output
    assert sum(line.startswith("❌") for line in output.splitlines()) == 1
