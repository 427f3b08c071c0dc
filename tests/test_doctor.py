"""`aiagentchat doctor` without a homeserver: the lines, the exit code, and the checks that need no network."""

import asyncio
import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aiagentchat.doctor import (
    Check,
    Level,
    Session,
    _allowed,
    _capabilities,
    _claude,
    _control_response,
    _credentials,
    _stored,
    _stored_room,
    _workdir,
    _worktrees,
    exit_code,
    report,
)
from aiagentchat.localserver import Accounts, port_in_use
from aiagentchat.settings import ClaudeSettings, RoomSettings, load_settings
from aiagentchat.store import Store
from aiagentchat.storedrooms import StoredRoom

pytestmark = pytest.mark.anyio
FAKE = Path(__file__).parent / "fakes" / "fake_claude.py"


def test_a_line_shows_the_fix_only_when_something_is_wrong() -> None:
    assert Check(Level.OK, "login", "@bot:hs, device D", "unused").line() == "✅ login: @bot:hs, device D"
    assert Check(Level.WARN, "rate limit", "unknown", "see README").line() == "⚠️ rate limit: unknown → see README"
    assert Check(Level.FAIL, "room !r", "nobody can prompt", "add").line() == "❌ room !r: nobody can prompt → add"
    assert Check(Level.FAIL, "sandbox", "bwrap missing").line() == "❌ sandbox: bwrap missing"


def test_the_exit_code_is_1_only_when_a_check_failed() -> None:
    ok, warn, fail = Check(Level.OK, "a", "b"), Check(Level.WARN, "a", "b"), Check(Level.FAIL, "a", "b")
    assert exit_code([]) == 0
    assert exit_code([ok, warn, warn]) == 0
    assert exit_code([ok, fail, warn]) == 1


