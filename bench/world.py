"""One benchmark homeserver: a real Synapse, the scripted model server, accounts, rooms and daemons.

Everything is the tests' harness (Synapse, model server, nio user, the daemon as a subprocess); this module only
wires it with the product's default output settings (2 s flush interval) instead of the tests' faster ones.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.claude_cli import claude_env
from tests.harness.matrix_user import Event, MatrixUser
from tests.harness.model_server import ModelServer
from tests.harness.synapse import Synapse, running_synapse
from tests.integration.conftest import MARKER, bot_events
from tests.integration.daemon import Daemon, write_settings


def log_time(entry: dict[str, Any]) -> float:
    """The Unix time of one of the daemon's JSON log lines."""
    return datetime.datetime.fromisoformat(entry["timestamp"]).timestamp()


def log_entry(daemon: Daemon, event: str, **fields: Any) -> dict[str, Any]:
    found = [e for e in daemon.logs if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]
    if not found:
        raise LookupError(f"the daemon never logged {event} {fields}")
    return found[0]


def first_output(prompt_id: str) -> Callable[[list[Event]], bool]:
    return lambda events: bool(bot_events(events, prompt_id))


def run_final(prompt_id: str) -> Callable[[list[Event]], bool]:
    """True once the run's last event (the one whose marker carries `final`) has been seen."""
    return lambda events: any("final" in event["content"][MARKER] for event in bot_events(events, prompt_id))


def final_marker(events: list[Event], prompt_id: str) -> dict[str, Any]:
    return next(e["content"][MARKER]["final"] for e in bot_events(events, prompt_id) if "final" in e["content"][MARKER])


@dataclass
class Homeserver:
    """A Synapse with the model server beside it, and a scratch directory for daemons."""

    synapse: Synapse
    model: ModelServer
    scratch: Path
    users: list[MatrixUser] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)

    async def account(self, prefix: str) -> tuple[str, str]:
        """A new account: (user id, password)."""
        password = secrets.token_urlsafe(12)
        return await self.synapse.register(f"{prefix}{secrets.token_hex(3)}", password), password

    async def person(self, prefix: str = "user") -> MatrixUser:
        """A logged-in nio client that has synced once."""
        user_id, password = await self.account(prefix)
        user = MatrixUser()
        await user.login(self.synapse.base_url, user_id, password)
        await user.sync_once()
        self.users.append(user)
        return user

    def daemon(
        self,
        name: str,
        bot: tuple[str, str],
        rooms: list[str],
        allowed: str,
        claude: dict[str, Any],
        output: dict[str, Any] | None = None,
        *,
        live_status: bool = False,
        reactions: bool = True,
    ) -> Daemon:
        """A daemon (not started) for `bot` serving `rooms` for the user `allowed`, with product output defaults
        unless `output` says otherwise. The rooms stream (`live_status = false`) unless `live_status`: every byte
        of a flood goes out as it comes, which is what most rows measure."""
        directory = self.scratch / name
        (directory / "home").mkdir(parents=True, exist_ok=True)
        config = directory / "settings.toml"
        write_settings(
            config,
            {
                "matrix": {"homeserver": self.synapse.base_url, "user_id": bot[0]},
                "paths": {"data_dir": str(directory / "data")},
                "claude": {"timeout_s": 900} | claude,
                "output": output or {},
                "daemon": {"http_listen": "127.0.0.1:0"},
            },
            [
                {"id": room, "allowed_users": [allowed], "live_status": live_status, "reactions": reactions}
                for room in rooms
            ],
        )
        env = claude_env(self.model.base_url, str(directory / "home"), LANG="C.UTF-8")
        daemon = Daemon(config, env | {"AIAGENTCHAT_MATRIX__PASSWORD": bot[1]})
        self.daemons.append(daemon)
        return daemon

    async def close(self) -> None:
        for daemon in self.daemons:
            if daemon.proc is not None and daemon.proc.returncode is None:
                await daemon.stop()
        for user in self.users:
            await user.close()


@contextlib.asynccontextmanager
async def homeserver(model: ModelServer, scratch: Path, **synapse_options: Any) -> AsyncIterator[Homeserver]:
    async with running_synapse(**synapse_options) as synapse:
        server = Homeserver(synapse, model, scratch / secrets.token_hex(3))
        try:
            yield server
        finally:
            await server.close()


def cli_environment(model: ModelServer, home: Path) -> None:
    """Point the real CLI that this process starts itself (the floor) at the scripted model, offline."""
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(claude_env(model.base_url, str(home)))
