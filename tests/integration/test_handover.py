"""Hand over from the terminal, end to end: a conversation made by running the real CLI in a directory (with a
HOME of its own) is adopted by a room with `cchat adopt` (real Synapse, the daemon's sandbox, the real CLI and
the scripted model), the room's next prompt goes on with it, and `cchat handback` prints the command that takes
the room's conversation up again in the terminal."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from aiagentchat.handover import project_slug
from tests.harness import claude_binary
from tests.harness.claude_cli import claude_env, run_one_shot
from tests.harness.matrix_user import messages
from tests.integration.conftest import MARKER, run_ended
from tests.integration.test_cchat import Cchat

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


class InDirectory(Cchat):
    """cchat run from a directory of the test's choosing (the project a terminal conversation was started in)."""

    def __init__(self, root: Path, cwd: Path) -> None:
        super().__init__(root)
        self.cwd = cwd

    async def start(self, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiagentchat.cchat", *args,
            env=self.env | (env or {}), cwd=self.cwd,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip


def typed_prompts(request: dict) -> list[str]:
    """The text blocks of the user messages a model request carries, system reminders left out."""
    texts = []
    for message in request["body"]["messages"]:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if message["role"] == "user":
            texts += [b["text"] for b in blocks if b.get("type") == "text" and "<system-reminder>" not in b["text"]]
    return texts


async def replied(world, room: str, command_id: str) -> dict:
    """The bot's answer to the command `command_id`, once the world's user sees it."""

    def answers(events: list[dict]) -> list[dict]:
        return [e for e in messages(events, sender=world.bot_id) if e["content"][MARKER].get("command") == command_id]

    return answers(await world.user.wait_for(lambda events: answers(events) != [], timeout=60, room_id=room))[0]


async def test_a_terminal_conversation_goes_on_in_a_room_and_back_in_the_terminal(world, tmp_path):
    project = (tmp_path / "project").resolve()
    project.mkdir()
    room = await world.room()
    daemon = world.daemon([{"id": room, "name": "work", "workdir": str(project)}])
    await daemon.start()
    cli = InDirectory(tmp_path / "me", project)
    await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    terminal_home = cli.root / "home"
    config = str(daemon.config)

    started = await run_one_shot("say remember papaya", base_url=world.model.base_url, home=terminal_home, cwd=project)
    assert started.result["result"] == "remember papaya", started.stderr
    session = started.result["session_id"]
    transcript = terminal_home / ".claude" / "projects" / project_slug(str(project)) / f"{session}.jsonl"
    before = transcript.read_bytes()

    # a run in progress: refused by the daemon, exit 1, the session kept
    hang = await world.user.send_text(room, "hang")
    await daemon.wait_for_log("run_started", run_id=hang, timeout=60)
    ran = await cli("adopt", "work", "--config", config)
    assert (ran.code, ran.stdout) == (1, ""), ran.stderr
    assert ran.stderr == "cchat: work refused: ⛔ Not now: a prompt is running. Resume once the room is idle.\n"
    await world.user.send_text(room, "!stop")
    await world.user.wait_for(run_ended(hang), timeout=60, room_id=room)

    ran = await cli("adopt", "work", "--config", config)  # from the project directory: its newest conversation
    assert ran.code == 0, ran.stderr
    assert ran.stdout == (
        f"work goes on with conversation {session} (started in {project}): its next prompt resumes it. The "
        "terminal's copy is left as it was.\n"
    )

    def resumes(events: list[dict]) -> list[dict]:
        return [e for e in messages(events, sender=world.user.user_id) if e["content"]["body"] == f"!resume {session}"]

    # each adopt left its line in the room, and the bot's answer to it
    refused, resumed = resumes(await world.user.wait_for(lambda ev: len(resumes(ev)) == 2, timeout=30, room_id=room))
    assert "resumed" not in (await replied(world, room, refused["event_id"]))["content"][MARKER]
    assert (await replied(world, room, resumed["event_id"]))["content"][MARKER]["resumed"] == session

    await world.model.clear()
    assert "I remember: say remember papaya" in await world.ask(room, "recall")
    requests = [r for r in await world.model.requests(full=True) if r["has_tools"]]
    assert typed_prompts(requests[-1]) == ["say remember papaya", "recall"]
    assert "remember papaya" in json.dumps([m for m in requests[-1]["body"]["messages"] if m["role"] == "assistant"])
    assert (await daemon.wait_for_log("agent_started", resume=session))["resume"] == session
    assert transcript.read_bytes() == before  # the terminal's conversation untouched

    ran = await cli("handback", "work", "--config", config)
    assert ran.code == 0, ran.stderr
    assert ran.stdout == f"cd {project} && claude --resume {session}\n"
    assert ran.stderr == f"cchat: conversation {session} copied to {transcript}\n"
    assert transcript.read_bytes().startswith(before) and len(transcript.read_bytes()) > len(before)

    bin_dir = tmp_path / "bin"  # `claude` on the PATH, as in a terminal
    bin_dir.mkdir()
    (bin_dir / "claude").symlink_to(claude_binary())
    env = claude_env(world.model.base_url, terminal_home, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    shell = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", ran.stdout.strip() + " -p recall", env=env, cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await shell.communicate()
    assert shell.returncode == 0, err.decode()
    assert out.decode().strip() == "I remember: say remember papaya | recall"  # the room's turn is in it
