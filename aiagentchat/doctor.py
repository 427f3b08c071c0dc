"""`aiagentchat doctor`: what stands between these settings and a working daemon, one line per check with ✅, ⚠️
or ❌ and, when not ✅, the fix in a few words.

Read-only, so it is safe while the daemon runs: it never starts the built-in homeserver, never opens the bot's
crypto store (the running daemon holds it) or writes into the data dir, and logs in with the saved login. Only
without one does it try the password, with a device of its own that it logs out again at once. The Claude Code
CLI is started once with the daemon's arguments for its initialize handshake (no prompt, no model call), in a
scratch HOME and working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinedRoomsResponse,
    LoginResponse,
    RoomGetStateEventResponse,
    RoomResolveAliasResponse,
    WhoamiResponse,
)
from pydantic import SecretStr

from aiagentchat.control import ControlClient, ControlError, socket_path
from aiagentchat.crypto import cross_signing_path
from aiagentchat.errors import ConfigError
from aiagentchat.identity import IdentityError, fingerprint, query, read_devices, read_identity
from aiagentchat.localserver import Accounts, LocalHomeserver, local_room
from aiagentchat.private import Credentials, check_private_dir, read_private
from aiagentchat.processes import terminate_tree
from aiagentchat.protocol import parse_line
from aiagentchat.runner import agent_environment, cli_arguments, initialize_request
from aiagentchat.sandbox import installation, probe_bwrap, wall_for
from aiagentchat.settings import ClaudeSettings, RoomSettings, Settings, check_safety, load_settings
from aiagentchat.storedrooms import StoredRoom, stored_rooms
from aiagentchat.transport import credentials_path

HOMESERVER_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 30.0
CONTROL_TIMEOUT_S = 5.0
NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)
RATE_LIMITS = "README#rate-limits"


class Level(Enum):
    OK = "✅"
    WARN = "⚠️"
    FAIL = "❌"


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level.value} {self.name}: {self.detail}"
        return f"{text} → {self.fix}" if self.fix and self.level is not Level.OK else text


def exit_code(checks: list[Check]) -> int:
    return 1 if any(check.level is Level.FAIL for check in checks) else 0


async def report(config: Path | None, env: Mapping[str, str], out: Callable[[str], None]) -> int:
    """Run every check, `out` each line as it is known; the exit code (1 when something is ❌)."""
    checks = []
    async for check in diagnose(config, env):
        out(check.line())
        checks.append(check)
    return exit_code(checks)


def missing_claude_login(env: Mapping[str, str]) -> str | None:
    """What to tell the person when the agent has no way to reach the model, or None when it has one:
    an API key or OAuth token in the environment, or the CLI's own login (`claude /login`)."""
    if any(env.get(name) for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")):
        return None
    home = Path(env.get("HOME") or Path.home())
    config_dir = Path(env["CLAUDE_CONFIG_DIR"]) if env.get("CLAUDE_CONFIG_DIR") else home / ".claude"
    if (config_dir / ".credentials.json").exists():
        return None
    return (
        "no ANTHROPIC_API_KEY, CLAUDE_CODE_OAUTH_TOKEN or Claude login (~/.claude/.credentials.json): the daemon "
        "runs, but prompts fail until you set ANTHROPIC_API_KEY (or run `claude /login`) and restart it"
    )


@dataclass
class Session:
    """What the online checks share: the homeserver to ask, the bot's login on it, and what was learnt."""

    settings: Settings  # with the built-in homeserver's account and room when that serves
    builtin: bool = False  # no homeserver configured: the built-in one
    accounts: Accounts | None = None  # the built-in homeserver's
    url: str | None = None  # the homeserver, once it answers
    client: AsyncClient | None = None
    logged_in: bool = False
    own_device: bool = False  # logged in as the bot's own device (not a temporary one of doctor's)
    temporary: bool = False  # logged in with the password as a new device, to be logged out at the end
    joined: set[str] | None = None  # the rooms the bot is in, once known
    encrypted: bool = False  # a configured room is encrypted


async def diagnose(config: Path | None, env: Mapping[str, str]) -> AsyncIterator[Check]:
    """Every check, in order; the settings are read as the daemon reads them."""
    try:
        settings = load_settings(config)
        check_safety(settings)
        if not settings.matrix.homeserver:
            LocalHomeserver.for_settings(settings, config=config)
    except ConfigError as exc:
        yield Check(Level.FAIL, "settings", str(exc), "fix the settings file or its AIAGENTCHAT_ variables")
        return
    source = str(config) if config is not None else "no file: defaults and environment"
    yield Check(Level.OK, "settings", f"{source}, {len(settings.rooms)} room(s)")
    yield _data_dir(settings)
    yield await _daemon(settings)
    session = Session(settings)
    try:
        async for check in _homeserver(session):
            yield check
        async for check in _online(session):
            yield check
        for room in session.settings.rooms:
            async for check in _room(session, room, _name("room", room)):
                yield check
        stored, problem = _stored(session.settings)
        if problem is not None:
            yield problem
        for entry in stored:
            async for check in _stored_room(session, entry):
                yield check
        yield _rate_limit(session)
        yield await _cross_signing(session)
    finally:
        await _close(session)
    served = [entry.room for entry in stored if entry.room is not None]  # their agents are checked too
    agents = session.settings.model_copy(update={"rooms": [*session.settings.rooms, *served]})
    sandbox, walled = await _bwrap(agents)
    yield sandbox
    async for check in _claude(agents, env, walled):
        yield check


def _data_dir(settings: Settings) -> Check:
    data_dir = settings.paths.data_dir
    if not data_dir.exists():
        return Check(Level.OK, "data dir", f"{data_dir} (made at the daemon's first start)")
    try:
        check_private_dir(data_dir, settings.database)
    except ConfigError as exc:
        return Check(Level.FAIL, "data dir", str(exc), "the daemon refuses to start until then")
    return Check(Level.OK, "data dir", f"{data_dir}, private")


async def _daemon(settings: Settings) -> Check:
    """Whether the daemon runs, asked through its control socket (a snapshot: nothing changes)."""
    path = socket_path(settings.paths.data_dir)
    if not path.exists():
        return Check(Level.OK, "daemon", "not running")
    try:
        async with asyncio.timeout(CONTROL_TIMEOUT_S):
            client = await ControlClient.connect(path)
            streaming = asyncio.create_task(client.stream(lambda _message: None))
            try:
                snapshot = await client.request("snapshot")
            finally:
                streaming.cancel()
                await client.close()
    except (ConnectionRefusedError, FileNotFoundError):
        return Check(Level.OK, "daemon", f"not running ({path} is left from a daemon that did not stop cleanly)")
    except (OSError, ControlError, TimeoutError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else getattr(exc, "strerror", None) or str(exc)
        return Check(Level.WARN, "daemon", f"its control socket {path} did not answer: {why}", "run doctor as its user")
    rooms = snapshot.get("rooms", [])
    busy = [f"{room['name']} {room['state']}" for room in rooms if room["state"] != "idle"]
    state = "ready" if snapshot.get("ready") else "starting"
    detail = f"running, {state}, serving {len(rooms)} room(s)" + (f": {', '.join(busy)}" if busy else "")
    return Check(Level.OK, "daemon", detail)


# --- the homeserver and the bot's login ---------------------------------------------------------------------


async def _homeserver(session: Session) -> AsyncIterator[Check]:
    settings = session.settings
    if settings.matrix.homeserver:
        url = settings.matrix.homeserver
        if (trouble := await _unanswered(url)) is not None:
            yield Check(Level.FAIL, "homeserver", f"{url}: {trouble}", "check matrix.homeserver and that it is up")
            return
        session.url = url
        yield Check(Level.OK, "homeserver", f"{url} answers")
        return
    session.builtin = True
    local = LocalHomeserver(settings.paths.data_dir)
    name = "built-in homeserver"
    try:
        accounts = Accounts.load(local.accounts_path)
        port = json.loads(local.server_path.read_text(encoding="utf-8"))["port"] if accounts else 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        yield Check(Level.FAIL, name, f"{local.dir} is damaged ({type(exc).__name__}: {exc})", f"remove {local.dir}")
        return
    if accounts is None:
        yield Check(
            Level.WARN, name, "not set up yet", "start the daemon once: it installs Synapse, the accounts, a room"
        )
        return
    session.accounts = accounts
    url = f"http://127.0.0.1:{port}"
    matrix = settings.matrix.model_copy(
        update={"homeserver": url, "user_id": accounts.bot.user_id, "password": SecretStr(accounts.bot.password)}
    )
    rooms = [*settings.rooms, local_room(accounts)] if accounts.room_id else settings.rooms
    session.settings = settings.model_copy(update={"matrix": matrix, "rooms": rooms})
    if await _unanswered(url) is not None:
        yield Check(Level.WARN, name, f"set up ({local.accounts_path}), not running", "it runs while the daemon runs")
        return
    session.url = url
    yield Check(Level.OK, name, f"set up ({local.accounts_path}), running at {url}")


async def _unanswered(url: str) -> str | None:
    """Why `url` does not answer as a Matrix homeserver (`/_matrix/client/versions`), or None when it does."""
    timeout = aiohttp.ClientTimeout(total=HOMESERVER_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(url.rstrip("/") + "/_matrix/client/versions") as response,
        ):
            body = await response.json(content_type=None)
    except NETWORK_ERRORS as exc:
        return f"no answer ({_describe(exc)})"
    if response.status != 200 or not isinstance(body, dict) or not isinstance(body.get("versions"), list):
        return f"HTTP {response.status}, not a Matrix homeserver's answer"
    return None


async def _online(session: Session) -> AsyncIterator[Check]:
    if session.url is None:
        yield Check(Level.WARN, "login", "not checked: no homeserver answers")
        return
    matrix = session.settings.matrix
    session.client = AsyncClient(
        session.url,
        matrix.user_id,
        config=AsyncClientConfig(
            encryption_enabled=False,  # the bot's crypto store stays closed: the daemon may hold it
            max_limit_exceeded=0,
            max_timeouts=0,
            request_timeout=min(matrix.request_timeout_s, HOMESERVER_TIMEOUT_S),
        ),
    )
    try:
        check = await _login(session, session.client)
        if check.level is not Level.FAIL:
            joined = await session.client.joined_rooms()
            session.joined = set(joined.rooms) if isinstance(joined, JoinedRoomsResponse) else None
    except NETWORK_ERRORS as exc:
        check = Check(Level.FAIL, "login", f"the homeserver stopped answering ({_describe(exc)})", "try again")
    session.logged_in = check.level is not Level.FAIL
    yield check


async def _login(session: Session, client: AsyncClient) -> Check:
    """The daemon's order (transport.login): the configured access token, the saved login, the password; the
    password only when needed, with a device logged out again when doctor ends."""
    matrix = session.settings.matrix
    if matrix.access_token is not None:
        client.access_token = matrix.access_token.get_secret_value()
        whoami = await client.whoami()
        if not isinstance(whoami, WhoamiResponse):
            return Check(
                Level.FAIL,
                "login",
                f"the configured access token was refused ({whoami.status_code})",
                "set a valid AIAGENTCHAT_MATRIX__ACCESS_TOKEN",
            )
        client.restore_login(whoami.user_id, whoami.device_id or "", client.access_token)
        session.own_device = True
        return Check(Level.OK, "login", f"{whoami.user_id}, device {whoami.device_id} (configured access token)")
    path = credentials_path(session.settings)
    try:
        saved = Credentials.load(path)
    except ConfigError as exc:
        return Check(Level.FAIL, "login", str(exc))
    lost = ""
    if saved and saved.homeserver == matrix.homeserver and saved.user_id == matrix.user_id:
        client.restore_login(saved.user_id, saved.device_id, saved.access_token)
        whoami = await client.whoami()
        if isinstance(whoami, WhoamiResponse):
            session.own_device = True
            return Check(Level.OK, "login", f"{saved.user_id}, device {saved.device_id} (saved login, {path})")
        if whoami.status_code != "M_UNKNOWN_TOKEN":
            return Check(Level.FAIL, "login", f"whoami failed: {whoami.status_code} {whoami.message}")
        lost = f"the saved device {saved.device_id} was logged out; "
    if matrix.password is None:
        return Check(
            Level.FAIL,
            "login",
            f"{lost}no saved login and no password",
            "set AIAGENTCHAT_MATRIX__PASSWORD for the first login (or AIAGENTCHAT_MATRIX__ACCESS_TOKEN)",
        )
    response = await client.login(matrix.password.get_secret_value(), device_name=f"{matrix.device_name} doctor")
    if not isinstance(response, LoginResponse):
        return Check(
            Level.FAIL,
            "login",
            f"{lost}the homeserver refused the password of {matrix.user_id} ({response.status_code})",
            "check matrix.user_id and AIAGENTCHAT_MATRIX__PASSWORD",
        )
    session.temporary = True
    return Check(
        Level.WARN if lost else Level.OK,
        "login",
        f"{lost}the password of {matrix.user_id} works; the daemon logs in and keeps its device at its next start",
    )


async def _close(session: Session) -> None:
    client = session.client
    if client is None:
        return
    if session.temporary:
        with contextlib.suppress(*NETWORK_ERRORS):
            await client.logout()
    await client.close()


# --- rooms --------------------------------------------------------------------------------------------------

TRUST = {
    "all": "every device of an allowed user may prompt",
    "tofu": "their devices known at first sight, then verified ones",
    "cross_signed": "devices their owner cross-signed",
    "verified": "devices of identities the bot verified",
}


def _name(kind: str, room: RoomSettings) -> str:
    return f"{kind} {room.name} ({room.id})" if room.name else f"{kind} {room.id}"


def _stored(settings: Settings) -> tuple[list[StoredRoom], Check | None]:
    """The rooms made from the chat that the database keeps (read-only), and a line saying how many, or why they
    could not be read; no line when there are none."""
    try:
        stored = stored_rooms(settings)
    except sqlite3.Error as exc:
        why = f"not read from {settings.database}: {exc}"
        return [], Check(Level.WARN, "stored rooms", why, "run doctor as the daemon's user")
    if not stored:
        return [], None
    return stored, Check(Level.OK, "stored rooms", f"{len(stored)} room(s) made from the chat, in {settings.database}")


async def _stored_room(session: Session, entry: StoredRoom) -> AsyncIterator[Check]:
    """A room made from the chat, checked as a room of the settings is, and the working directory `!project` gave
    it judged as the daemon judges it at its start."""
    room = entry.room
    if room is None:
        yield Check(
            Level.FAIL,
            f"stored room {entry.room_id}",
            f"not served: its keys in the database do not make valid settings ({entry.problem})",
            "make [room_defaults] fit it, or invite the bot to it again",
        )
        return
    name = _name("stored room", room)
    async for check in _room(session, room, name, stored=True):
        yield check
    if entry.workdir is None:
        return
    if entry.problem:
        yield Check(
            Level.WARN,
            name,
            f"the working directory `!project` chose, {entry.workdir}, is not used: {entry.problem}; the daemon "
            f"serves the room in {session.settings.workdir_for(room)}",
            "`!project PATH` there with a directory under daemon.project_roots, or add its root to them",
        )
    else:
        yield Check(Level.OK, name, "its working directory, chosen with `!project`, is under daemon.project_roots")


async def _room(session: Session, room: RoomSettings, name: str, stored: bool = False) -> AsyncIterator[Check]:
    if session.logged_in:
        try:
            checks = await _membership(session, room, name)
        except NETWORK_ERRORS as exc:
            checks = [Check(Level.WARN, name, f"membership and encryption not checked ({_describe(exc)})")]
        for check in checks:
            yield check
    else:
        yield Check(Level.WARN, name, "membership and encryption not checked: no login")
    yield _allowed(room, name, stored)
    if session.settings.claude_for(room).permission_mode == "bypassPermissions":
        yield Check(Level.WARN, name, "bypassPermissions: no tool call is asked", "a room you alone use, or none")
    yield _workdir(session.settings.workdir_for(room), name)
    if room.worktrees:
        yield _worktrees(session.settings.workdir_for(room), room.max_parallel, name)


async def _membership(session: Session, room: RoomSettings, name: str) -> list[Check]:
    client = session.client
    assert client is not None
    room_id = room.id
    if room_id.startswith("#"):
        resolved = await client.room_resolve_alias(room_id)
        if not isinstance(resolved, RoomResolveAliasResponse):
            return [Check(Level.FAIL, name, f"the alias does not resolve ({resolved.status_code})", "check the id")]
        room_id = resolved.room_id
    bot = session.settings.matrix.user_id
    if session.joined is None:
        return [Check(Level.WARN, name, "membership not known: the homeserver did not list the bot's rooms")]
    if room_id not in session.joined:
        return [Check(Level.FAIL, name, f"{bot} is not in the room", f"invite {bot}; the daemon joins at its start")]
    state = await client.room_get_state_event(room_id, "m.room.encryption")
    if isinstance(state, RoomGetStateEventResponse):
        session.encrypted = True
        level = Level.WARN if room.trust == "all" else Level.OK
        encryption = Check(level, name, f"encrypted; trust {room.trust}: {TRUST[room.trust]}", 'trust = "cross_signed"')
    elif state.status_code == "M_NOT_FOUND":
        encryption = Check(Level.OK, name, "not encrypted")
    else:
        encryption = Check(Level.WARN, name, f"encryption unknown ({state.status_code})")
    return [Check(Level.OK, name, f"{bot} is in the room"), encryption]


def _allowed(room: RoomSettings, name: str, stored: bool = False) -> Check:
    if room.allowed_users:
        return Check(Level.OK, name, f"allowed users: {', '.join(room.allowed_users)}")
    fix = "an admin's `!allow @you:example.org` in the room" if stored else 'add allowed_users = ["@you:example.org"]'
    if room.allowed_bots:
        return Check(Level.WARN, name, "only bots may prompt (allowed_users is empty)", fix)
    return Check(Level.FAIL, name, "nobody can prompt: allowed_users is empty", fix)


def _workdir(path: Path, name: str) -> Check:
    if path.exists():
        if path.is_dir() and os.access(path, os.W_OK | os.X_OK):
            return Check(Level.OK, name, f"working directory {path} is writable")
        return Check(Level.FAIL, name, f"working directory {path} is not a directory this user can write", "fix it")
    parent = next(parent for parent in path.parents if parent.exists())
    if os.access(parent, os.W_OK | os.X_OK):
        return Check(Level.OK, name, f"working directory {path} (made at first use)")
    return Check(Level.FAIL, name, f"working directory {path} cannot be made: {parent} is not writable", "fix it")


def _worktrees(workdir: Path, max_parallel: int, name: str) -> Check:
    """A room with `worktrees = true`: whether its threads will get them."""
    if shutil.which("git") is None:
        return Check(Level.FAIL, name, "worktrees = true, but git is not installed", "apt-get install git")
    if not (workdir / ".git").is_dir():
        why = f"worktrees = true, but {workdir} is not the top of a git checkout: threads take turns in it"
        return Check(Level.WARN, name, why, f"git init {workdir}, or worktrees = false")
    return Check(Level.OK, name, f"each thread gets its own git worktree; {max_parallel} run at once")


# --- the bot's account --------------------------------------------------------------------------------------


def _rate_limit(session: Session) -> Check:
    name = "rate limit"
    if not session.builtin:
        return Check(
            Level.WARN, name, "unknown: checking the bot's exemption needs an admin token", f"see {RATE_LIMITS}"
        )
    if session.accounts is not None and session.accounts.bot_unlimited:
        return Check(Level.OK, name, "the bot is exempt (the built-in homeserver saw to it)")
    return Check(Level.WARN, name, "the bot is not exempt yet", "the daemon exempts it at its next start")


async def _cross_signing(session: Session) -> Check:
    name = "cross-signing"
    client = session.client
    if client is None or not session.logged_in:
        return Check(Level.WARN, name, "not checked: no login")
    try:
        stored = _stored_master_key(session.settings)
        published = await query(client, [client.user_id])
    except ConfigError as exc:
        return Check(Level.FAIL, name, str(exc))
    except (IdentityError, *NETWORK_ERRORS) as exc:
        return Check(Level.WARN, name, f"not checked: {_describe(exc)}")
    identity = read_identity(published, client.user_id)
    if identity is None:
        return Check(Level.WARN, name, "the bot has no identity yet", "the daemon makes one at its next start")
    master = f"master key {fingerprint(identity.master)}"
    if stored != identity.master:
        where = "missing here" if stored is None else f"another identity's here ({fingerprint(stored)})"
        return Check(
            Level.FAIL if session.encrypted else Level.WARN,
            name,
            f"the bot's identity ({master}) has its private keys {where}: its device stays unsigned, Element "
            "withholds room keys",
            "`aiagentchat keys import FILE` (from `keys export` on the old host) or `aiagentchat keys reset`",
        )
    if not session.own_device:
        return Check(Level.OK, name, f"{master}, its keys here; the daemon signs its new device at its next start")
    device = read_devices(published, client.user_id).get(client.device_id)
    keys = device.get("keys") if device is not None else None
    ed25519 = keys.get(f"ed25519:{client.device_id}") if isinstance(keys, dict) else None
    if not isinstance(ed25519, str):
        return Check(Level.WARN, name, f"device {client.device_id} has no keys published", "start the daemon")
    if identity.signs(device, ed25519):
        return Check(Level.OK, name, f"device {client.device_id} is signed by the bot's identity ({master})")
    return Check(
        Level.WARN, name, f"device {client.device_id} is not signed yet ({master})", "the daemon signs it at its start"
    )


def _stored_master_key(settings: Settings) -> str | None:
    """The public master key in data_dir/crypto/cross_signing.json (kept in the clear), without the pickle key;
    None when there is no such file. ConfigError for an unsafe or damaged one."""
    path = cross_signing_path(settings)
    try:
        stored = json.loads(read_private(path))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigError(f"{path} is damaged ({exc})") from None
    master = stored.get("master_key") if isinstance(stored, dict) else None
    if not isinstance(master, str):
        raise ConfigError(f"{path} is damaged: no master_key")
    return master


# --- the agent ----------------------------------------------------------------------------------------------


async def _bwrap(settings: Settings) -> tuple[Check, bool]:
    """The sandbox check, and whether bwrap works here."""
    name = "sandbox"
    walls = [settings.claude_for(room).sandbox for room in settings.rooms] or [settings.claude.sandbox]
    unwalled = [room.name or room.id for room in settings.rooms if settings.claude_for(room).sandbox == "off"]
    if "bwrap" not in walls:
        return Check(Level.WARN, name, 'sandbox = "off": agents run without bubblewrap', 'sandbox = "bwrap"'), False
    try:
        await asyncio.to_thread(probe_bwrap)
    except ConfigError as exc:
        return Check(Level.FAIL, name, str(exc)), False
    if unwalled:
        text = f'bubblewrap works, but {", ".join(unwalled)} run their agent without it (sandbox = "off")'
        return Check(Level.WARN, name, text, 'sandbox = "bwrap" unless you mean it'), True
    return Check(Level.OK, name, f"{shutil.which('bwrap')} creates its namespaces"), True


async def _claude(settings: Settings, env: Mapping[str, str], walled: bool) -> AsyncIterator[Check]:
    """The CLI of each distinct effective `[claude]` (usually one for every room)."""
    variants: dict[tuple[str, ...], tuple[ClaudeSettings, list[str]]] = {}
    for room in settings.rooms or [None]:
        claude = settings.claude if room is None else settings.claude_for(room)
        key = (*cli_arguments(claude, None), *claude.env_passthrough, claude.sandbox)
        variants.setdefault(key, (claude, []))[1].append("" if room is None else room.name or room.id)
    for claude, rooms in variants.values():
        suffix = f" ({', '.join(rooms)})" if len(variants) > 1 else ""
        async for check in _cli(claude, env, walled and claude.sandbox == "bwrap", suffix):
            yield check
        yield _credentials(claude, env, f"model credentials{suffix}")


async def _cli(claude: ClaudeSettings, env: Mapping[str, str], walled: bool, suffix: str) -> AsyncIterator[Check]:
    name = f"Claude Code CLI{suffix}"
    try:
        path = installation(claude.binary)
    except FileNotFoundError:
        yield Check(
            Level.FAIL,
            name,
            f"claude.binary {claude.binary!r} is not found",
            "install it (scripts/prepare installs the pinned one) or set claude.binary to its path",
        )
        return
    with tempfile.TemporaryDirectory(prefix="aiagentchat-doctor-") as scratch:
        # a scratch HOME and working directory: the CLI writes its state there, not into anyone's ~/.claude
        workdir, home = Path(scratch) / "work", Path(scratch) / "home"
        workdir.mkdir()
        home.mkdir()
        run_env = agent_environment(claude.env_passthrough, env) | {"HOME": str(home)}
        code, out, err = await _run([str(path), "--version"], b"", run_env, workdir)
        if code != 0:
            yield Check(Level.FAIL, name, f"{path} --version failed ({_tail(err, code)})", "reinstall the CLI")
            return
        yield Check(Level.OK, name, f"{path}, version {out.strip()}")
        command = [str(path), *cli_arguments(claude, None)[1:]]
        if walled:
            wall = wall_for(claude, workdir, home, Path(env.get("HOME") or Path.home()))
            command = wall.argv(command)
        request = initialize_request()
        code, out, err = await _run(command, (json.dumps(request) + "\n").encode(), run_env, workdir)
    response = _control_response(out, request["request_id"])
    how = "in its sandbox" if walled else "without a sandbox"
    if response is None:
        yield Check(
            Level.FAIL,
            name,
            f"no answer to the daemon's handshake, run {how} ({_tail(err, code)})",
            "check claude.extra_args and the CLI's version",
        )
        return
    yield Check(Level.OK, name, f"the daemon's handshake, run {how}, answered: {_capabilities(response)}")


def _credentials(claude: ClaudeSettings, env: Mapping[str, str], name: str) -> Check:
    """Whether the agent gets a way to reach the model: names only, never a value."""
    given = agent_environment(claude.env_passthrough, env) | {"HOME": env.get("HOME", "")}
    if missing_claude_login(given) is None:
        names = [
            key for key in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN") if given.get(key)
        ]
        return Check(
            Level.OK, name, f"the agent gets {names[0] if names else 'the CLI login (~/.claude/.credentials.json)'}"
        )
    if missing_claude_login(env) is None:
        return Check(
            Level.FAIL,
            name,
            "the daemon has model credentials but env_passthrough keeps them from the agent",
            'add "ANTHROPIC_*" to env_passthrough',
        )
    return Check(
        Level.FAIL,
        name,
        "no ANTHROPIC_API_KEY, CLAUDE_CODE_OAUTH_TOKEN or Claude login: prompts fail",
        "set ANTHROPIC_API_KEY (or run `claude /login`) where the daemon runs",
    )


async def _run(command: list[str], stdin: bytes, env: dict[str, str], cwd: Path) -> tuple[int | None, str, str]:
    """Run `command` with `stdin` (then closed); its exit code (None when it timed out and was ended), stdout,
    stderr."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        await terminate_tree(proc, 3.0)
        return None, "", f"no answer within {CLI_TIMEOUT_S:g} s"
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _control_response(out: str, request_id: str) -> dict[str, Any] | None:
    """The successful answer to the request `request_id` among the CLI's output lines, if there is one."""
    for line in out.splitlines():
        if (event := parse_line(line.encode())) is None:
            continue
        response = event.get("response")
        if (
            event.get("type") == "control_response"
            and isinstance(response, dict)
            and response.get("request_id") == request_id
            and response.get("subtype") == "success"
        ):
            answer = response.get("response")
            return answer if isinstance(answer, dict) else {}
    return None


def _capabilities(response: dict[str, Any]) -> str:
    """What the CLI's initialize answer reports it offers, in a few words."""
    parts = [f"{len(value)} {key}" for key in ("commands", "agents") if isinstance(value := response.get(key), list)]
    models = response.get("models")
    if isinstance(models, list):
        values = [str(model.get("value")) for model in models if isinstance(model, dict)]
        parts.append("models " + ", ".join(values[:6]) + (", …" if len(values) > 6 else ""))
    return "; ".join(parts) or "no capabilities reported"


def _tail(err: str, code: int | None) -> str:
    last = " ".join(err.strip().splitlines()[-3:])[-300:]
    return last or (f"exit code {code}" if code is not None else "no answer")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
