"""The built-in local homeserver: from an empty data dir, `python -m aiagentchat` with no homeserver configured
starts its own Synapse, makes the accounts and the room, prints how to connect, and answers in that room; a
second run reuses all of it. Synapse comes from the tests' venv (`AIAGENTCHAT_LOCAL_SYNAPSE_PYTHON`); the
venv-creation path is checked by the commands it would run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aiagentchat import localserver
from aiagentchat.cli import missing_claude_login
from aiagentchat.localserver import REQUIREMENTS, Accounts, LocalHomeserver, add_saved_room, ensure_venv
from aiagentchat.settings import ConfigError, Settings
from tests.harness import REPO_ROOT, claude_binary, coverage_env, synapse_python
from tests.harness.matrix_user import MatrixUser
from tests.integration.conftest import bot_text, run_ended
from tests.integration.daemon import write_settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

INFO = re.compile(r"^\s+(homeserver|user|password|room):\s+(\S+)", re.MULTILINE)


class LocalDaemon:
    """`python -m aiagentchat` as a subprocess, collecting its stdout (text) and stderr (JSON log lines)."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.stdout = ""
        self.logs: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.stdout, self.logs, self.raw = "", [], []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiagentchat",
            "--config",
            str(self.config),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._readers = [
            asyncio.create_task(self._read(self.proc.stdout, self._on_stdout)),
            asyncio.create_task(self._read(self.proc.stderr, self._on_stderr)),
        ]

    @staticmethod
    async def _read(stream: asyncio.StreamReader | None, handle: Any) -> None:
        assert stream is not None
        while line := await stream.readline():
            handle(line.decode("utf-8", "replace"))

    def _on_stdout(self, line: str) -> None:
        self.stdout += line

    def _on_stderr(self, line: str) -> None:
        self.raw.append(line.rstrip("\n"))
        try:
            entry = json.loads(line)
        except ValueError:
            return
        if isinstance(entry, dict):
            self.logs.append(entry)

    def info(self) -> dict[str, str]:
        return dict(INFO.findall(self.stdout))

    async def wait_until_ready(self, timeout: float = 40) -> dict[str, str]:
        """Wait for the `ready` log line and the printed connection info; returns the info."""
        deadline = time.monotonic() + timeout
        while not (any(e.get("event") == "ready" for e in self.logs) and "cchat send" in self.stdout):
            assert self.proc is not None
            if self.proc.returncode is not None or time.monotonic() > deadline:
                tail = "\n".join(self.raw[-30:])
                raise AssertionError(
                    f"daemon not ready (exit code {self.proc.returncode}); stdout:\n{self.stdout}\nstderr tail:\n{tail}"
                )
            await asyncio.sleep(0.1)  # poll interval of the condition above
        return self.info()

    async def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def synapse_processes(config: Path) -> list[int]:
    """Live processes whose command line names this Synapse config."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "status").read_text().split("State:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(config).encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def whoami(base_url: str, token: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.get(base_url + "/_matrix/client/v3/account/whoami") as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def ask(daemon: LocalDaemon, user: MatrixUser, room_id: str, text: str) -> str:
    """Post a prompt and wait until its run ends; the bot's whole output for it."""
    prompt_id = await user.send_text(room_id, text)
    try:
        events = await user.wait_for(run_ended(prompt_id), timeout=30, room_id=room_id)
    except AssertionError as exc:
        tail = "\n".join(daemon.raw[-20:])
        raise AssertionError(f"{exc}\ndaemon log tail:\n{tail}") from None
    return bot_text(events, prompt_id, status=True)


