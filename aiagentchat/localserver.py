"""The built-in local homeserver: when no `matrix.homeserver` is configured, the daemon runs its own Synapse.

Everything lives under `data_dir/homeserver/` (mode 0700):

- `venv/`: Synapse's private virtual environment, installed once from `synapse-requirements.txt` (the same pin
  the tests use); `AIAGENTCHAT_LOCAL_SYNAPSE_PYTHON` names an existing Synapse python instead.
- `synapse/`: its config (`hs.yaml`), SQLite database, media, signing key and logs (`homeserver.log`, and
  `synapse.out` for its own stdout/stderr).
- `server.json` (0600): the port, chosen once, and the registration shared secret.
- `accounts.json` (0600): the bot's and the user's generated passwords, and the room created for them.

Synapse listens on 127.0.0.1 only, without federation, with registration closed (shared secret only). The
daemon owns the process: `LocalHomeserver.run(settings, serve)` starts it, prepares the accounts and the room
on the first run, prints how to connect (the user's password only on the run that made it; later runs point at
`accounts.json`), runs `serve` with settings pointing at it, and stops it afterwards (SIGTERM, then SIGKILL).

The pieces that run any Synapse (`write_config`, `SynapseProcess`, `register`) are shared with the tests'
harness (`tests/harness/synapse.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import hmac
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from pydantic import SecretStr

from aiagentchat.private import write_private
from aiagentchat.settings import ConfigError, RoomSettings, Settings

log = structlog.get_logger(__name__)

SERVER_NAME = "localhost"
REQUIREMENTS = Path(__file__).with_name("synapse-requirements.txt")
PYTHON_ENV = "AIAGENTCHAT_LOCAL_SYNAPSE_PYTHON"
VENV_MARKER = "aiagentchat-requirements.txt"  # a copy of the requirements a finished install came from
START_TIMEOUT_S = 60.0
# Stopping: SIGTERM, SIGKILL after STOP_TIMEOUT_S (Synapse exits in about 0.05 s), then at most KILLED_WAIT_S.
# With the daemon's own shutdown_timeout_s (5 s) that keeps SIGTERM to exit under the 10 s podman and Docker give.
STOP_TIMEOUT_S = 2.0
KILLED_WAIT_S = 1.0
BOT_NAME = "aiagentchat"
USER_NAME = "you"
ADMIN_NAME = "aiagentchat-admin"  # the admin that lifts the bot's rate limit, deactivated after
ROOM_NAME = "local"
CCHAT_VARIABLE = "AIAGENTCHAT_CCHAT"  # how to run cchat from where the daemon was started (scripts/run sets it)

# Synapse's defaults (rc_login: 0.003/s, burst 5 per address and per account; rc_registration: 0.17/s, burst
# 3) lock a person out after a few logins from cchat, Element and the daemon on one machine.
LOCAL_RATE_LIMITS: dict[str, Any] = {
    "rc_login": {
        "address": {"per_second": 1, "burst_count": 30},
        "account": {"per_second": 1, "burst_count": 30},
        "failed_attempts": {"per_second": 0.17, "burst_count": 10},
    },
    "rc_registration": {"per_second": 1, "burst_count": 30},
}

# Run with Synapse's python (it has PyYAML; the project's environment does not): merge the overrides (JSON
# on stdin) into the generated config and report the resulting registration_shared_secret.
_MERGE_CONFIG = """
import json, sys, yaml
path = sys.argv[1]
overrides = json.load(sys.stdin)
with open(path) as f:
    config = yaml.safe_load(f)
