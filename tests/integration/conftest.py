"""Shared integration fixtures: one Synapse and one scripted model server per session; per test, fresh
accounts, rooms and daemons (real subprocesses driving the real Claude Code CLI)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aiagentchat.identity import CrossSigningKeys
from tests.harness import claude_binary, coverage_env
from tests.harness.e2e import E2EUser
from tests.harness.js_person import Event, JsPerson
from tests.harness.matrix_user import MatrixUser
from tests.harness.model_server import model_server
from tests.harness.synapse import running_synapse
from tests.integration.daemon import Daemon, write_settings

MARKER = "org.aiagentchat"
NOT_YET = {"MEGOLM_UNKNOWN_INBOUND_SESSION_ID"}  # a js person's failure that only means "the key is not here yet"

Login = Callable[[str, str, str], Awaitable[JsPerson]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the log tail of each daemon it ran: the first thing to read in CI."""
    report = yield
    world = item.funcargs.get("world") if report.when == "call" and report.failed else None
    for number, daemon in enumerate(world.daemons if isinstance(world, World) else []):
        report.sections.append((f"daemon {number} log (last 60 lines)", "\n".join(daemon.raw[-60:])))
    return report


@pytest.fixture(scope="session")
async def synapse():
    async with running_synapse() as server:
        yield server


@pytest.fixture(scope="session")
async def model():
    async with model_server() as server:
        yield server


def bot_events(events: list[dict[str, Any]], prompt_id: str, *, status: bool = False) -> list[dict[str, Any]]:
    """The bot's events for a prompt: its output, and with `status` also its live status message and edits."""
    marked = [e for e in events if (e.get("content", {}).get(MARKER) or {}).get("prompt") == prompt_id]
    return marked if status else [e for e in marked if e["content"][MARKER].get("status") is not True]


def bot_text(events: list[dict[str, Any]], prompt_id: str, *, status: bool = False) -> str:
    """The bodies of the bot's events for a prompt, joined; with `status`, its live status and edits too (where
    a tool line or the footer is, when the run lasted long enough to show one)."""
    return "".join(e["content"]["body"] for e in bot_events(events, prompt_id, status=status))


def room_dir(world: World, kind: str, room_id: str) -> Path:
    """Where the world's daemon keeps a room's default working directory (`rooms`) or its agent's home (`homes`)."""
    return world.tmp_path / "data" / kind / hashlib.sha256(room_id.encode()).hexdigest()[:24]


def run_ended(prompt_id: str):
    """True once the bot's event that ends the prompt's run (its marker carries `final`) has arrived."""

    def ended(events: list[dict[str, Any]]) -> bool:
        return any(isinstance(e["content"][MARKER].get("final"), dict) for e in bot_events(events, prompt_id))

    return ended


@dataclass(frozen=True)
class Bot:
    user_id: str
    password: str
    directory: str  # under the test's tmp_path; "" for the world's own bot


