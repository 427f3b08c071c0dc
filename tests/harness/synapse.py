"""A real Synapse homeserver for integration tests, on 127.0.0.1 and a free port, with SQLite in a temp dir.

    async with running_synapse() as synapse:          # or: synapse = Synapse(); await synapse.start()
        mxid = await synapse.register("alice", "pw")   # "@alice:localhost"
        ...  synapse.base_url ...
        await synapse.stop(); await synapse.start()    # same data, same port

Synapse runs from its own virtual environment (`AIAGENTCHAT_SYNAPSE_PYTHON`, see `tests.harness`). Rate limits
are raised so tests never wait on them, except `rc_message` when `default_rc_message=True` (Synapse's default,
0.2/s with a burst of 10 per account, is what real users run).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import synapse_python

SERVER_NAME = "localhost"
START_TIMEOUT_S = 60.0

_UNLIMITED = {"per_second": 1000, "burst_count": 1000}

# Run with Synapse's python (it has PyYAML; the project venv does not): merge overrides into the generated
# config and report the generated registration_shared_secret.
_EDIT_CONFIG = """
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path.name} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class SynapseError(RuntimeError):
    pass


class Synapse:
    """One Synapse process over one data directory. `start()` again after `stop()` reuses data and port."""

    def __init__(
        self,
        *,
        default_rc_message: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        python: str | None = None,
    ) -> None:
        self.default_rc_message = default_rc_message
        self.python = python or synapse_python()
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="aiagentchat-synapse-"))
        self.config_path = self.dir / "hs.yaml"
        self.log_path = self.dir / "homeserver.log"
        self.output_path = self.dir / "synapse.out"  # its stdout and stderr (start-up tracebacks land here)
        self.server_name = SERVER_NAME
        self.port: int | None = None
        self.registration_shared_secret: str = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise SynapseError("Synapse was never started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def mxid(self, username: str) -> str:
        return f"@{username}:{self.server_name}"

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- {self.output_path}:\n{_tail(self.output_path, lines)}\n"
            f"--- {self.log_path}:\n{_tail(self.log_path, lines)}"
        )

    # --- configuration ---------------------------------------------------------------------------------------

    async def _run(self, *args: str, stdin: bytes | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=str(self.dir),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate(stdin)
        if proc.returncode != 0:
            raise SynapseError(f"{' '.join(args[:4])} ... failed ({proc.returncode}):\n{out.decode(errors='replace')}")
        return out.decode()

    def _overrides(self) -> dict[str, Any]:
        assert self.port is not None
        overrides: dict[str, Any] = {
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "enable_registration": False,
            "report_stats": False,
            "presence": {"enabled": False},
            "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
            "rc_registration": _UNLIMITED,
            "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
            "rc_joins_per_room": _UNLIMITED,
            "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
            "rc_3pid_validation": _UNLIMITED,
            "rc_admin_redaction": _UNLIMITED,
            "rc_room_creation": _UNLIMITED,  # default 0.016/s, burst 10: a test suite creates more rooms
        }
        if not self.default_rc_message:
            overrides["rc_message"] = _UNLIMITED
        return overrides

    async def _generate_config(self) -> None:
        self.port = free_port()
        await self._run(
            self.python,
            "-m",
            "synapse.app.homeserver",
            "--server-name",
            self.server_name,
            "--config-path",
            str(self.config_path),
            "--data-directory",
            str(self.dir),
            "--generate-config",
            "--report-stats=no",
        )
        out = await self._run(
            self.python, "-c", _EDIT_CONFIG, str(self.config_path), stdin=json.dumps(self._overrides()).encode()
        )
        self.registration_shared_secret = json.loads(out.strip().splitlines()[-1])["registration_shared_secret"]

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start Synapse (generating its config the first time) and wait until the client API answers."""
        if self.running:
            return
        if not self.config_path.exists():
            await self._generate_config()
        with open(self.output_path, "ab") as out:
            self._proc = subprocess.Popen(
                [self.python, "-m", "synapse.app.homeserver", "--config-path", str(self.config_path)],
                cwd=str(self.dir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
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
                    raise SynapseError(
                        f"Synapse exited with code {self._proc.returncode} during start-up\n{self.log_tail()}"
                    )
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                        last_error = f"HTTP {resp.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    last_error = repr(exc)
                if time.monotonic() > deadline:
                    raise SynapseError(
                        f"Synapse did not answer {url} within {timeout} s (last: {last_error})\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)  # poll interval of the condition above

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL after `timeout` seconds; waits for the exit."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # poll interval of the process exit
            if proc.poll() is not None:
                return
        raise SynapseError(f"Synapse (pid {proc.pid}) survived SIGKILL")

    async def close(self) -> None:
        """Stop Synapse and remove its temp dir (when this object created it)."""
        await self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self) -> Synapse:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- users -----------------------------------------------------------------------------------------------

    async def register(self, username: str, password: str, admin: bool = False) -> str:
        """Create a user by shared-secret registration (`/_synapse/admin/v1/register`); returns the MXID."""
        url = self.base_url + "/_synapse/admin/v1/register"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise SynapseError(f"GET {url}: HTTP {resp.status} {body}")
                nonce = body["nonce"]
            mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
            for part in (nonce, username, password, "admin" if admin else "notadmin"):
                if part != nonce:
                    mac.update(b"\x00")
                mac.update(part.encode())
            payload = {
                "nonce": nonce,
                "username": username,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            }
            async with session.post(url, json=payload) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise SynapseError(f"registering {username!r}: HTTP {resp.status} {body}")
                return body["user_id"]


@contextlib.asynccontextmanager
async def running_synapse(**kwargs: Any) -> AsyncIterator[Synapse]:
    """A started Synapse, stopped and removed afterwards. kwargs go to `Synapse(...)`."""
    async with Synapse(**kwargs) as synapse:
        yield synapse