config.update(overrides)
with open(path, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
print(json.dumps({"registration_shared_secret": config["registration_shared_secret"]}))
"""


class HomeserverError(RuntimeError):
    """The homeserver could not be installed, configured or started; the message says why (with log tails)."""


class UserExists(HomeserverError):
    """Shared-secret registration refused a user name that is already taken (`M_USER_IN_USE`)."""


# --- pieces shared with the tests' harness ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (connections of a past run in TIME_WAIT do not count,
    as they do not for Synapse, which binds with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a text file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path.name} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def base_config(port: int) -> dict[str, Any]:
    """Config overrides every Synapse of this project gets: one client-only listener on 127.0.0.1, no
    federation, no key servers, closed registration, no presence, no phoning home."""
    return {
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "enable_registration": False,
        "report_stats": False,
        "presence": {"enabled": False},
    }


async def run_checked(*args: str, cwd: Path, stdin: bytes | None = None) -> str:
    """Run a command to completion; its output, or HomeserverError with that output."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=str(cwd),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise HomeserverError(f"cannot run {args[0]}: {exc}") from exc
    out, _ = await proc.communicate(stdin)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise HomeserverError(f"{' '.join(args[:4])} ... failed ({proc.returncode}):\n{text}")
    return text


async def write_config(python: str, directory: Path, overrides: dict[str, Any], server_name: str = SERVER_NAME) -> str:
    """Generate `directory/hs.yaml` (SQLite, data in `directory`) with `overrides` merged in; returns its
    registration shared secret. The file appears only once complete."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "hs.yaml.partial"
    partial.unlink(missing_ok=True)
    await run_checked(
        python,
        "-m",
        "synapse.app.homeserver",
        "--server-name",
        server_name,
        "--config-path",
        str(partial),
        "--data-directory",
        str(directory),
        "--generate-config",
        "--report-stats=no",
        cwd=directory,
    )
    merge = (python, "-c", _MERGE_CONFIG, str(partial))
    out = await run_checked(*merge, cwd=directory, stdin=json.dumps(overrides).encode())
    os.replace(partial, directory / "hs.yaml")
    return json.loads(out.strip().splitlines()[-1])["registration_shared_secret"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this process when the daemon dies, even by SIGKILL, so Synapse is never orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SynapseProcess:
    """One Synapse process over one directory written by `write_config`."""

    def __init__(self, python: str, directory: Path, port: int, *, die_with_parent: bool = False) -> None:
        self.python = python
        self.dir = directory
        self.port = port
        self.config_path = directory / "hs.yaml"
        self.log_path = directory / "homeserver.log"
        self.output_path = directory / "synapse.out"  # its stdout and stderr (start-up tracebacks land here)
        self.die_with_parent = die_with_parent and sys.platform == "linux"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- {self.output_path}:\n{tail(self.output_path, lines)}\n"
            f"--- {self.log_path}:\n{tail(self.log_path, lines)}"
        )

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start Synapse in its own process group and wait until its client API answers."""
        if self.running:
            return
        with open(self.output_path, "ab") as out:
            try:
                self._proc = subprocess.Popen(
                    [self.python, "-m", "synapse.app.homeserver", "--config-path", str(self.config_path)],
                    cwd=str(self.dir),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
                )
            except OSError as exc:
                raise HomeserverError(f"cannot run {self.python}: {exc}") from exc
        try:
            await self._wait_until_up(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = self.base_url + "/_matrix/client/versions"
        last_error = "no attempt"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise HomeserverError(
                        f"Synapse exited with code {self._proc.returncode} during start-up\n{self.log_tail()}"
                    )
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                        last_error = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    last_error = repr(exc)
                if time.monotonic() > deadline:
                    raise HomeserverError(
                        f"Synapse did not answer {url} within {timeout} s (last: {last_error})\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)  # poll interval of the condition above

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process group, then SIGKILL after `timeout` seconds; waits for the exit."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, KILLED_WAIT_S)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # poll interval of the process exit
            if proc.poll() is not None:
                return
        raise HomeserverError(f"Synapse (pid {proc.pid}) survived SIGKILL")


async def register(base_url: str, shared_secret: str, username: str, password: str, admin: bool = False) -> str:
    """Create a user by shared-secret registration (`/_synapse/admin/v1/register`); returns the MXID.
    Raises UserExists if the name is taken."""
    return (await _registered(base_url, shared_secret, username, password, admin))["user_id"]


async def exempt_from_rate_limits(base_url: str, shared_secret: str, user_id: str) -> None:
    """Lift the message rate limit of `user_id` (Synapse's admin API `override_ratelimit`, 0 meaning none). The
    admin that does it is registered for this alone, with a password nobody keeps, and deactivated after."""
    name = f"{ADMIN_NAME}-{secrets.token_hex(4)}"
    admin = await _registered(base_url, shared_secret, name, secrets.token_urlsafe(24), admin=True)
    headers = {"Authorization": f"Bearer {admin['access_token']}"}
    limit = f"{base_url}/_synapse/admin/v1/users/{quote(user_id, safe='')}/override_ratelimit"
    deactivate = f"{base_url}/_synapse/admin/v1/deactivate/{quote(admin['user_id'], safe='')}"
    async with aiohttp.ClientSession(headers=headers) as session:
        for url, payload in ((limit, {"messages_per_second": 0, "burst_count": 0}), (deactivate, {"erase": True})):
            async with session.post(url, json=payload) as resp:
                if resp.status != 200:
                    raise HomeserverError(f"POST {url}: HTTP {resp.status} {await resp.text()}")


async def _registered(base_url: str, shared_secret: str, username: str, password: str, admin: bool) -> dict[str, Any]:
    """The answer to a shared-secret registration: `user_id`, `access_token`, `device_id`."""
    url = base_url + "/_synapse/admin/v1/register"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise HomeserverError(f"GET {url}: HTTP {resp.status} {body}")
            nonce = body["nonce"]
        mac = hmac.new(shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update("\x00".join((nonce, username, password, "admin" if admin else "notadmin")).encode())
        payload = {"nonce": nonce, "username": username, "password": password, "admin": admin, "mac": mac.hexdigest()}
        async with session.post(url, json=payload) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                error = UserExists if body.get("errcode") == "M_USER_IN_USE" else HomeserverError
                raise error(f"registering {username!r}: HTTP {resp.status} {body}")
            return body


# --- the built-in homeserver -----------------------------------------------------------------------------------

Runner = Callable[[Sequence[str], Path], Awaitable[None]]


async def run_logged(args: Sequence[str], log_path: Path) -> None:
    """Run a command with its output appended to `log_path`; HomeserverError with the log's tail if it fails."""
    with open(log_path, "ab") as out:
        try:
            proc = await asyncio.create_subprocess_exec(*args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        except OSError as exc:
            raise HomeserverError(f"cannot run {args[0]}: {exc}") from exc
        code = await proc.wait()
    if code != 0:
        raise HomeserverError(f"{' '.join(args)} failed ({code}):\n--- {log_path}:\n{tail(log_path)}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install_commands(venv: Path) -> list[list[str]]:
    """The commands that create Synapse's private virtual environment."""
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(venv_python(venv)),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--require-virtualenv",
            "--require-hashes",  # installed on users' machines: every file checked against the pin
            "-r",
            str(REQUIREMENTS),
        ],
    ]


async def ensure_venv(venv: Path, log_path: Path, run: Runner = run_logged) -> str:
    """Synapse's python in `venv`, installing it from REQUIREMENTS first unless a finished install of the same
    requirements is there (an interrupted or outdated one is replaced)."""
    marker = venv / VENV_MARKER
    wanted = REQUIREMENTS.read_text(encoding="utf-8")
    if marker.exists() and marker.read_text(encoding="utf-8") == wanted:
        return str(venv_python(venv))
    if venv.exists():
        shutil.rmtree(venv)
    log.info("installing_synapse", venv=str(venv), log=str(log_path), note="first run only; about a minute")
    for command in install_commands(venv):
        await run(command, log_path)
    marker.write_text(wanted, encoding="utf-8")
    log.info("synapse_installed", venv=str(venv))
    return str(venv_python(venv))


def cchat_credentials_path(env: Mapping[str, str] | None = None) -> Path:
    """Where cchat keeps its login (a contract with cchat): `$CCHAT_CONFIG_DIR`, else `$XDG_CONFIG_HOME/aiagentchat`
    (an absolute XDG_CONFIG_HOME only), else `~/.config/aiagentchat`; the file is `credentials.json`."""
    env = os.environ if env is None else env
    if env.get("CCHAT_CONFIG_DIR"):
        return Path(env["CCHAT_CONFIG_DIR"]) / "credentials.json"
    xdg = env.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path(env.get("HOME") or Path.home()) / ".config"
    return base / "aiagentchat" / "credentials.json"


@dataclass
class Account:
    user_id: str
    password: str


@dataclass
class Accounts:
    bot: Account
    user: Account
    room_id: str = ""
    bot_unlimited: bool = False  # the bot's message rate limit is lifted

    @classmethod
    def generate(cls) -> Accounts:
        def account(name: str) -> Account:
            return Account(f"@{name}:{SERVER_NAME}", secrets.token_urlsafe(18))

        return cls(bot=account(BOT_NAME), user=account(USER_NAME))

    @classmethod
    def load(cls, path: Path) -> Accounts | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            bot=Account(**data["bot"]),
            user=Account(**data["user"]),
            room_id=data.get("room_id", ""),
            bot_unlimited=data.get("bot_unlimited") is True,
        )

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self), indent=2) + "\n")