async def test_first_run_makes_everything_and_a_second_run_reuses_it(model, tmp_path: Path) -> None:
    data, home, cchat_dir = tmp_path / "data", tmp_path / "home", tmp_path / "cchat"
    home.mkdir()
    config = tmp_path / "settings.toml"
    sections = {"paths": {"data_dir": str(data)}, "claude": {"binary": claude_binary()}}
    write_settings(config, sections | {"daemon": {"http_listen": "127.0.0.1:0"}}, [])
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": model.base_url,
        "ANTHROPIC_API_KEY": "test-key",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CCHAT_CONFIG_DIR": str(cchat_dir),
        "AIAGENTCHAT_CLAUDE__BINARY": claude_binary(),
        "AIAGENTCHAT_LOCAL_SYNAPSE_PYTHON": synapse_python(),
    } | coverage_env()
    cchat = REPO_ROOT / "scripts" / "cchat"
    daemon = LocalDaemon(config, env | {"AIAGENTCHAT_CCHAT": str(cchat)})  # as scripts/run sets it
    hs_dir = data / "homeserver"
    synapse_config = hs_dir / "synapse" / "hs.yaml"
    try:
        await daemon.start()
        info = await daemon.wait_until_ready()
        url = info["homeserver"]
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}"
        assert info["user"] == "@you:localhost"
        assert info["room"].startswith("!")
        printed = f'{cchat} send local "say hello" --wait --config {config}'
        assert f"\n  {printed}\n" in daemon.stdout
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        ran = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            printed,
            cwd=elsewhere,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(ran.communicate(), 60)
        assert ran.returncode == 0, err.decode()
        assert "hello" in out.decode() and out.decode().endswith("\n"), out.decode()  # the line works as printed
        assert not any(e.get("event") == "no_claude_login" for e in daemon.logs)

        accounts = json.loads((hs_dir / "accounts.json").read_text())
        assert accounts["user"]["password"] == info["password"]
        assert accounts["room_id"] == info["room"]
        assert (mode(hs_dir), mode(hs_dir / "accounts.json"), mode(hs_dir / "server.json")) == (0o700, 0o600, 0o600)
        assert info["password"] not in "\n".join(daemon.raw)
        assert accounts["bot"]["password"] not in daemon.stdout + "\n".join(daemon.raw)

        credentials_path = cchat_dir / "credentials.json"
        credentials = json.loads(credentials_path.read_text())
        assert mode(credentials_path) == 0o600
        assert set(credentials) == {"homeserver", "user_id", "device_id", "access_token"}
        assert (credentials["homeserver"], credentials["user_id"]) == (url, "@you:localhost")
        assert (await whoami(url, credentials["access_token"]))["device_id"] == credentials["device_id"]

        async with MatrixUser() as you:
            await you.login(url, info["user"], info["password"])
            answer = await ask(daemon, you, info["room"], "say hello")
            assert "hello" in answer and "✅ Done" in answer, answer

            assert await daemon.stop() == 0
            assert not port_open(port) and synapse_processes(synapse_config) == []
            saved = {name: (hs_dir / name).read_bytes() for name in ("accounts.json", "server.json")}
            saved_credentials = credentials_path.read_bytes()
            first_stdout = daemon.stdout

            await daemon.start()
            assert await daemon.wait_until_ready() == info | {"password": "kept"}
            kept = f"password:   kept in {hs_dir / 'accounts.json'} (shown only on the first run)"
            assert daemon.stdout == first_stdout.replace(f"password:   {info['password']}", kept)
            assert info["password"] not in daemon.stdout
            assert {name: (hs_dir / name).read_bytes() for name in saved} == saved
            assert credentials_path.read_bytes() == saved_credentials
            answer = await ask(daemon, you, info["room"], "say hello again")
            assert "hello again" in answer and "✅ Done" in answer, answer
            assert not any(e.get("event") in ("local_account_created", "local_room_created") for e in daemon.logs)
    finally:
        if daemon.proc is not None and daemon.proc.returncode is None:
            await daemon.stop()
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert synapse_processes(synapse_config) == []
    with sqlite3.connect(hs_dir / "synapse" / "homeserver.db") as db:
        users = dict(db.execute("SELECT name, deactivated FROM users"))
        rooms = [room for (room,) in db.execute("SELECT room_id FROM rooms")]
        overrides = list(db.execute("SELECT user_id, messages_per_second, burst_count FROM ratelimit_override"))
        tokens = [user for (user,) in db.execute("SELECT user_id FROM access_tokens") if "admin" in user]
    admins = [name for name in users if name.startswith("@aiagentchat-admin-")]
    assert users == {"@aiagentchat:localhost": 0, "@you:localhost": 0, admins[0]: 1}  # one admin, deactivated
    assert rooms == [info["room"]]
    assert overrides == [("@aiagentchat:localhost", 0, 0)] and tokens == []  # the bot is not rate limited
    assert json.loads((hs_dir / "accounts.json").read_text())["bot_unlimited"] is True


