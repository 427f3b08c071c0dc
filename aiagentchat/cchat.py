"""`cchat`: talk to aiagentchat rooms from a terminal or from another agent's shell.

    cchat login --homeserver URL --user @you:server [--recovery-key]   password from a prompt or CCHAT_PASSWORD
    cchat verify [--recovery-key] [--timeout S]       sign this device with your identity: emoji with another
                                                      of your sessions, or with Element's recovery key
    cchat send ROOM TEXT [--wait [--json] [--timeout S] [--bot USER]]
    cchat rooms [--json]
    cchat new NAME [--workdir PATH] [--invite @user…] [--timeout S] [--bot USER]
    cchat tail ROOM [--json] [--bot USER]
    cchat adopt ROOM [--session ID] [--cwd DIR]       the room goes on with a conversation started in a terminal
    cchat handback ROOM                               the room's conversation into your ~/.claude; prints the
                                                      command that resumes it in a terminal

ROOM is a room id (`!...`), an alias (`#name:server`) or a room `name` from the daemon's settings file
(`--config`, `AIAGENTCHAT_CONFIG` or `./settings.toml`; needed only for names and the allowed-users check), else the
name of a room made from the chat that the daemon's database keeps.
`--wait` follows the room from the sync position taken *before* the prompt was sent and stops at the bot event
whose `org.aiagentchat` marker names this prompt's event id and carries `final`.

`--wait` and `tail` believe only the bot: events sent by its user (`--bot`, else `matrix.user_id` of the
settings), and in an encrypted room only events encrypted with a room key that one of that user's devices (as
its homeserver lists them) shared directly. What they print has control characters and terminal escapes
removed (newlines and tabs stay).

Exit codes: 0 answered, 1 the agent reported an error (adopt: the room refused), 2 usage or configuration error
(also: homeserver unreachable, saved login rejected), 3 timed out, 4 not allowed or not joined, 130 interrupted.
Every error is one line on stderr.

The login (`{homeserver, user_id, device_id, access_token}`, mode 0600) lives in
`$CCHAT_CONFIG_DIR/credentials.json`, by default `$XDG_CONFIG_HOME/aiagentchat/` (`~/.config/aiagentchat/`).

cchat's device is end-to-end encrypted: its crypto store is `$CCHAT_CONFIG_DIR/store/`, sealed with
`CCHAT_PICKLE_KEY` or the generated `$CCHAT_CONFIG_DIR/pickle_key` (mode 0600). It shares its room keys with
every device in the room, verified or not, and reads whatever the bot shares with it. Today's Element and the
bot's default trust ignore a device its owner has not cross-signed: `--recovery-key` (the key from CCHAT_RECOVERY_KEY
or a prompt) reads the person's self-signing key from their secret storage and signs cchat's device with it;
until then `send` says so in an encrypted room.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TextIO

import typer
from typer.core import TyperGroup

from aiagentchat.device_keys import store_key, upkeep
from aiagentchat.errors import ConfigError
from aiagentchat.handover import HandoverError, Transcripts, hand_over, resume_command, session_id, terminal_claude_dir
from aiagentchat.private import Credentials
from aiagentchat.wire import HOPS_KEY, HOPS_VARIABLE, MARKER_KEY

if TYPE_CHECKING:  # each command imports what it needs when it runs: `--help` and a plain room start quickly
    from nio import AsyncClient

    from aiagentchat.plainclient import PlainClient
    from aiagentchat.settings import RoomSettings, Settings
    from aiagentchat.storedrooms import StoredRoom

EXIT_OK, EXIT_AGENT_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_FORBIDDEN, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
DEFAULT_SETTINGS = Path("settings.toml")
SEND_ATTEMPTS = 5


class Fail(Exception):
    """Ends the command: `message` becomes the one stderr line, `code` the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


TERMINAL_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, erasing
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]"  # any other escape sequence
)
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all C0 and C1 controls but tab and newline


def printable(text: str) -> str:
    """`text` without terminal escape sequences (their parameters included) and control characters, so that
    nothing the room says can restyle, retitle or rewrite the terminal; newlines and tabs stay."""
    return CONTROLS.sub("", TERMINAL_ESCAPES.sub("", text))


def printable_final(final: dict[str, Any]) -> dict[str, Any]:
    result = final.get("result")
    return final | {"result": printable(result)} if isinstance(result, str) else final


def error_line(message: str, prefix: str = "cchat") -> None:
    """`message` as one stderr line, without what a homeserver or an agent could slip in to drive the terminal."""
    print(f"{prefix}: " + " ".join(printable(message).split()), file=sys.stderr, flush=True)


# --- saved login ------------------------------------------------------------------------------------------------


def config_dir(env: Mapping[str, str] = os.environ) -> Path:
    if env.get("CCHAT_CONFIG_DIR"):
        return Path(env["CCHAT_CONFIG_DIR"])
    xdg = env.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "aiagentchat"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def load_credentials(path: Path) -> Credentials:
    """The saved login; refuses a file others can read and a link planted in its place."""
    try:
        saved = Credentials.load(path)
    except ConfigError as exc:
        raise Fail(EXIT_USAGE, str(exc)) from None
    if saved is None:
        hint = "run cchat login --homeserver URL --user @you:server"
        raise Fail(EXIT_USAGE, f"not logged in ({path} is missing): {hint}")
    return saved


# --- settings and rooms -----------------------------------------------------------------------------------------


def read_settings(config: Path | None, needed: bool = True) -> Settings | None:
    """The daemon's settings, read as the daemon reads them: `config`, else ./settings.toml, else (only when
    `needed`: a room name to look up, the bot to find) the defaults and the environment alone. With the built-in
    homeserver, its room "local" and its bot are added. None: no file, and not needed."""
    path = config if config is not None else (DEFAULT_SETTINGS if DEFAULT_SETTINGS.exists() else None)
    if path is None and not needed:
        return None
    from aiagentchat.settings import load_settings  # pydantic: only commands that read settings pay for it

    try:
        settings = load_settings(path)
    except ConfigError as exc:
        raise Fail(EXIT_USAGE, str(exc)) from None
    if settings.matrix.homeserver:
        return settings
    from aiagentchat.localserver import add_saved_room  # the built-in homeserver's room "local", if made

    return add_saved_room(settings)


def needs_settings(room: str, bot: str | None, follows: bool) -> bool:
    """Whether a command on ROOM reads the settings even when there is no file: to look up a room name, or to
    find the bot when it follows the room (`--wait`, `tail`) without `--bot`."""
    return not room.startswith(("!", "#")) or (follows and not bot)