def local_room(accounts: Accounts) -> RoomSettings:
    return RoomSettings(id=accounts.room_id, name=ROOM_NAME, allowed_users=[accounts.user.user_id])


def add_saved_room(settings: Settings) -> Settings:
    """`settings` with the built-in homeserver's room `local` added and its bot as `matrix.user_id`, when no
    homeserver is configured and a first run made that room; otherwise unchanged. For tools such as cchat that
    resolve `local` by name, and know the bot, from the daemon's settings without starting anything."""
    if settings.matrix.homeserver:
        return settings
    accounts = Accounts.load(settings.paths.data_dir / "homeserver" / "accounts.json")
    if accounts is None or not accounts.room_id:
        return settings
    matrix = settings.matrix.model_copy(update={"user_id": accounts.bot.user_id})
    return settings.model_copy(update={"matrix": matrix, "rooms": [*settings.rooms, local_room(accounts)]})


class LocalHomeserver:
    """The built-in homeserver of one data dir."""

    def __init__(self, data_dir: Path, *, config: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.dir = data_dir / "homeserver"
        self.venv = self.dir / "venv"
        self.synapse_dir = self.dir / "synapse"
        self.server_path = self.dir / "server.json"
        self.accounts_path = self.dir / "accounts.json"
        self.install_log = self.dir / "install.log"
        self.config = config.resolve() if config is not None else None
        self.cchat_credentials = cchat_credentials_path(self.env)
        self.process: SynapseProcess | None = None
        self.accounts: Accounts | None = None
        self.new_accounts = False  # made on this run: the only run that prints the user's password

    @classmethod
    def for_settings(cls, settings: Settings, *, config: Path | None = None) -> LocalHomeserver:
        """Refuse settings that name a Matrix account without a homeserver (ConfigError): the built-in one makes
        its own accounts."""
        matrix = settings.matrix
        for key in ("user_id", "password", "access_token"):
            if getattr(matrix, key):
                raise ConfigError(
                    f"matrix.{key} is set but matrix.homeserver is not: set the homeserver, or remove "
                    f"matrix.{key} to use the built-in local homeserver"
                )
        return cls(settings.paths.data_dir, config=config)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def run(self, settings: Settings, serve: Callable[[Settings], Awaitable[None]]) -> None:
        """Start the homeserver, prepare accounts and room, print how to connect, run `serve`, stop it.
        SIGTERM or SIGINT before `serve` installs its own handlers ends start-up cleanly."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, interrupt)  # `serve` replaces these with its own
        try:
            await self.start()
            local = await self.prepare(settings)
            print(self.connection_info(local), flush=True)
            await serve(local)
        except asyncio.CancelledError:
            if not interrupted:
                raise
            task.uncancel()
            log.info("interrupted_during_start_up")
        finally:
            await self.stop()

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        python = self.env.get(PYTHON_ENV) or await ensure_venv(self.venv, self.install_log)
        server = self._server_state()
        if not (self.synapse_dir / "hs.yaml").exists():
            overrides = base_config(server["port"]) | LOCAL_RATE_LIMITS
            overrides["registration_shared_secret"] = server["registration_shared_secret"]
            await write_config(python, self.synapse_dir, overrides)
        port = server["port"]
        if port_in_use(port):
            raise HomeserverError(
                f"port {port} on 127.0.0.1 (the built-in homeserver's, kept in {self.server_path}) is in use: "
                f"is another aiagentchat running with data dir {self.dir.parent}?"
            )
        self.process = SynapseProcess(python, self.synapse_dir, port, die_with_parent=True)
        await self.process.start()
        log.info("local_homeserver_started", url=self.process.base_url, dir=str(self.synapse_dir))

    async def stop(self) -> None:
        if self.process is not None and self.process.running:
            await self.process.stop()
            log.info("local_homeserver_stopped")

    def _server_state(self) -> dict[str, Any]:
        if self.server_path.exists():
            return json.loads(self.server_path.read_text(encoding="utf-8"))
        state = {"port": free_port(), "registration_shared_secret": secrets.token_urlsafe(32)}
        write_private(self.server_path, json.dumps(state) + "\n")
        return state

    @property
    def base_url(self) -> str:
        assert self.process is not None
        return self.process.base_url

    # --- accounts, room, cchat login -------------------------------------------------------------------------

    async def prepare(self, settings: Settings) -> Settings:
        """First run: the two accounts and the room. Every run: cchat's login if it has none. Returns the
        settings for the daemon: this homeserver, the bot's account, and the local room added."""
        accounts = Accounts.load(self.accounts_path)
        self.new_accounts = accounts is None
        if accounts is None:
            accounts = Accounts.generate()
            accounts.save(self.accounts_path)  # before registering: a retry after a crash reuses the passwords
        secret = self._server_state()["registration_shared_secret"]
        async with aiohttp.ClientSession() as session:
            if not accounts.room_id:
                for account in (accounts.bot, accounts.user):
                    name = account.user_id[1:].split(":")[0]
                    with contextlib.suppress(UserExists):
                        await register(self.base_url, secret, name, account.password)
                        log.info("local_account_created", user_id=account.user_id)
                login = await self._login(session, accounts.user)
                accounts.room_id = await self._create_room(session, login["access_token"], accounts.bot.user_id)
                accounts.save(self.accounts_path)
                log.info("local_room_created", room_id=accounts.room_id)
                if not self._save_cchat_login(login):
                    await self._logout(session, login["access_token"])
            elif not self.cchat_credentials.exists():
                try:
                    self._save_cchat_login(await self._login(session, accounts.user))
                except HomeserverError as exc:  # e.g. the password was changed in a client: cchat login will do
                    log.warning("cchat_login_not_saved", error=str(exc))
            if not accounts.bot_unlimited:
                await self._lift_rate_limit(secret, accounts)
        self.accounts = accounts
        matrix = settings.matrix.model_copy(
            update={
                "homeserver": self.base_url,
                "user_id": accounts.bot.user_id,
                "password": SecretStr(accounts.bot.password),
            }
        )
        return settings.model_copy(update={"matrix": matrix, "rooms": [*settings.rooms, local_room(accounts)]})

    async def _lift_rate_limit(self, secret: str, accounts: Accounts) -> None:
        """Exempt the bot from the message rate limit (Synapse's default allows a burst of 10 events, then one
        each 5 s: a few quick prompts would wait seconds for their answers); tried again on the next start if
        it fails."""
        try:
            await exempt_from_rate_limits(self.base_url, secret, accounts.bot.user_id)
        except (HomeserverError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("rate_limit_not_lifted", user_id=accounts.bot.user_id, error=str(exc))
            return
        accounts.bot_unlimited = True
        accounts.save(self.accounts_path)
        log.info("rate_limit_lifted", user_id=accounts.bot.user_id)

    async def _login(self, session: aiohttp.ClientSession, account: Account) -> dict[str, Any]:
        payload = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": account.user_id},
            "password": account.password,
            "initial_device_display_name": "cchat",
        }
        try:
            return await self._post(session, "/_matrix/client/v3/login", payload)
        except HomeserverError as exc:
            raise HomeserverError(
                f"{exc}\n{account.user_id} cannot log in with the password kept in {self.accounts_path} (was it "
                f"changed in a client?); write the current one there, or remove {self.dir} to start afresh"
            ) from exc

    async def _logout(self, session: aiohttp.ClientSession, token: str) -> None:
        await self._post(session, "/_matrix/client/v3/logout", {}, token)

    async def _create_room(self, session: aiohttp.ClientSession, token: str, bot_id: str) -> str:
        payload = {
            "preset": "private_chat",
            "visibility": "private",
            "name": ROOM_NAME,
            "topic": "aiagentchat on this machine: every message is a prompt for Claude Code",
            "invite": [bot_id],
        }
        return (await self._post(session, "/_matrix/client/v3/createRoom", payload, token))["room_id"]

    async def _post(
        self, session: aiohttp.ClientSession, path: str, payload: dict[str, Any], token: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with session.post(self.base_url + path, json=payload, headers=headers) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise HomeserverError(f"POST {path} on the built-in homeserver: {exc!r}") from exc
        if resp.status != 200:
            raise HomeserverError(f"POST {path} on the built-in homeserver: HTTP {resp.status} {body}")
        return body

    def _save_cchat_login(self, login: dict[str, Any]) -> bool:
        """Store the user's login for cchat unless cchat already has one; True if stored."""
        if self.cchat_credentials.exists():
            return False
        credentials = {
            "homeserver": self.base_url,
            "user_id": login["user_id"],
            "device_id": login["device_id"],
            "access_token": login["access_token"],
        }
        write_private(self.cchat_credentials, json.dumps(credentials, indent=2) + "\n")
        log.info("cchat_login_saved", path=str(self.cchat_credentials), user_id=login["user_id"])
        return True

    # --- what the person reads ---------------------------------------------------------------------------------

    def connection_info(self, settings: Settings) -> str:
        accounts = self.accounts
        assert accounts is not None, "prepare() first"
        config = f" --config {shlex.quote(str(self.config))}" if self.config is not None else ""
        cchat = shlex.quote(self.env.get(CCHAT_VARIABLE) or "cchat")
        lines = [
            "",
            "aiagentchat is running with its built-in homeserver (Synapse on this machine only).",
            "",
            f"  homeserver: {self.base_url}",
            f"  user:       {accounts.user.user_id}",
            f"  password:   {accounts.user.password}"
            if self.new_accounts
            else f"  password:   kept in {self.accounts_path} (shown only on the first run)",
            f'  room:       {accounts.room_id}  ("{ROOM_NAME}")',
            "",
            "Sign in with that user and password from a Matrix client on this machine (in Element, change the",
            "homeserver to the URL above) and write in the room, or send a prompt from a terminal:",
            "",
            f'  {cchat} send local "say hello" --wait{config}',
        ]
        saved = _read_json(self.cchat_credentials)
        if saved.get("homeserver") != self.base_url or saved.get("user_id") != accounts.user.user_id:
            where = f"logged in as {saved.get('user_id')} elsewhere" if saved else "not logged in"
            lines += [
                "",
                f"cchat is {where} ({self.cchat_credentials}); to use this room, first run:",
                f"  {cchat} login --homeserver {self.base_url} --user {accounts.user.user_id}",
            ]
        lines.append(f"\nThe accounts are kept in {self.accounts_path}; the bot is {settings.matrix.user_id}.")
        return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