async def test_venv_is_installed_once_from_the_shared_pin(tmp_path: Path) -> None:
    venv, log = tmp_path / "venv", tmp_path / "install.log"
    commands: list[list[str]] = []

    async def run(args: list[str], log_path: Path) -> None:
        assert log_path == log
        commands.append(list(args))
        (venv / "bin").mkdir(parents=True, exist_ok=True)  # what `python -m venv` leaves behind

    expected = [
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--require-virtualenv",
            "--require-hashes",
            "-r",
            str(REPO_ROOT / "aiagentchat" / "synapse-requirements.txt"),
        ],
    ]
    assert await ensure_venv(venv, log, run) == str(venv / "bin" / "python")
    assert commands == expected
    commands.clear()
    await ensure_venv(venv, log, run)
    assert commands == []  # a finished install of the same pin is kept

    (venv / localserver.VENV_MARKER).write_text("matrix-synapse==0.0.1\n")  # an older pin: reinstall afresh
    (venv / "stale").write_text("")
    await ensure_venv(venv, log, run)
    assert commands == expected and not (venv / "stale").exists()

    assert "matrix-synapse==" in REQUIREMENTS.read_text()
    pins = re.findall(r"^\S+==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", REQUIREMENTS.read_text(), re.M)
    assert len(pins) == REQUIREMENTS.read_text().count("==") and all(pins)  # every pin with its hashes
    assert "aiagentchat/synapse-requirements.txt" in (REPO_ROOT / "scripts" / "prepare").read_text()


async def test_a_failed_start_says_why_and_leaves_no_process(tmp_path: Path) -> None:
    server = LocalHomeserver(tmp_path / "data", env={localserver.PYTHON_ENV: synapse_python()})
    await server.start()
    port = server.process.port
    try:
        other = LocalHomeserver(tmp_path / "data", env={localserver.PYTHON_ENV: synapse_python()})
        with pytest.raises(localserver.HomeserverError, match=f"port {port} .* is in use"):
            await other.start()
    finally:
        await server.stop()
    assert not port_open(port)

    (tmp_path / "data" / "homeserver" / "synapse" / "hs.yaml").write_text("listeners: [not a listener]\n")
    broken = LocalHomeserver(tmp_path / "data", env={localserver.PYTHON_ENV: synapse_python()})
    with pytest.raises(localserver.HomeserverError, match=r"(?s)exited with code \d+ during start-up.*synapse.out"):
        await broken.start()
    assert synapse_processes(tmp_path / "data" / "homeserver" / "synapse" / "hs.yaml") == []


def test_an_account_without_a_homeserver_is_refused(tmp_path: Path) -> None:
    settings = Settings(matrix={"user_id": "@bot:example.org"}, paths={"data_dir": tmp_path})
    with pytest.raises(ConfigError, match="matrix.user_id is set but matrix.homeserver is not"):
        LocalHomeserver.for_settings(settings)
    assert LocalHomeserver.for_settings(Settings(paths={"data_dir": tmp_path})).dir == tmp_path / "homeserver"


def test_tools_find_the_saved_room_by_name(tmp_path: Path) -> None:
    settings = Settings(paths={"data_dir": tmp_path}, rooms=[{"id": "!mine:x"}])
    assert add_saved_room(settings) == settings  # no first run yet
    accounts = Accounts.generate()
    accounts.room_id = "!r:localhost"
    accounts.save(tmp_path / "homeserver" / "accounts.json")
    mine, room = add_saved_room(settings).rooms
    assert (room.id, room.name, room.allowed_users) == ("!r:localhost", "local", ["@you:localhost"])
    assert add_saved_room(settings).matrix.user_id == "@aiagentchat:localhost"  # cchat takes answers only from it
    own_homeserver = settings.model_copy(update={"matrix": settings.matrix.model_copy(update={"homeserver": "x"})})
    assert add_saved_room(own_homeserver) == own_homeserver


def test_cchat_credentials_location(tmp_path: Path) -> None:
    path = localserver.cchat_credentials_path
    assert path({"CCHAT_CONFIG_DIR": "/c", "XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/c/credentials.json")
    assert path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/x/aiagentchat/credentials.json")
    assert path({"XDG_CONFIG_HOME": "relative", "HOME": "/h"}) == Path("/h/.config/aiagentchat/credentials.json")
    assert path({"HOME": "/h"}) == Path("/h/.config/aiagentchat/credentials.json")


def test_missing_claude_login_is_explained(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    message = missing_claude_login(home)
    assert message is not None and "ANTHROPIC_API_KEY" in message
    assert missing_claude_login(home | {"ANTHROPIC_API_KEY": "k"}) is None
    assert missing_claude_login(home | {"CLAUDE_CODE_OAUTH_TOKEN": "t"}) is None
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / ".credentials.json").write_text("{}")
    assert missing_claude_login(home) is None