def lookup_room(settings: Settings | None, room: str) -> RoomSettings | None:
    """The settings' room named `room`, else the one whose id is `room`; else a room made from the chat that the
    daemon's database keeps, by its name (Fail when more than one has it) or its id."""
    rooms = settings.rooms if settings else []
    entry = next((r for r in rooms if r.name == room), None) or next((r for r in rooms if r.id == room), None)
    if entry is not None or settings is None:
        return entry
    quiet = room.startswith(("!", "#"))  # an id needs no entry; a name does: say why none was found
    stored = [found.room for found in read_stored_rooms(settings, quiet) if found.room is not None]
    named = [r for r in stored if r.name == room]
    if len(named) > 1:
        ids = ", ".join(r.id for r in named)
        raise Fail(
            EXIT_USAGE, printable(f"{len(named)} rooms made from the chat are named {room!r}: {ids}; give its id")
        )
    return named[0] if named else next((r for r in stored if r.id == room), None)


def read_stored_rooms(settings: Settings, quiet: bool = False) -> list[StoredRoom]:
    """The rooms made from the chat that the daemon's database keeps (read-only); none when it cannot be read (then
    a warning on stderr, unless `quiet`)."""
    import sqlite3

    from aiagentchat.storedrooms import stored_rooms as stored

    try:
        return stored(settings)
    except sqlite3.Error as exc:
        if not quiet:
            error_line(f"warning: the rooms made from the chat are not read: {settings.database}: {exc}")
        return []


def bot_user(bot: str | None, settings: Settings | None) -> str:
    """The user whose events answer prompts: `--bot`, else the settings' `matrix.user_id`."""
    user = bot or (settings.matrix.user_id if settings else "")
    if not user:
        raise Fail(EXIT_USAGE, "which user is the bot? pass --bot @bot:server, or --config with the daemon's settings")
    return user


def may_prompt(room: RoomSettings, user_id: str) -> bool:
    return user_id in room.allowed_users or user_id in room.allowed_bots


async def resolve_room(client: Any, room: str, settings: Settings | None) -> tuple[str, RoomSettings | None]:
    """ROOM (id, alias, or the name of a room of the settings or made from the chat) as a room id, with its settings
    entry when the settings or the daemon's database have one."""
    entry = lookup_room(settings, room)
    if entry is None and not room.startswith(("!", "#")):
        hint = (
            "give a room id (!...), an alias (#...:server), or the name of a room of the settings or made from the chat"
        )
        raise Fail(EXIT_USAGE, f"unknown room {room!r}: {hint}")
    target = entry.id if entry else room
    room_id = await resolve_alias(client, target) if target.startswith("#") else target
    if entry is None and settings is not None:
        for candidate in settings.rooms:
            if candidate.id.startswith("#") and await resolve_alias(client, candidate.id, quiet=True) == room_id:
                return room_id, candidate
    return room_id, entry


async def resolve_alias(client: Any, alias: str, quiet: bool = False) -> str | None:
    response = await call(client.room_resolve_alias(alias), client)
    if room_id := getattr(response, "room_id", None):
        return room_id
    if quiet:
        return None
    if response.status_code == "M_NOT_FOUND":
        raise Fail(EXIT_USAGE, f"room alias {alias} not found")
    raise failure(response, f"resolving {alias}")


# --- talking to the homeserver ----------------------------------------------------------------------------------
# A room without encryption is served by PlainClient; an encrypted room, a login and a verification by matrix-nio
# with cchat's crypto store. Responses are told apart by the fields a success carries (nio's and PlainClient's
# alike), not by their classes, so that neither module has to be imported to read the other's answers.


def network_errors() -> tuple[type[BaseException], ...]:
    """What a request that never got an answer raises (aiohttp is imported once a command talks to a server)."""
    import aiohttp

    return (aiohttp.ClientError, TimeoutError, OSError)


def make_client(homeserver: str, user_id: str, device_id: str = "") -> AsyncClient:
    from nio import AsyncClient, AsyncClientConfig

    logging.getLogger("nio").setLevel(logging.CRITICAL)
    store = config_dir() / "store"
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        key = store_key(os.environ.get("CCHAT_PICKLE_KEY"), config_dir() / "pickle_key", store)
    except ConfigError as exc:
        raise Fail(EXIT_USAGE, str(exc)) from None
    config = AsyncClientConfig(
        encryption_enabled=True, pickle_key=key, store_sync_tokens=False, max_limit_exceeded=0, max_timeouts=0,
        request_timeout=60,
    )  # fmt: skip
    return AsyncClient(homeserver, user_id, device_id=device_id, store_path=str(store), config=config)


def connect(credentials: Credentials) -> AsyncClient:
    client = make_client(credentials.homeserver, credentials.user_id, credentials.device_id)
    client.restore_login(credentials.user_id, credentials.device_id, credentials.access_token)
    return client


def connect_plain(credentials: Credentials) -> PlainClient:
    from aiagentchat.plainclient import PlainClient

    return PlainClient(credentials.homeserver, credentials.user_id, credentials.device_id, credentials.access_token)


async def for_encryption(plain: PlainClient, credentials: Credentials) -> AsyncClient:
    """The nio client with cchat's crypto store in place of `plain`: the room turned out to be encrypted."""
    await plain.close()
    return connect(credentials)


async def call(awaitable: Coroutine[Any, Any, Any], client: AsyncClient) -> Any:
    try:
        return await awaitable
    except network_errors() as exc:
        raise Fail(EXIT_USAGE, f"cannot reach {client.homeserver}: {type(exc).__name__}: {exc}") from None


def failure(response: Any, doing: str) -> Fail:
    content = getattr(response, "content", None)
    content = content if isinstance(content, dict) else {}  # nio 0.26 parses some errors as successes
    code = getattr(response, "status_code", None) or content.get("errcode")
    message = getattr(response, "message", None) or content.get("error", "")
    if code == "M_UNKNOWN_TOKEN":
        return Fail(EXIT_USAGE, "the homeserver rejected the saved login (M_UNKNOWN_TOKEN): run cchat login again")
    if code == "M_FORBIDDEN":
        return Fail(EXIT_FORBIDDEN, f"{doing}: not allowed ({message})")
    return Fail(EXIT_USAGE, f"{doing}: {code or status_of(response)} {message}")


def status_of(response: Any) -> int | None:
    transport = getattr(response, "transport_response", None)
    return transport.status if transport is not None else None


def retry_after_s(response: Any, attempt: int) -> float:
    transport = getattr(response, "transport_response", None)
    header = transport.headers.get("Retry-After", "") if transport is not None else ""
    if header.strip().isdigit():
        return min(float(header), 30.0)
    ms = getattr(response, "retry_after_ms", None)
    return min(ms / 1000, 30.0) if ms else min(2.0**attempt, 10.0)


async def check_room(client: AsyncClient, room_id: str, room: str) -> bool:
    """Fail (4) unless the user is joined; whether the room is encrypted."""
    response = await call(client.room_get_state_event(room_id, "m.room.encryption"), client)
    # nio 0.26 parses a 403 here as a success whose content is the error: go by the HTTP status and errcode.
    content = getattr(response, "content", None) or {}
    errcode = getattr(response, "status_code", None) or content.get("errcode")
    if status_of(response) == 200 and not errcode:
        return True
    if errcode == "M_NOT_FOUND":
        return False
    if errcode == "M_FORBIDDEN":
        raise Fail(EXIT_FORBIDDEN, f"{client.user_id} is not joined to {room} ({room_id}); join it first")
    raise failure(response, f"checking {room}")