class World:
    """One test's accounts, rooms and daemons."""

    def __init__(self, synapse, model, tmp_path: Path) -> None:
        self.synapse = synapse
        self.model = model
        self.tmp_path = tmp_path
        tag = secrets.token_hex(4)
        self.bot_name = f"bot{tag}"
        self.bot_password = secrets.token_urlsafe(12)
        self.user_name = f"user{tag}"
        self.user_password = secrets.token_urlsafe(12)
        self.bot_id = ""
        self.user = MatrixUser()
        self.user_identity: CrossSigningKeys
        self.daemons: list[Daemon] = []
        self.others: list[MatrixUser] = []

    async def setup(self) -> None:
        self.bot_id = await self.synapse.register(self.bot_name, self.bot_password)
        user_id = await self.synapse.register(self.user_name, self.user_password)
        await self.user.login(self.synapse.base_url, user_id, self.user_password)
        self.user_identity = CrossSigningKeys.generate(user_id)

    async def room(self, **kwargs: Any) -> str:
        return await self.user.create_room(invite=[self.bot_id], **kwargs)

    async def another_user(self) -> MatrixUser:
        """A second person on the homeserver, with no rights in any daemon's settings."""
        name, password = f"other{secrets.token_hex(4)}", secrets.token_urlsafe(12)
        user_id = await self.synapse.register(name, password)
        other = MatrixUser()
        await other.login(self.synapse.base_url, user_id, password)
        self.others.append(other)
        return other

    async def device(self, *, cross_signed: bool = True) -> E2EUser:
        """Another, end-to-end encrypted, device of the world's user (its crypto store under tmp_path), signed
        by the user's cross-signing identity (made with the first such device) unless `cross_signed` is False."""
        device = E2EUser(self.tmp_path / "devices" / secrets.token_hex(4))
        await device.login(self.synapse.base_url, self.user.user_id, self.user_password)
        self.others.append(device)
        if cross_signed:
            await device.cross_sign(self.user_identity, self.user_password)
        return device

    async def another_bot(self) -> Bot:
        """A second bot account, for a second daemon."""
        name, password = f"bot{secrets.token_hex(4)}", secrets.token_urlsafe(12)
        return Bot(await self.synapse.register(name, password), password, name)

    def daemon(
        self,
        rooms: list[dict[str, Any]],
        claude: dict[str, Any] | None = None,
        *,
        bot: Bot | None = None,
        env: dict[str, str] | None = None,
        settings: dict[str, dict[str, Any]] | None = None,
    ) -> Daemon:
        """A daemon for the world's bot (or `bot`, with its own files under tmp_path/<bot name>); `settings`
        adds to (or overrides) the keys of the settings file's sections."""
        bot = bot or Bot(self.bot_id, self.bot_password, "")
        root = self.tmp_path / bot.directory
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        config = root / "settings.toml"
        sections: dict[str, dict[str, Any]] = {
            "matrix": {"homeserver": self.synapse.base_url, "user_id": bot.user_id},
            "paths": {"data_dir": str(root / "data")},
            "claude": {"binary": claude_binary(), "timeout_s": 60} | (claude or {}),
            "output": {"flush_interval_s": 0.5},
            "daemon": {"http_listen": "127.0.0.1:0"},  # any free port: daemons side by side never collide
        }
        for name, values in (settings or {}).items():
            sections[name] = sections.get(name, {}) | values
        write_settings(config, sections, [{"allowed_users": [self.user.user_id]} | room for room in rooms])
        environment = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "AIAGENTCHAT_MATRIX__PASSWORD": bot.password,
            "ANTHROPIC_BASE_URL": self.model.base_url,
            "ANTHROPIC_API_KEY": "test-key",
            "DISABLE_TELEMETRY": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        } | coverage_env() | (env or {})
        daemon = Daemon(config, environment)
        self.daemons.append(daemon)
        return daemon

    async def ask(self, room_id: str, text: str, timeout: float = 60) -> str:
        """Post a prompt and wait until its run ends; the bot's whole output for it, live status included."""
        prompt_id = await self.user.send_text(room_id, text)
        events = await self.user.wait_for(run_ended(prompt_id), timeout=timeout, room_id=room_id)
        return bot_text(events, prompt_id, status=True)

    async def close(self) -> None:
        for daemon in self.daemons:
            if daemon.proc is not None and daemon.proc.returncode is None:
                await daemon.stop()
        for user in [self.user, *self.others]:
            await user.close()


@pytest.fixture
async def world(synapse, model, tmp_path):
    world = World(synapse, model, tmp_path)
    await world.setup()
    yield world
    await world.close()


ENCRYPTION = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}


async def encrypted_room(world: World, user: E2EUser, **room: Any) -> tuple[str, Daemon]:
    """An encrypted room made by `user`, served by a started daemon; returns once the user sees the bot join."""
    room_id = await user.create_room(invite=[world.bot_id], initial_state=[ENCRYPTION])
    daemon = world.daemon([{"id": room_id} | room])
    await daemon.start()
    await user.wait_for(lambda events: joined(events, world.bot_id), room_id=room_id)
    return room_id, daemon


def joined(events: list[dict[str, Any]], user_id: str) -> bool:
    return any(
        e.get("type") == "m.room.member" and e.get("state_key") == user_id and e["content"].get("membership") == "join"
        for e in events
    )


@pytest.fixture
async def people(synapse) -> AsyncIterator[Login]:
    """Logs in a js person (matrix-js-sdk in Element's exclusion mode, a fresh device) for an account; every one
    is closed after the test."""
    started: list[JsPerson] = []

    async def login(user_id: str, password: str, name: str) -> JsPerson:
        person = JsPerson(name)
        started.append(person)
        await person.start()
        await person.login(synapse.base_url, user_id, password)
        return person

    yield login
    for person in started:
        await person.close()


def membership(room_id: str, user_id: str) -> Callable[[Event], bool]:
    """A js person's predicate: `user_id` has joined `room_id`."""

    def matches(event: Event) -> bool:
        return (
            event["room_id"] == room_id
            and event["type"] == "m.room.member"
            and event["state_key"] == user_id
            and (event["content"] or {}).get("membership") == "join"
        )

    return matches


def settled(event_id: str) -> Callable[[Event], bool]:
    """A js person's predicate: the event's decryption has a final outcome (clear text, or a lasting failure)."""
    return lambda event: event["event_id"] == event_id and event["decryption_failure"] not in NOT_YET


def same_sas(shown_by_js: dict[str, Any], printed: str) -> bool:
    """Whether a js person showed the emoji and numbers that `aiagentchat verify` or `cchat verify` printed (emoji
    compared without variation selectors, which the two emoji tables write differently)."""
    plain = printed.replace("\ufe0f", "")
    emoji = "   ".join(symbol.replace("\ufe0f", "") for symbol in shown_by_js["emoji"])
    numbers = " ".join(str(n) for n in shown_by_js["decimals"] or [])
    return emoji in plain and f"numbers: {numbers}" in plain
