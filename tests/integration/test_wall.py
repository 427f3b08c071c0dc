"""The wall (issue 15): each room's agent runs in bubblewrap with its own home and sees only its working
directory. The attacks go around the guard on purpose (paths hidden in base64, `@path` expansion, settings
files written directly), so that only the sandbox stops them."""

import asyncio
import base64
import json
from pathlib import Path

import pytest

from aiagentchat.processes import start_time
from tests.integration.conftest import room_dir
from tests.integration.test_durability import sleeps_started, until_gone

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def hidden_cat(path: Path | str) -> str:
    """A Bash command that prints `path` without naming it, as a guard that reads commands would miss."""
    encoded = base64.b64encode(str(path).encode()).decode()
    return f'bash cat "$(echo {encoded} | base64 -d)"'


async def test_at_paths_bring_neither_the_daemon_credentials_nor_another_rooms_transcript(world):
    room_a, room_b = await world.room(), await world.room()
    await world.daemon([{"id": room_a}, {"id": room_b}]).start()
    assert "✅ Done" in await world.ask(room_b, "say banana-b7 is room b's secret")
    async with asyncio.timeout(30):  # the CLI writes its transcript on its own time, maybe after the answer is in
        while not (found := [path for path in world.tmp_path.rglob("*.jsonl") if "banana-b7" in path.read_text()]):
            await asyncio.sleep(0.05)
    (transcript,) = found
    assert transcript.is_relative_to(room_dir(world, "homes", room_b) / ".claude" / "projects")
    credentials = world.tmp_path / "data" / "credentials.json"
    token = json.loads(credentials.read_text())["access_token"]

    answer = await world.ask(room_a, f"say apple-a3 @{credentials} @{transcript}")

    assert "✅ Done" in answer
    bodies = [json.dumps(r["body"]) for r in await world.model.requests(full=True) if "apple-a3" in json.dumps(r)]
    assert bodies
    for body in bodies:
        assert token not in body
        assert "banana-b7" not in body


async def test_an_approved_command_sees_no_daemon_file_environment_or_other_room(world):
    room_a, room_b = await world.room(), await world.room()
    daemon = world.daemon([{"id": room_a}, {"id": room_b}], claude={"allowed_tools": ["Bash"]})
    await daemon.start()
    assert "✅ Done" in await world.ask(room_b, "bash echo banana-c5 > notes.txt")
    notes = room_dir(world, "rooms", room_b) / "notes.txt"
    assert notes.read_text() == "banana-c5\n"
    credentials = world.tmp_path / "data" / "credentials.json"
    token = json.loads(credentials.read_text())["access_token"]

    for path in (credentials, f"/proc/{daemon.proc.pid}/environ", notes):
        answer = await world.ask(room_a, hidden_cat(path))
        assert "No such file or directory" in answer
        for secret in (token, world.bot_password, "banana-c5"):
            assert secret not in answer


@pytest.mark.parametrize(
    ("sources", "hooks_run"), [([], []), (["user", "project", "local"], ["local", "project", "user"])]
)
async def test_settings_the_agent_could_write_do_not_apply_when_it_starts(world, sources, hooks_run):
    """By default no settings file the agent can write is read; the room naming all three sources shows that the
    planted hooks do run when their files are read (the MCP servers stay off: --strict-mcp-config)."""
    room = await world.room()
    workdir, home = room_dir(world, "rooms", room), room_dir(world, "homes", room)
    markers = workdir / "markers"  # where the agent can write: a hook that ran would leave its file here
    (world.tmp_path / "data").mkdir(mode=0o700)  # the daemon refuses a data dir open to others
    markers.mkdir(parents=True)

    def plant(settings_file: Path, name: str) -> None:
        hook = [{"hooks": [{"type": "command", "command": f"touch {markers}/{name}"}]}]
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        hooks = {"SessionStart": hook, "UserPromptSubmit": hook, "PreToolUse": [{"matcher": "*", **hook[0]}]}
        settings_file.write_text(json.dumps({"permissions": {"allow": ["Bash"]}, "hooks": hooks}))

    plant(workdir / ".claude" / "settings.json", "project")
    plant(workdir / ".claude" / "settings.local.json", "local")
    plant(home / ".claude" / "settings.json", "user")
    server = {"command": "/bin/sh", "args": ["-c", f"touch {markers}/mcp; sleep 5"]}
    (workdir / ".mcp.json").write_text(json.dumps({"mcpServers": {"planted": server}}))
    (home / ".claude.json").write_text(
        json.dumps({"mcpServers": {"planted": server}, "projects": {str(workdir): {"hasTrustDialogAccepted": True}}})
    )
    await world.daemon([{"id": room, "setting_sources": sources}]).start()

    answer = await world.ask(room, "bash echo hooked-d2")

    assert "tool said: hooked-d2" in answer
    assert sorted(p.name for p in markers.iterdir()) == hooks_run


async def test_the_agent_and_everything_it_started_end_with_a_killed_daemon(world):
    room = await world.room()
    daemon = world.daemon([{"id": room}], claude={"allowed_tools": ["Bash"]})
    await daemon.start()
    sleeps = await sleeps_started(world, room, "5")
    agent_pid = daemon.logged("agent_started")[-1]["pid"]

    daemon.proc.kill()
    await daemon.wait()

    assert await until_gone(*sleeps, timeout=5) == []
    assert start_time(agent_pid) is None


async def test_without_bwrap_the_daemon_refuses_to_start_and_an_opted_out_room_is_logged(world, tmp_path):
    room = await world.room()
    daemon = world.daemon([{"id": room}], env={"PATH": str(tmp_path / "empty")})
    await daemon.launch()
    assert await daemon.wait() == 2
    assert any("the agent sandbox needs bwrap, which is not on PATH; install bubblewrap" in line for line in daemon.raw)

    opted_out = world.daemon([{"id": room, "sandbox": "off"}], env={"PATH": str(tmp_path / "empty")})
    await opted_out.start()
    (entry,) = opted_out.logged("sandbox_off")
    assert entry["rooms"] == [room] and entry["level"] == "warning"