async def test_bad_settings_are_one_failed_line(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text("[claude]\ntimeout_s = -1\n")
    lines: list[str] = []
    assert await report(config, {}, lines.append) == 1
    assert len(lines) == 1 and lines[0].startswith("❌ settings: ") and ":2: claude.timeout_s" in lines[0]


async def test_an_unreachable_homeserver_fails_and_the_online_checks_are_skipped(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "settings.toml"
    config.write_text(
        f'[matrix]\nhomeserver = "http://127.0.0.1:{port}"\nuser_id = "@bot:localhost"\n'
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[claude]\nbinary = "{tmp_path / "missing"}"\nsandbox = "off"\n'
        '[[rooms]]\nid = "!room:localhost"\nallowed_users = ["@you:localhost"]\n'
    )
    lines: list[str] = []
    assert await report(config, {"HOME": str(tmp_path), "ANTHROPIC_API_KEY": "secret-key"}, lines.append) == 1
    text = "\n".join(lines)
    assert f"❌ homeserver: http://127.0.0.1:{port}: no answer" in text
    assert "⚠️ login: not checked" in text
    assert "⚠️ room !room:localhost: membership and encryption not checked" in text
    assert "✅ room !room:localhost: allowed users: @you:localhost" in text
    assert "⚠️ rate limit: unknown" in text and "README#rate-limits" in text
    assert "❌ Claude Code CLI: claude.binary" in text
    assert "✅ model credentials: the agent gets ANTHROPIC_API_KEY" in text
    assert "secret-key" not in text
    assert not (tmp_path / "data").exists()  # doctor writes nothing


def test_a_room_without_allowed_users_fails() -> None:
    assert _allowed(RoomSettings(id="!r:hs"), "room").level is Level.FAIL
    assert _allowed(RoomSettings(id="!r:hs", allowed_bots=["@b:hs"]), "room").level is Level.WARN
    assert _allowed(RoomSettings(id="!r:hs", allowed_users=["@u:hs"]), "room").level is Level.OK


def test_a_working_directory_is_writable_or_can_be_made(tmp_path: Path) -> None:
    assert _workdir(tmp_path, "room").level is Level.OK
    assert "made at first use" in _workdir(tmp_path / "a" / "b", "room").detail
    (tmp_path / "file").write_text("")
    assert _workdir(tmp_path / "file", "room").level is Level.FAIL


def test_model_credentials_name_their_source_and_never_their_value(tmp_path: Path) -> None:
    claude = ClaudeSettings()
    given = _credentials(claude, {"HOME": str(tmp_path), "ANTHROPIC_API_KEY": "sk-secret"}, "model credentials")
    assert given.level is Level.OK and "ANTHROPIC_API_KEY" in given.detail and "sk-secret" not in given.line()
    blocked = ClaudeSettings(env_passthrough=["PATH", "HOME"])
    dropped = _credentials(blocked, {"HOME": str(tmp_path), "ANTHROPIC_API_KEY": "sk-secret"}, "model credentials")
    assert dropped.level is Level.FAIL and "env_passthrough" in dropped.detail
    assert _credentials(claude, {"HOME": str(tmp_path)}, "model credentials").level is Level.FAIL
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / ".credentials.json").write_text("{}")
    assert _credentials(claude, {"HOME": str(tmp_path)}, "model credentials").level is Level.OK


def test_the_handshake_answer_is_found_and_summarised() -> None:
    answer = {"commands": [{}, {}], "agents": [{}], "models": [{"value": "default"}, {"value": "opus"}]}
    out = "not json\n" + json.dumps(
        {"type": "control_response", "response": {"subtype": "success", "request_id": "r1", "response": answer}}
    )
    assert _control_response(out, "r1") == answer
    assert _control_response(out, "other") is None
    assert _capabilities(answer) == "2 commands; 1 agents; models default, opus"
    assert _capabilities({}) == "no capabilities reported"


async def test_the_cli_is_started_with_the_daemons_arguments_and_answers_the_handshake(tmp_path: Path) -> None:
    script = tmp_path / "claude"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    script.chmod(0o755)
    config = tmp_path / "settings.toml"
    config.write_text(f'[claude]\nbinary = "{script}"\nsandbox = "off"\n')
    settings = load_settings(config)
    checks = [check async for check in _claude(settings, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, False)]
    assert [check.level for check in checks] == [Level.OK, Level.OK, Level.FAIL]
    assert "version 0.0.0 (fake)" in checks[0].detail
    assert "handshake, run without a sandbox, answered" in checks[1].detail
    assert checks[2].name == "model credentials"


async def test_the_built_in_homeserver_is_reported_and_never_started(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(f'[paths]\ndata_dir = "{tmp_path / "data"}"\n[claude]\nsandbox = "off"\n')
    env = {"HOME": str(tmp_path), "PATH": "/nonexistent"}
    lines: list[str] = []
    await report(config, env, lines.append)
    assert "⚠️ built-in homeserver: not set up yet → start the daemon once" in "\n".join(lines)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    homeserver = tmp_path / "data" / "homeserver"
    homeserver.mkdir(parents=True, mode=0o700)
    (homeserver / "server.json").write_text(json.dumps({"port": port, "registration_shared_secret": "s"}))
    accounts = Accounts.generate()
    accounts.room_id = "!local:localhost"
    accounts.bot_unlimited = True
    accounts.save(homeserver / "accounts.json")
    lines.clear()
    await report(config, env, lines.append)
    text = "\n".join(lines)
    assert "⚠️ built-in homeserver: set up" in text and "not running → it runs while the daemon runs" in text
    assert "✅ room local (!local:localhost): allowed users: @you:localhost" in text
    assert "✅ rate limit: the bot is exempt" in text
    assert not port_in_use(port)


def test_a_room_with_worktrees_is_told_whether_its_threads_get_them(tmp_path, monkeypatch):
    assert _worktrees(tmp_path, 2, "room").level is Level.WARN  # not a checkout: threads take turns
    (tmp_path / ".git").mkdir()
    checked = _worktrees(tmp_path, 3, "room")
    assert checked.level is Level.OK and "3 run at once" in checked.detail
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert _worktrees(tmp_path, 3, "room").level is Level.FAIL


def keep_rooms(database: Path, *rooms: tuple[str, dict[str, Any]]) -> None:
    """Rooms made from the chat, as the daemon's database keeps them."""

    async def add() -> None:
        store = await Store.open(database)
        for room_id, chat in rooms:
            await store.add_chat_room(room_id, "@admin:localhost", chat)
        await store.close()

    asyncio.run(add())


def test_the_stored_rooms_are_checked_like_the_settings_rooms_and_named_as_stored(tmp_path: Path) -> None:
    data, code = tmp_path / "data", tmp_path / "code"
    (code / "site").mkdir(parents=True)
    keep_rooms(
        data / "aiagentchat.db",
        ("!file:localhost", {"allowed_users": ["@you:localhost"]}),  # settings.toml configures it: not stored
        ("!chat:localhost", {"allowed_users": ["@you:localhost"], "name": "chat"}),
        ("!empty:localhost", {"allowed_users": []}),
        ("!site:localhost", {"allowed_users": ["@you:localhost"], "workdir": str(code / "site")}),
        ("!gone:localhost", {"allowed_users": ["@you:localhost"], "workdir": str(code / "gone")}),
        ("!bad:localhost", {"allowed_users": "@you:localhost"}),
    )
    (data / "aiagentchat.db").chmod(0o600)
    before = sorted((path.name, path.stat().st_mtime_ns) for path in data.iterdir())
    config = tmp_path / "settings.toml"
    config.write_text(
        f'[matrix]\nhomeserver = "http://127.0.0.1:{free_port()}"\nuser_id = "@bot:localhost"\n'
        f'[paths]\ndata_dir = "{data}"\n[daemon]\nproject_roots = ["{code}"]\n'
        f'[claude]\nbinary = "{tmp_path / "missing"}"\nsandbox = "off"\n'
        '[[rooms]]\nid = "!file:localhost"\nallowed_users = ["@you:localhost"]\n'
    )
    lines: list[str] = []
    assert await_report(config, {"HOME": str(tmp_path)}, lines) == 1
    assert f"✅ stored rooms: 5 room(s) made from the chat, in {data / 'aiagentchat.db'}" in lines
    assert "⚠️ stored room chat (!chat:localhost): membership and encryption not checked: no login" in lines
    assert "✅ stored room chat (!chat:localhost): allowed users: @you:localhost" in lines
    assert any(line.startswith("✅ stored room chat (!chat:localhost): working directory ") for line in lines)
    assert (
        "❌ stored room !empty:localhost: nobody can prompt: allowed_users is empty → an admin's "
        "`!allow @you:example.org` in the room"
    ) in lines
    assert f"✅ stored room !site:localhost: working directory {code / 'site'} is writable" in lines
    assert "✅ stored room !site:localhost: its working directory, chosen with `!project`, is under" in "\n".join(lines)
    gone = next(line for line in lines if line.startswith("⚠️ stored room !gone:localhost: the working directory"))
    assert f"`!project` chose, {code / 'gone'}, is not used: `{code / 'gone'}` does not exist" in gone
    assert f"the daemon serves the room in {data / 'rooms'}/" in gone and "→ `!project PATH` there" in gone
    bad = next(line for line in lines if line.startswith("❌ stored room !bad:localhost: not served"))
    assert "allowed_users: Input should be a valid list" in bad
    assert not any("stored room !file:localhost" in line for line in lines)
    assert [line for line in lines if "room !file:localhost" in line] == [
        "⚠️ room !file:localhost: membership and encryption not checked: no login",
        "✅ room !file:localhost: allowed users: @you:localhost",
        f"✅ room !file:localhost: working directory {data / 'rooms'}/"
        + next(line for line in lines if "room !file:localhost: working" in line).split("/rooms/")[1],
    ]
    assert sorted((path.name, path.stat().st_mtime_ns) for path in data.iterdir()) == before  # nothing written


def test_stored_rooms_that_cannot_be_read_are_a_warning(tmp_path: Path) -> None:
    settings = load_settings(write_settings(tmp_path, f'[paths]\ndata_dir = "{tmp_path / "data"}"\n'))
    assert _stored(settings) == ([], None)  # no database: no line
    (tmp_path / "data").mkdir()
    settings.database.write_bytes(b"not a database at all, just some bytes" * 40)
    stored, check = _stored(settings)
    assert stored == [] and check is not None and check.level is Level.WARN
    assert check.line().startswith(f"⚠️ stored rooms: not read from {settings.database}: ")


async def test_a_stored_room_the_bot_is_not_in_fails_like_a_configured_one(tmp_path: Path) -> None:
    settings = load_settings(write_settings(tmp_path, f'[paths]\ndata_dir = "{tmp_path / "data"}"\n'))
    room = settings.room_defaults.room("!chat:localhost", {"allowed_users": ["@you:localhost"]})
    session = Session(settings, client=SimpleNamespace(), logged_in=True, joined={"!other:localhost"})
    checks = [check async for check in _stored_room(session, StoredRoom("!chat:localhost", room))]
    assert checks[0].line() == (
        "❌ stored room !chat:localhost: @bot:localhost is not in the room → invite @bot:localhost; the daemon joins at "
        "its start"
    )


def free_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def await_report(config: Path, env: dict[str, str], lines: list[str]) -> int:
    return asyncio.run(report(config, env, lines.append))


def write_settings(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text('[matrix]\nuser_id = "@bot:localhost"\nhomeserver = "http://127.0.0.1:9"\n' + text)
    return path
