"""A real Synapse homeserver for integration tests, on 127.0.0.1 and a free port, with SQLite in a temp dir.

    async with running_synapse() as synapse:          # or: synapse = Synapse(); await synapse.start()
        mxid = await synapse.register("alice", "pw")   # "@alice:localhost"
        ...  synapse.base_url ...
        await synapse.stop(); await synapse.start()    # same data, same port

Synapse runs from its own virtual environment (`AIAGENTCHAT_SYNAPSE_PYTHON`, see `tests.harness`), installed from
the product's pin (`aiagentchat/synapse-requirements.txt`) and driven by the product's own code
(`aiagentchat.localserver`: config, start-up, readiness, stop, shared-secret registration). Rate limits
are raised so tests never wait on them, except `rc_message` when `default_rc_message=True` (Synapse's default,
0.2/s with a burst of 10 per account, is what real users run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiagentchat.localserver import (
    HomeserverError,
    SynapseProcess,
    base_config,
    free_port,
    register,
    tail,
    write_config,
)
from tests.harness import synapse_python

SERVER_NAME = "localhost"
START_TIMEOUT_S = 60.0

_UNLIMITED = {"per_second": 1000, "burst_count": 1000}

SynapseError = HomeserverError  # what the harness raises; the product's own error type

__all__ = ["Synapse", "SynapseError", "free_port", "running_synapse"]


class Synapse:
    """One Synapse process over one data directory. `start()` again after `stop()` reuses data and port.

    Config writing, start-up, readiness, stopping and shared-secret registration are the product's own
    (`aiagentchat.localserver`); this class only adds test rate limits and a temp dir."""

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
        self._process: SynapseProcess | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise SynapseError("Synapse was never started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def mxid(self, username: str) -> str:
        return f"@{username}:{self.server_name}"

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- {self.output_path}:\n{tail(self.output_path, lines)}\n"
            f"--- {self.log_path}:\n{tail(self.log_path, lines)}"
        )

    # --- configuration ---------------------------------------------------------------------------------------

    def _overrides(self) -> dict[str, Any]:
        assert self.port is not None
        overrides: dict[str, Any] = base_config(self.port) | {
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

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start Synapse (generating its config the first time) and wait until the client API answers."""
        if self.running:
            return
        if not self.config_path.exists():
            self.port = free_port()
            self.registration_shared_secret = await write_config(
                self.python, self.dir, self._overrides(), self.server_name
            )
        assert self.port is not None
        self._process = SynapseProcess(self.python, self.dir, self.port)
        await self._process.start(timeout)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL after `timeout` seconds; waits for the exit."""
        if self._process is not None:
            await self._process.stop(timeout)

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
        return await register(self.base_url, self.registration_shared_secret, username, password, admin)


@contextlib.asynccontextmanager
async def running_synapse(**kwargs: Any) -> AsyncIterator[Synapse]:
    """A started Synapse, stopped and removed afterwards. kwargs go to `Synapse(...)`."""
    async with Synapse(**kwargs) as synapse:
        yield synapse