async def prepare_room(client: AsyncClient, room_id: str) -> None:
    """What nio must know before sending to an encrypted room without a sync: that it is encrypted (room_send
    then loads the members and shares a room key with their devices), and this device's keys published."""
    from nio import MatrixRoom

    room = client.rooms.setdefault(room_id, MatrixRoom(room_id, client.user_id))
    room.encrypted = True
    await call(upkeep(client), client)


async def warn_unless_cross_signed(client: AsyncClient) -> None:
    """One line on stderr when this device is not cross-signed: encrypted rooms may then not answer it."""
    from aiagentchat.identity import IdentityError, own_device_signed  # only encrypted rooms need it

    try:
        signed = await call(own_device_signed(client), client)
    except IdentityError:
        return
    if not signed:
        error_line(
            f"warning: this device ({client.device_id}) is not cross-signed by your identity, so today's Element "
            "and the bot's default trust ignore what it sends in encrypted rooms; sign it with `cchat verify` "
            "(emoji with another of your sessions) or `cchat verify --recovery-key` (your Element recovery key)"
        )


async def sign_this_device(client: AsyncClient, recovery_key: str) -> str:
    """Sign cchat's device with the self-signing key kept in the person's secret storage; what to print."""
    from aiagentchat.identity import IdentityError, fingerprint, sign_with_secret_storage
    from aiagentchat.secret_storage import SecretStorageError, decode_recovery_key

    try:
        identity = await call(sign_with_secret_storage(client, decode_recovery_key(recovery_key)), client)
    except (IdentityError, SecretStorageError) as exc:
        raise Fail(EXIT_USAGE, f"this device is not cross-signed: {exc}") from None
    return f"this device ({client.device_id}) is cross-signed by {client.user_id}'s identity ({fingerprint(identity.master)})"


async def send_prompt(client: AsyncClient, room_id: str, content: dict[str, Any]) -> str:
    """Send once; a 429, a 5xx or a network error is retried with the same transaction id (no duplicates)."""
    txn_id = uuid.uuid4().hex
    last = ""
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            response = await client.room_send(
                room_id, "m.room.message", content, tx_id=txn_id, ignore_unverified_devices=True
            )
        except network_errors() as exc:
            last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(2.0**attempt, 10.0))
            continue
        if event_id := getattr(response, "event_id", None):
            return event_id
        status = status_of(response)
        if status == 429 or response.status_code == "M_LIMIT_EXCEEDED":
            last = "rate limited"
            await asyncio.sleep(retry_after_s(response, attempt))
        elif status is not None and status >= 500:
            last = f"{status} {response.message}"
            await asyncio.sleep(min(2.0**attempt, 10.0))
        else:
            raise failure(response, f"sending to {room_id}")
    raise Fail(EXIT_USAGE, f"sending to {room_id} failed after {SEND_ATTEMPTS} attempts: {last}")


def sync_filter(room_id: str, limit: int) -> dict[str, Any]:
    return {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "rooms": [room_id],
            "timeline": {"limit": limit, "types": ["m.room.message", "m.room.encrypted"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    }


class Follower:
    """Follows one room's messages from a sync position; returns each of the bot's events once, in timeline order
    (see `from_bot`)."""

    def __init__(self, client: AsyncClient, room_id: str, bot: str, encrypted: bool) -> None:
        self.client = client
        self.room_id = room_id
        self.bot = bot
        self.encrypted = encrypted
        self.token: str | None = None
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        self._failures = 0
        self.undecryptable = 0  # events this device could not decrypt (no room key shared with it)

    async def start(self) -> None:
        """Take the current position (before anything is sent), so nothing later can be missed; in an encrypted
        room, have the bot's devices queried with the first sync."""
        if self.encrypted and self.client.olm is not None:
            self.client.olm.add_changed_users({self.bot})
        while self.token is None:
            await self._sync(0, limit=1)
            if self._failures > 3:
                raise Fail(EXIT_USAGE, f"cannot sync with {self.client.homeserver}")

    async def poll(self, timeout_ms: int = 10_000) -> list[dict[str, Any]]:
        return await self._sync(timeout_ms, limit=100)

    async def _sync(self, timeout_ms: int, limit: int) -> list[dict[str, Any]]:
        """One sync round; on a passing failure, back off and keep the old position (retried next round)."""
        try:
            response = await self.client.sync(timeout_ms, sync_filter(self.room_id, limit), since=self.token)
            if getattr(response, "next_batch", None) is None:  # SyncError
                status = status_of(response)
                if response.status_code == "M_UNKNOWN_TOKEN" or (status and 400 <= status < 500 and status != 429):
                    raise failure(response, "syncing")
                return await self._back_off()
            await upkeep(self.client)  # keys uploaded, queried and claimed, as nio's sync_forever does
            room = response.rooms.join.get(self.room_id)
            events = list(room.timeline.events) if room is not None else []
            if room is not None and room.timeline.limited and self.token is not None:
                skipped = await self._page_forward(self.token)
                if skipped is None:
                    return await self._back_off()
                events = skipped + events
        except network_errors():
            return await self._back_off()
        self._failures = 0
        first, self.token = self.token is None, response.next_batch
        if first:  # it only takes the position; what it saw is history (see recent())
            return []
        new = [event for event in events if self._is_new(event.source.get("event_id"))]
        self.undecryptable += sum(event.source.get("type") == "m.room.encrypted" for event in new)
        return [dict(event.source) for event in new if self.from_bot(event)]

    def from_bot(self, event: Any) -> bool:
        """Whether the nio `event` is the bot's: sent by its user, and in an encrypted room decrypted with a room
        key that came, not forwarded, from a device of that user (as its homeserver lists them)."""
        if event.source.get("sender") != self.bot:
            return False
        return not self.encrypted or self._sent_by_a_bot_device(event)

    def _sent_by_a_bot_device(self, event: Any) -> bool:
        olm = self.client.olm
        if olm is None or not getattr(event, "decrypted", False):
            return False
        device = olm.device_store.device_from_sender_key(self.bot, event.sender_key)
        session = olm.inbound_group_store.get(self.room_id, event.sender_key, event.session_id)
        return (
            device is not None
            and session is not None
            and session.ed25519 == device.ed25519
            and all(key == event.sender_key for key in session.forwarding_chain)
        )

    async def _page_forward(self, token: str) -> list[Any] | None:
        """The events a limited sync skipped, paging forward from the previous sync token (None: failed)."""
        events: list[Any] = []
        for _ in range(50):
            response = await self.client.room_messages(self.room_id, start=token, direction="f", limit=100)
            if getattr(response, "chunk", None) is None:  # RoomMessagesError
                return None
            events += response.chunk
            if not response.chunk or not response.end or response.end == token:
                break
            token = response.end
        return events

    async def recent(self, count: int) -> list[dict[str, Any]]:
        """The last `count` bot events before the position `start()` took, oldest first (at most 1,000
        events are looked through); later polls never return them again."""
        found: list[dict[str, Any]] = []
        token = self.token
        for _ in range(10):
            if len(found) >= count or token is None:
                break
            response = await self.client.room_messages(self.room_id, start=token, direction="b", limit=100)
            if getattr(response, "chunk", None) is None:
                raise failure(response, "reading the room's history")
            found += [dict(e.source) for e in response.chunk if self.from_bot(e) and output_marker(dict(e.source))]
            token = response.end if response.chunk and response.end != token else None
        latest = found[:count][::-1]
        return [event for event in latest if self._is_new(event.get("event_id"))]

    def _is_new(self, event_id: str | None) -> bool:
        if not event_id or event_id in self._seen:
            return False
        self._seen.add(event_id)
        self._order.append(event_id)
        if len(self._order) > 10_000:
            self._seen.discard(self._order.popleft())
        return True

    async def _back_off(self) -> list[dict[str, Any]]:
        self._failures += 1
        await asyncio.sleep(min(0.5 * 2**self._failures, 10.0))
        return []


# --- handing a conversation over (cchat adopt, cchat handback) --------------------------------------------------


@dataclass(frozen=True)
class Handover:
    """A room's side of a conversation handed over: its working directory and where its agent's CLI keeps the
    conversations (the room's home in the sandbox; with `sandbox = "off"`, the daemon's HOME, taken to be this
    user's)."""

    name: str
    workdir: Path
    home: Path
    walled: bool

    @property
    def transcripts(self) -> Transcripts:
        return Transcripts.in_home(self.home, self.workdir)


def handover_room(settings: Settings, entry: RoomSettings, room: str) -> Handover:
    """The room's side; Fail when its conversations are kept per thread (none is the room's)."""
    if entry.session_scope != "room":
        raise Fail(
            EXIT_USAGE,
            f'{room} keeps a conversation per thread (session_scope = "thread"): only a room with one conversation '
            "hands it over",
        )
    walled = settings.claude_for(entry).sandbox == "bwrap"
    home = settings.home_for(entry).resolve() if walled else Path.home()
    return Handover(room, settings.workdir_for(entry).resolve(), home, walled)


def terminal_session(side: Handover, cwd: Path, session: str | None, claude_dir: Path) -> tuple[str, Transcripts]:
    """The terminal's conversation to adopt, and where the terminal's CLI keeps it: `session`, else the newest
    one started in `cwd`, which must be the room's working directory (a conversation is kept per directory and
    `--resume` finds it only there)."""
    try:
        here = cwd.resolve(strict=True)
    except OSError as exc:
        raise Fail(EXIT_USAGE, f"{cwd}: {exc.strerror}") from None
    if here != side.workdir:
        raise Fail(
            EXIT_USAGE,
            f"{side.name} works in {side.workdir}, not in {here}: a conversation goes on in the directory it was "
            f"started in; adopt one started in {side.workdir}, or set the room's workdir to {here}",
        )
    terminal = Transcripts.in_claude_dir(claude_dir, here)
    try:
        if session is None:
            found = terminal.newest()
            if found is None:
                raise Fail(EXIT_USAGE, f"no Claude Code conversation was started in {here} (none in {terminal.folder})")
            return found, terminal
        chosen = session_id(session)
        if not terminal.has(chosen):
            raise Fail(EXIT_USAGE, f"no conversation {chosen} was started in {here} (not in {terminal.folder})")
    except (HandoverError, OSError) as exc:
        raise Fail(EXIT_USAGE, str(exc)) from None
    return chosen, terminal


def copy_conversation(source: Transcripts, target: Transcripts, session: str) -> bool:
    """hand_over, its refusals as Fail."""
    try:
        return hand_over(source, target, session)
    except (HandoverError, OSError) as exc:
        raise Fail(EXIT_USAGE, f"conversation {session} not copied: {exc}") from None


def make_home(side: Handover, data_dir: Path) -> None:
    """The room's home as the daemon makes it (0700), before the daemon has run an agent there; Fail when the
    data dir is another user's: its agent could not read what this user writes."""
    if not side.walled:
        return
    try:
        owner = data_dir.stat().st_uid
    except OSError as exc:
        raise Fail(EXIT_USAGE, f"the daemon's data dir {data_dir}: {exc.strerror}") from None
    if owner != os.geteuid():
        raise Fail(EXIT_USAGE, f"the daemon's data dir {data_dir} is another user's: run cchat as that user")
    for folder in (side.home.parent, side.home):
        folder.mkdir(mode=0o700, exist_ok=True)


@dataclass(frozen=True)
class AdoptRequest:
    room: str
    session: str | None
    cwd: Path
    timeout: float
    config: Path | None
    bot: str | None = None


async def run_adopt(request: AdoptRequest) -> int:
    """Copy the terminal's conversation into the room's home, then have the room take it up with `!resume ID`,
    which the daemon checks and answers (a line in the room that says who adopted what)."""
    credentials = load_credentials(credentials_path())
    settings = read_settings(request.config)
    assert settings is not None  # read_settings(needed=True) always has settings
    bot = bot_user(request.bot, settings)
    client: Any = connect_plain(credentials)
    try:
        room_id, entry = await resolve_room(client, request.room, settings)
        if entry is None:
            raise Fail(
                EXIT_USAGE,
                f"unknown room {request.room}: adopt needs a room of the daemon's settings or one made from the chat",
            )
        if credentials.user_id not in entry.allowed_users:
            raise Fail(EXIT_FORBIDDEN, f"{credentials.user_id} is not in allowed_users of {request.room}; nothing done")
        side = handover_room(settings, entry, request.room)
        session, terminal = terminal_session(side, request.cwd, request.session, terminal_claude_dir())
        encrypted = await check_room(client, room_id, request.room)
        make_home(side, settings.paths.data_dir)
        copy_conversation(terminal, side.transcripts, session)
        if encrypted:
            client = await for_encryption(client, credentials)
            await prepare_room(client, room_id)
            await warn_unless_cross_signed(client)
        follower = Follower(client, room_id, bot, encrypted)
        await follower.start()
        command_id = await send_prompt(client, room_id, prompt_content(f"{entry.command_prefix}resume {session}"))
        reply = await command_reply(follower, command_id, request.timeout)
    finally:
        await client.close()
    if reply is None:
        error_line(
            f"no answer to {entry.command_prefix}resume within {request.timeout:g} s: is the daemon running? "
            f"The conversation is in the room's home; send `{entry.command_prefix}resume {session}` there later"
        )
        return EXIT_TIMEOUT
    if reply["marker"].get("resumed") != session:
        error_line(f"{request.room} refused: {reply['body']}")
        return EXIT_AGENT_ERROR
    print(
        f"{request.room} goes on with conversation {session} (started in {side.workdir}): its next prompt resumes "
        "it. The terminal's copy is left as it was.",
        flush=True,
    )
    return EXIT_OK


async def command_reply(follower: Follower, command_id: str, timeout: float) -> dict[str, Any] | None:
    """The bot's answer to the command `command_id` ({"body", "marker"}, the body printable); None after
    `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                for event in await follower.poll():
                    marker = marker_of(event)
                    if marker is not None and marker.get("command") == command_id:
                        return {"body": printable(event["content"]["body"]), "marker": marker}
    except TimeoutError:
        return None


async def run_handback(room: str, config: Path | None) -> str:
    """Copy the room's conversation into this user's ~/.claude; the command that resumes it there."""
    import sqlite3

    from aiagentchat.store import peek_conversation

    settings = read_settings(config)
    assert settings is not None  # read_settings(needed=True) always has settings
    entry = lookup_room(settings, room)
    room_id = entry.id if entry is not None else room
    if entry is None or room_id.startswith("#"):  # an alias: the homeserver knows which room it names
        client = connect_plain(load_credentials(credentials_path()))
        try:
            room_id, entry = await resolve_room(client, room, settings)
        finally:
            await client.close()
    if entry is None:
        raise Fail(
            EXIT_USAGE, f"unknown room {room}: handback needs a room of the daemon's settings or one made from the chat"
        )
    side = handover_room(settings, entry, room)
    try:
        session, running = peek_conversation(settings.database, room_id)
    except sqlite3.Error as exc:
        raise Fail(EXIT_USAGE, f"cannot read the daemon's database {settings.database}: {exc}") from None
    if session is None:
        raise Fail(EXIT_USAGE, f"{room} has no conversation yet")
    if running:
        raise Fail(EXIT_USAGE, f"a prompt is running in {room}: hand its conversation back once it has ended")
    terminal = Transcripts.in_claude_dir(terminal_claude_dir(), side.workdir)
    if copy_conversation(side.transcripts, terminal, session):
        error_line(f"conversation {session} copied to {terminal.path(session)}")
    return resume_command(side.workdir, session)


# --- answers (pure) ---------------------------------------------------------------------------------------------


def marker_of(event: dict[str, Any]) -> dict[str, Any] | None:
    """The `org.aiagentchat` marker of a bot message event, or None for anything else."""
    content = event.get("content")
    if event.get("type") != "m.room.message" or not isinstance(content, dict):
        return None
    marker = content.get(MARKER_KEY)
    return marker if isinstance(marker, dict) and isinstance(content.get("body"), str) else None


def output_marker(event: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of a bot event that is part of a run's output; None for anything else, a live status message
    and its edits included."""
    marker = marker_of(event)
    return None if marker is None or marker.get("status") is True else marker


class Answer:
    """The bot events answering one prompt, collected in order; `final` once the run's last event arrived."""

    def __init__(self, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        self.bodies: list[str] = []
        self.final: dict[str, Any] | None = None

    def offer(self, event: dict[str, Any]) -> str | None:
        """Take `event` if it answers this prompt (before the final); returns its body. A live status message
        and its edits are not part of the answer."""
        marker = output_marker(event)
        if marker is None or marker.get("prompt") != self.prompt_id or self.final is not None:
            return None
        body = printable(event["content"]["body"])
        self.bodies.append(body)
        final = marker.get("final")
        if isinstance(final, dict):
            self.final = printable_final(final)
        return body


def result_object(final: dict[str, Any] | None, bodies: list[str]) -> dict[str, Any]:
    """The `--json` object; `final` None (timed out) gives ok false and a null result."""
    final = final or {}
    return {
        "ok": final.get("ok") is True,
        "result": final.get("result"),
        "cost_usd": usd(final.get("cost_usd")),
        "duration_ms": final.get("duration_ms"),
        "session_id": final.get("session_id"),
        "events": list(bodies),
    }


def usd(value: Any) -> float | None:
    """A cost as a float; Matrix event JSON has no floats, so a daemon may send it as a decimal string."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def exit_code(final: dict[str, Any] | None) -> int:
    if final is None:
        return EXIT_TIMEOUT
    return EXIT_OK if final.get("ok") is True else EXIT_AGENT_ERROR


def prompt_content(text: str, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": "m.text", "body": text}
    hops = env.get(HOPS_VARIABLE, "").strip()
    if hops:
        if not hops.isdigit():
            raise Fail(EXIT_USAGE, f"{HOPS_VARIABLE} must be a whole number, not {hops!r}")
        content[HOPS_KEY] = int(hops) + 1
    return content


def prompt_text(text: str, stdin: TextIO) -> str:
    if text == "-":
        try:
            text = stdin.buffer.read().decode("utf-8") if hasattr(stdin, "buffer") else stdin.read()
        except UnicodeDecodeError:
            raise Fail(EXIT_USAGE, "stdin is not UTF-8 text") from None
    text = text.rstrip()
    if not text.strip():
        raise Fail(EXIT_USAGE, "the prompt is empty")
    return text


# --- terminal output --------------------------------------------------------------------------------------------


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Live:
    """Bodies to stdout as they arrive; on a terminal, a progress line with the elapsed time on stderr."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: TextIO, err: TextIO, show_bodies: bool) -> None:
        self.out, self.err, self.show_bodies = out, err, show_bodies
        self.spinner = _isatty(err)
        self.started = time.monotonic()
        self._line_open = False  # stdout ends mid-line: drawing on the same terminal would overwrite it
        self._frame = 0

    def body(self, text: str) -> None:
        if not self.show_bodies:
            return
        self.clear()
        self.out.write(text)
        self.out.flush()
        self._line_open = not text.endswith("\n")

    def draw(self) -> None:
        if not self.spinner or (self._line_open and _isatty(self.out)):
            return
        self._frame = (self._frame + 1) % len(self.FRAMES)
        elapsed = time.monotonic() - self.started
        self.err.write(f"\r{self.FRAMES[self._frame]} waiting for the agent · {elapsed:.0f} s\x1b[K")
        self.err.flush()

    def clear(self) -> None:
        if self.spinner:
            self.err.write("\r\x1b[K")
            self.err.flush()

    def finish(self) -> None:
        self.clear()
        if self._line_open:
            self.out.write("\n")
            self.out.flush()
            self._line_open = False

    async def spin(self) -> None:
        while self.spinner:
            self.draw()
            await asyncio.sleep(0.1)


# --- commands ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendRequest:
    room: str
    text: str
    wait: bool
    timeout: float
    json: bool
    config: Path | None
    bot: str | None = None


async def run_send(request: SendRequest) -> int:
    credentials = load_credentials(credentials_path())
    settings = read_settings(request.config, needs_settings(request.room, request.bot, request.wait))
    bot = bot_user(request.bot, settings) if request.wait else ""
    content = prompt_content(request.text)
    client: Any = connect_plain(credentials)
    try:
        room_id, entry = await resolve_room(client, request.room, settings)
        if entry is not None and not may_prompt(entry, credentials.user_id):
            who = credentials.user_id
            where = f"allowed_users or allowed_bots of {request.room}"
            raise Fail(EXIT_FORBIDDEN, f"{who} is not in {where}; nothing sent")
        encrypted = await check_room(client, room_id, request.room)
        if encrypted:
            client = await for_encryption(client, credentials)
            await prepare_room(client, room_id)
            await warn_unless_cross_signed(client)
        if not request.wait:
            print(await send_prompt(client, room_id, content), flush=True)
            return EXIT_OK
        follower = Follower(client, room_id, bot, encrypted)
        await follower.start()
        prompt_id = await send_prompt(client, room_id, content)
        answer = await follow_answer(follower, prompt_id, request.timeout, show_bodies=not request.json)
    finally:
        await client.close()
    if request.json:
        print(json.dumps(result_object(answer.final, answer.bodies), ensure_ascii=False), flush=True)
    code = exit_code(answer.final)
    if code == EXIT_TIMEOUT:
        error_line(f"no final answer to {prompt_id} within {request.timeout:g} s{unreadable(follower, credentials)}")
    elif code == EXIT_AGENT_ERROR:
        error_line(f"the agent reported an error: {str((answer.final or {}).get('result') or 'no result')[:300]}")
    return code


@dataclass(frozen=True)
class NewRoom:
    name: str
    invite: list[str]
    workdir: str | None
    timeout: float
    config: Path | None
    bot: str | None = None


ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}


async def run_new(request: NewRoom) -> int:
    """Create an encrypted room, invite the bot and the people named, print its id; with a working directory, wait
    for the bot to join, send `!project PATH` and print the bot's answer on stderr."""
    credentials = load_credentials(credentials_path())
    settings = read_settings(request.config, needed=not request.bot)
    bot = bot_user(request.bot, settings)
    client = connect(credentials)
    try:
        invite = [bot, *(user for user in request.invite if user != bot)]
        response = await call(
            client.room_create(name=request.name, invite=invite, initial_state=[ENCRYPTION_STATE]), client
        )
        room_id = getattr(response, "room_id", None)
        if not room_id:
            raise failure(response, f"creating the room {request.name!r}")
        print(room_id, flush=True)
        if request.workdir is None:
            return EXIT_OK
        deadline = time.monotonic() + request.timeout
        await wait_for_join(client, room_id, bot, deadline)
        await prepare_room(client, room_id)
        await warn_unless_cross_signed(client)
        follower = Follower(client, room_id, bot, encrypted=True)
        await follower.start()
        command_id = await send_prompt(client, room_id, prompt_content(f"!project {request.workdir}"))
        answer = await command_answer(follower, command_id, deadline)
    finally:
        await client.close()
    if answer is None:
        why = unreadable(follower, credentials)
        error_line(f"the bot did not answer `!project` in {room_id} within {request.timeout:g} s{why}")
        return EXIT_TIMEOUT
    error_line(answer, prefix="bot")
    return EXIT_AGENT_ERROR if answer.startswith("⛔") else EXIT_OK


async def wait_for_join(client: AsyncClient, room_id: str, bot: str, deadline: float) -> None:
    """Wait until `bot` is a member of the room, until `deadline` (time.monotonic())."""
    while True:
        response = await call(client.joined_members(room_id), client)
        members = getattr(response, "members", None)
        if members is None:
            raise failure(response, f"reading the members of {room_id}")
        if any(member.user_id == bot for member in members):
            return
        if time.monotonic() >= deadline:
            hint = "is the daemon running, and are you one of its daemon.admins?"
            raise Fail(EXIT_TIMEOUT, f"{bot} did not join {room_id} in time: {hint}")
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


async def command_answer(follower: Follower, command_id: str, deadline: float) -> str | None:
    """The body of the bot's answer to the command event `command_id`; None if none came by `deadline`."""
    while (left := deadline - time.monotonic()) > 0:
        for event in await follower.poll(timeout_ms=int(min(left, 10.0) * 1000)):
            marker = marker_of(event)
            if marker is not None and marker.get("command") == command_id:
                return printable(event["content"]["body"])
    return None


def stored_rooms(settings: Settings) -> list[dict[str, Any]]:
    """The rooms made from the chat that the daemon's database keeps and serves (read-only; none without one),
    except those settings.toml configures (it wins)."""
    listed = []
    for found in read_stored_rooms(settings):
        if found.room is not None:
            room = found.room
            listed.append({"name": room.name, "id": room.id, "allowed_users": room.allowed_users, "stored": True})
    return listed


def unreadable(follower: Follower, credentials: Credentials) -> str:
    """Why an answer may never have shown up: events this device could not decrypt, and what to do."""
    if not follower.undecryptable:
        return ""
    return (
        f"; {follower.undecryptable} events could not be decrypted on this device ({credentials.device_id}): if the "
        "room's trust is tofu or verified, verify it on the bot's machine with "
        f"`aiagentchat verify {credentials.user_id} {credentials.device_id}`"
    )


async def follow_answer(follower: Follower, prompt_id: str, timeout: float, show_bodies: bool) -> Answer:
    """Collect the answer to `prompt_id` until its final event or the timeout, showing it live."""
    answer = Answer(prompt_id)
    live = Live(sys.stdout, sys.stderr, show_bodies)
    spinner = asyncio.create_task(live.spin())
    try:
        async with asyncio.timeout(timeout):
            while answer.final is None:
                for event in await follower.poll():
                    if (body := answer.offer(event)) is not None:
                        live.body(body)
    except TimeoutError:
        pass
    finally:
        spinner.cancel()
        live.finish()
    return answer


def show_tail_event(body: str, marker: dict[str, Any], as_json: bool) -> bool:
    """Print one bot event; whether stdout now ends mid-line (a run's text goes on in its next event)."""
    body = printable(body)
    final = printable_final(marker["final"]) if isinstance(marker.get("final"), dict) else None
    if as_json:
        line = {"prompt": marker.get("prompt"), "body": body, "final": final}
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    else:  # bodies of one run are its text cut into pieces: end a line only where a run ends
        sys.stdout.write(body + ("\n" if final is not None and not body.endswith("\n") else ""))
    sys.stdout.flush()
    return not as_json and final is None and bool(body) and not body.endswith("\n")


async def run_tail(room: str, as_json: bool, lines: int, config: Path | None, bot: str | None) -> int:
    """Tail until Ctrl-C, caught by a handler of our own: the cancellation asyncio.run sends instead can be lost
    on Python 3.11 when it lands just as a sync request ends, and tail would then go on."""
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    tailing = asyncio.ensure_future(tail_room(room, as_json, lines, config, bot))
    waiting = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait((tailing, waiting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        waiting.cancel()
    if tailing.done():
        return tailing.result()
    tailing.cancel()  # asyncio.run cancels it again, and waits for it, if this one is lost
    return EXIT_OK


async def tail_room(room: str, as_json: bool, lines: int, config: Path | None, bot: str | None) -> int:
    credentials = load_credentials(credentials_path())
    settings = read_settings(config, needs_settings(room, bot, follows=True))
    bot_id = bot_user(bot, settings)
    client: Any = connect_plain(credentials)
    line_open = False
    try:
        room_id, _ = await resolve_room(client, room, settings)
        encrypted = await check_room(client, room_id, room)
        if encrypted:
            client = await for_encryption(client, credentials)
        follower = Follower(client, room_id, bot_id, encrypted)
        await follower.start()
        events = await follower.recent(lines)
        while True:
            for event in events:
                if (marker := output_marker(event)) is not None:
                    line_open = show_tail_event(event["content"]["body"], marker, as_json)
            events = await follower.poll(30_000)
    finally:
        if line_open:  # Ctrl-C in the middle of a run: the output still ends with a newline
            sys.stdout.write("\n")
            sys.stdout.flush()
        await client.close()


async def run_login(homeserver: str, user: str, password: str, path: Path, recovery_key: str | None) -> Credentials:
    from nio import LoginResponse

    homeserver = homeserver.rstrip("/")
    try:
        saved: Credentials | None = load_credentials(path)
    except Fail:
        saved = None
    reuse = saved is not None and saved.homeserver == homeserver and saved.user_id == user
    client = make_client(homeserver, user, saved.device_id if reuse and saved else "")
    try:
        response = await call(client.login(password, device_name="cchat"), client)
        if isinstance(response, LoginResponse):
            await call(upkeep(client), client)  # publish the device's keys, so others share theirs with it
            Credentials(homeserver, response.user_id, response.device_id, response.access_token).save(path)
            if recovery_key is not None:
                print(await sign_this_device(client, recovery_key), flush=True)
    finally:
        await client.close()
    if not isinstance(response, LoginResponse):
        raise Fail(EXIT_USAGE, f"login as {user} at {homeserver} refused: {response.status_code} {response.message}")
    return Credentials(homeserver, response.user_id, response.device_id, response.access_token)


async def run_verify(recovery_key: str | None, timeout: float) -> None:
    client = connect(load_credentials(credentials_path()))
    try:
        await call(upkeep(client), client)
        if recovery_key is not None:
            print(await sign_this_device(client, recovery_key), flush=True)
        else:
            await verify_with_another_session(client, time.monotonic() + timeout)
    finally:
        await client.close()


async def verify_with_another_session(client: AsyncClient, deadline: float) -> None:
    """Emoji verification that another session of the same person starts; that session, which holds the
    person's self-signing key, then signs this device."""
    from aiagentchat.identity import own_device_signed
    from aiagentchat.verify import VERIFIED, Cancelled, Target, Verification, compare_emoji, in_terminal, say_now

    session = Verification(client, {client.user_id}, Target(client.user_id, None), say_now)
    syncing = asyncio.create_task(session.sync())
    try:
        say_now(
            f"Waiting for another of your sessions to verify this one ({client.device_id}); in Element: Settings → "
            "Sessions → this session → Verify session..."
        )
        if await compare_emoji(session, deadline, in_terminal(say_now)) != VERIFIED:
            raise Fail(EXIT_AGENT_ERROR, "this device is not verified")
        say_now("Verified; waiting for your other session to sign this device...")
        try:
            await session.until_async(lambda: own_device_signed(client), deadline, "signature from your other session")
        except Cancelled as exc:
            raise Fail(EXIT_TIMEOUT, f"this device is verified but not cross-signed: {exc}") from None
        say_now(f"this device ({client.device_id}) is cross-signed by {client.user_id}'s identity")
    finally:
        syncing.cancel()
        await asyncio.gather(syncing, return_exceptions=True)


@contextlib.contextmanager
def failing() -> Iterator[None]:
    """A Fail inside becomes its one stderr line and the command's exit code."""
    try:
        yield
    except Fail as exc:
        error_line(exc.message)
        raise typer.Exit(exc.code) from None


def run(coroutine: Coroutine[Any, Any, Any], interrupted: int = EXIT_INTERRUPTED) -> Any:
    """Run one command's coroutine (see failing); Ctrl-C exits with `interrupted`."""
    try:
        with failing():
            return asyncio.run(coroutine)
    except KeyboardInterrupt:
        if interrupted:
            error_line("interrupted")
        raise typer.Exit(interrupted) from None
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if os.environ.get("CCHAT_DEBUG"):
            raise
        error_line(f"unexpected error: {type(exc).__name__}: {exc} (CCHAT_DEBUG=1 shows the traceback)")
        raise typer.Exit(EXIT_USAGE) from None


class OneLineErrors(TyperGroup):
    """Usage errors as one stderr line (`cchat send: Missing argument 'TEXT'.`), exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args=args, prog_name=prog_name or "cchat", standalone_mode=False, **extra)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                print(exc.format_message(), file=sys.stderr)
            else:
                ctx = getattr(exc, "ctx", None)
                error_line(exc.format_message(), prefix=ctx.command_path if ctx else "cchat")
            code = EXIT_USAGE
        except typer.Abort:
            error_line("aborted")
            code = EXIT_INTERRUPTED
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else EXIT_OK)


app = typer.Typer(
    cls=OneLineErrors,
    name="cchat",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich's formatting would import for longer than the rest of --help takes
    help="Talk to aiagentchat rooms from a terminal or another agent.",
)

ConfigOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional here
    typer.Option("--config", envvar="AIAGENTCHAT_CONFIG", help="The daemon's settings (default ./settings.toml)."),
]
BotOption = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional here
    typer.Option(
        "--bot", envvar="CCHAT_BOT", help="The bot's user id: only its events are answers (default: the settings')."
    ),
]


def ask_secret(variable: str, prompt: str, what: str, command: str) -> str:
    """A secret from the environment, else from the terminal without echo; Fail when there is neither."""
    if value := os.environ.get(variable, ""):
        return value
    if not _isatty(sys.stdin):
        raise Fail(EXIT_USAGE, f"no {what}: set {variable} or run cchat {command} on a terminal")
    try:
        value = getpass.getpass(prompt)
    except (EOFError, KeyboardInterrupt):
        value = ""
    if not value:
        raise Fail(EXIT_USAGE, f"no {what} given")
    return value


RecoveryKeyOption = Annotated[
    bool,
    typer.Option(
        "--recovery-key",
        help="Sign this device with your identity, using your recovery key (from CCHAT_RECOVERY_KEY or a prompt).",
    ),
]


@app.command()
def login(
    homeserver: Annotated[str, typer.Option("--homeserver", help="Homeserver URL, e.g. https://matrix.example.org")],
    user: Annotated[str, typer.Option("--user", help="Your full Matrix ID, e.g. @you:example.org")],
    recovery_key: RecoveryKeyOption = False,
) -> None:
    """Log in as USER (password from CCHAT_PASSWORD or a prompt) and save the login, mode 0600."""
    with failing():
        if not user.startswith("@") or ":" not in user:
            raise Fail(EXIT_USAGE, f"--user must be a full Matrix ID like @you:example.org, not {user!r}")
        password = ask_secret("CCHAT_PASSWORD", f"Password for {user}: ", "password", "login")
        key = ask_secret("CCHAT_RECOVERY_KEY", "Recovery key: ", "recovery key", "login") if recovery_key else None
    path = credentials_path()
    saved = run(run_login(homeserver, user, password, path, key))
    print(f"logged in as {saved.user_id} (device {saved.device_id}); saved to {path}")


@app.command()
def verify(
    recovery_key: RecoveryKeyOption = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up after S seconds.")] = 300.0,
) -> None:
    """Cross-sign this device with your identity, so that encrypted rooms and Element trust it: compare emoji
    with another of your sessions that starts the verification, or use your recovery key."""
    with failing():
        key = ask_secret("CCHAT_RECOVERY_KEY", "Recovery key: ", "recovery key", "verify") if recovery_key else None
    run(run_verify(key, timeout))


@app.command()
def send(
    room: Annotated[
        str,
        typer.Argument(
            help="Room id (!...), alias (#...:server), or a room name: from the settings or made from the chat."
        ),
    ],
    text: Annotated[str, typer.Argument(help="The prompt; - reads it from stdin.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the room until the answer to this prompt.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="With --wait: give up after S seconds.")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="With --wait: print one JSON object only.")] = False,
    config: ConfigOption = None,
    bot: BotOption = None,
) -> None:
    """Post TEXT as a prompt in ROOM; print its event id, or with --wait the answer as it arrives."""
    with failing():
        if as_json and not wait:
            raise Fail(EXIT_USAGE, "--json needs --wait")
        if not timeout > 0:
            raise Fail(EXIT_USAGE, "--timeout must be more than 0 seconds")
        body = prompt_text(text, sys.stdin)
    raise typer.Exit(run(run_send(SendRequest(room, body, wait, timeout, as_json, config, bot))))


@app.command()
def rooms(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the rooms of the daemon's settings: name, id, allowed users (tab-separated); then the rooms made from
    the chat that its database keeps, marked `stored`."""
    with failing():
        settings = read_settings(config)
        entries = settings.rooms if settings else []
        if not entries and config is None and not DEFAULT_SETTINGS.exists():
            raise Fail(
                EXIT_USAGE, "no settings file and no built-in homeserver here: pass --config or set AIAGENTCHAT_CONFIG"
            )
        stored = stored_rooms(settings) if settings else []
    if as_json:
        keys = ("name", "id", "allowed_users", "allowed_bots", "max_hops")
        print(json.dumps([{key: getattr(r, key) for key in keys} for r in entries] + stored, ensure_ascii=False))
        return
    for r in entries:
        print(f"{r.name or '-'}\t{r.id}\t{','.join(r.allowed_users) or '-'}")
    for room in stored:
        users = ",".join(room["allowed_users"]) or "-"
        print(printable(f"{room['name'] or '-'}\t{room['id']}\t{users}\tstored"))


@app.command()
def new(
    name: Annotated[str, typer.Argument(help="The new room's name.")],
    workdir: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional here
        typer.Option("--workdir", help="Once the bot has joined, send `!project PATH` (PATH under its project_roots)."),
    ] = None,
    invite: Annotated[
        Optional[list[str]],  # noqa: UP045 - typer needs Optional here
        typer.Option("--invite", help="Invite this person too (a full Matrix ID); repeat for more."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="With --workdir: give up after S seconds.")] = 60.0,
    config: ConfigOption = None,
    bot: BotOption = None,
) -> None:
    """Create an encrypted room NAME, invite the bot (it joins when you are one of its daemon.admins) and the people
    named, and print the room's id."""
    with failing():
        if not name.strip():
            raise Fail(EXIT_USAGE, "the room needs a name")
        for user in invite or []:
            if not re.fullmatch(r"@[^:\s]+:\S+", user):
                raise Fail(EXIT_USAGE, f"--invite {user!r} is not a full Matrix ID like @you:example.org")
        if not timeout > 0:
            raise Fail(EXIT_USAGE, "--timeout must be more than 0 seconds")
    raise typer.Exit(run(run_new(NewRoom(name.strip(), invite or [], workdir, timeout, config, bot))))


@app.command()
def tail(
    room: Annotated[
        str,
        typer.Argument(
            help="Room id (!...), alias (#...:server), or a room name: from the settings or made from the chat."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per event: {prompt, body, final}.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Bot events shown from before now.")] = 10,
    config: ConfigOption = None,
    bot: BotOption = None,
) -> None:
    """Print the bot's last output in ROOM, then its output as it arrives, until Ctrl-C."""
    run(run_tail(room, as_json, lines, config, bot), interrupted=EXIT_OK)


@app.command()
def adopt(
    room: Annotated[
        str,
        typer.Argument(
            help="Room id (!...), alias (#...:server), or a room name: from the settings or made from the chat."
        ),
    ],
    session: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional here
        typer.Option("--session", help="The conversation's id (default: the newest one started in the directory)."),
    ] = None,
    cwd: Annotated[
        Optional[Path],  # noqa: UP045 - typer needs Optional here
        typer.Option("--cwd", help="The directory it was started in, the room's working directory (default: here)."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Wait S seconds for the room's answer.")] = 60.0,
    config: ConfigOption = None,
    bot: BotOption = None,
) -> None:
    """Go on in ROOM with a Claude Code conversation started in a terminal: it is copied into the room's home
    (yours is left as it was) and the room's next prompt resumes it."""
    with failing():
        if not timeout > 0:
            raise Fail(EXIT_USAGE, "--timeout must be more than 0 seconds")
    here = Path(os.environ.get("CCHAT_CWD") or Path.cwd())  # scripts/cchat runs in the project: where you were
    request = AdoptRequest(room, session, here / cwd if cwd is not None else here, timeout, config, bot)
    raise typer.Exit(run(run_adopt(request)))


@app.command()
def handback(
    room: Annotated[
        str,
        typer.Argument(
            help="Room id (!...), alias (#...:server), or a room name: from the settings or made from the chat."
        ),
    ],
    config: ConfigOption = None,
) -> None:
    """Copy ROOM's conversation into your ~/.claude and print the command that resumes it in a terminal
    (`eval "$(cchat handback ROOM)"` runs it)."""
    print(run(run_handback(room, config)), flush=True)


if __name__ == "__main__":
    app()
