"""The Matrix side: login, sync, turning room messages into prompts, and sending output."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    JoinError,
    LoginResponse,
    MegolmEvent,
    RoomCreateEvent,
    RoomMessageText,
    RoomResolveAliasResponse,
    RoomSendResponse,
    SyncError,
    SyncResponse,
    WhoamiResponse,
)

from aiagentchat.batcher import Batcher, RateLimited, Sent, SendFailed, SendOutcome
from aiagentchat.guard import ToolGuard
from aiagentchat.render import MARKER_KEY
from aiagentchat.runner import Prompt, RoomToolPolicy, RoomWorker
from aiagentchat.settings import ConfigError, RoomSettings, Settings
from aiagentchat.store import Store

log = structlog.get_logger(__name__)

HOPS_KEY = "org.aiagentchat.hops"
LEGACY_ROOM_VERSIONS = {str(version) for version in range(1, 12)}
SYNC_TIMEOUT_MS = 30_000
MAX_SYNC_BACKOFF_S = 30.0


class LoginFailed(Exception):
    """The homeserver refused our credentials; a person must fix the configuration."""


def write_private(path: Path, data: str) -> None:
    """Write a file only its owner can read, never following a link planted at its path."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(data)
    os.replace(tmp, path)


def read_private(path: Path) -> str:
    """Read a secret file, refusing one that others can read (or a link planted in its place)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, encoding="utf-8") as handle:
        if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & 0o077:
            raise ConfigError(f"{path} holds a secret but others can read it; run: chmod 600 {path}")
        return handle.read()


@dataclass(frozen=True)
class Credentials:
    homeserver: str
    user_id: str
    device_id: str
    access_token: str

    @classmethod
    def load(cls, path: Path) -> Credentials | None:
        if not path.exists():
            return None
        data = json.loads(read_private(path))
        return cls(**{key: data[key] for key in ("homeserver", "user_id", "device_id", "access_token")})

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(self.__dict__))


_REPLY_FALLBACK = re.compile(r"\A(?:>[^\n]*\n)+\n?")


def strip_reply_fallback(body: str) -> str:
    """Drop the quoted `> ` lines a reply carries, so someone else's words never become the prompt."""
    return _REPLY_FALLBACK.sub("", body, count=1)


class MatrixSender:
    """Sends one event, classifying the outcome for the batcher; the 429 policy lives in the batcher."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> SendOutcome:
        try:
            response = await self._client.room_send(
                room_id, "m.room.message", content, tx_id=txn_id, ignore_unverified_devices=True
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return SendFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        if isinstance(response, RoomSendResponse):
            return Sent(response.event_id)
        transport = getattr(response, "transport_response", None)
        status = transport.status if transport is not None else None
        if status == 429 or response.status_code == "M_LIMIT_EXCEEDED":
            return RateLimited(_retry_after_s(transport, response))
        retryable = status is None or status >= 500
        return SendFailed(f"{response.status_code}: {response.message}", retryable=retryable)


def _retry_after_s(transport: Any, response: Any) -> float | None:
    header = transport.headers.get("Retry-After") if transport is not None else None
    if header and header.strip().isdigit():
        return float(header)
    retry_after_ms = getattr(response, "retry_after_ms", None)
    return retry_after_ms / 1000 if retry_after_ms else None


class Bot:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        data_dir = settings.paths.data_dir
        self.credentials_path = data_dir / "credentials.json"
        crypto_dir = data_dir / "crypto"
        crypto_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client = AsyncClient(
            settings.matrix.homeserver,
            settings.matrix.user_id,
            store_path=str(crypto_dir),
            config=AsyncClientConfig(
                max_limit_exceeded=0,
                max_timeouts=0,
                store_sync_tokens=False,
                encryption_enabled=True,
                pickle_key=self._pickle_key(data_dir / "pickle_key"),
            ),
        )
        self.rooms: dict[str, RoomSettings] = {}
        self.workers: dict[str, RoomWorker] = {}
        self.creators: dict[str, set[str]] = {}
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    @staticmethod
    def _pickle_key(path: Path) -> str:
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32))
        return read_private(path).strip()

    def stop(self) -> None:
        self._stopping.set()

    async def login(self) -> None:
        matrix = self.settings.matrix
        if matrix.access_token is not None:
            self.client.access_token = matrix.access_token.get_secret_value()
            whoami = await self.client.whoami()
            if not isinstance(whoami, WhoamiResponse):
                raise LoginFailed(f"the configured access token was refused: {whoami.message}")
            self.client.restore_login(whoami.user_id, whoami.device_id or "", self.client.access_token)
            log.info("logged_in", user_id=whoami.user_id, device_id=whoami.device_id, via="access_token")
            return
        saved = Credentials.load(self.credentials_path)
        if saved and saved.homeserver == matrix.homeserver and saved.user_id == matrix.user_id:
            self.client.restore_login(saved.user_id, saved.device_id, saved.access_token)
            whoami = await self.client.whoami()
            if isinstance(whoami, WhoamiResponse):
                log.info("logged_in", user_id=saved.user_id, device_id=saved.device_id, via="saved_token")
                return
            if whoami.status_code != "M_UNKNOWN_TOKEN":
                raise LoginFailed(f"whoami failed: {whoami.status_code} {whoami.message}")
            log.warning("saved_token_rejected", device_id=saved.device_id)
        if matrix.password is None:
            raise LoginFailed(
                "no usable credentials: set AIAGENTCHAT_MATRIX__PASSWORD (first login) "
                "or AIAGENTCHAT_MATRIX__ACCESS_TOKEN"
            )
        response = await self.client.login(matrix.password.get_secret_value(), device_name=matrix.device_name)
        if not isinstance(response, LoginResponse):
            raise LoginFailed(f"login as {matrix.user_id} failed: {response.message}")
        Credentials(matrix.homeserver, response.user_id, response.device_id, response.access_token).save(
            self.credentials_path
        )
        log.info("logged_in", user_id=response.user_id, device_id=response.device_id, via="password")

    async def _resolve_rooms(self) -> None:
        for room in self.settings.rooms:
            room_id = room.id
            if room_id.startswith("#"):
                response = await self.client.room_resolve_alias(room_id)
                if not isinstance(response, RoomResolveAliasResponse):
                    log.error("room_alias_unresolved", alias=room_id, error=response.message)
                    continue
                room_id = response.room_id
            self.rooms[room_id] = room
            joined = await self.client.join(room_id)
            if isinstance(joined, JoinError):
                log.error("room_join_failed", room_id=room_id, error=joined.message)

    def _make_worker(self, room_id: str, room: RoomSettings) -> RoomWorker:
        claude = self.settings.claude_for(room)
        batcher = Batcher(
            room_id,
            MatrixSender(self.client),
            interval_s=self.settings.output.flush_interval_s,
            max_backoff_s=self.settings.output.max_backoff_s,
        )
        workdir = self.settings.workdir_for(room).resolve()
        guard = ToolGuard(self.settings.paths.data_dir, workdir, room.allow_claude_config_writes)
        return RoomWorker(room_id, claude, workdir, self.store, batcher, RoomToolPolicy(claude), guard)

    async def run(self) -> None:
        await self.login()
        await self._resolve_rooms()
        self.workers = {room_id: self._make_worker(room_id, room) for room_id, room in self.rooms.items()}
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._sync_loop())]
                for worker in self.workers.values():
                    tasks.append(group.create_task(worker.run()))
                    group.create_task(worker.batcher.run())
                await self._stopping.wait()
                log.info("stopping")
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for worker in self.workers.values():
                    await worker.batcher.close()
        finally:
            await self.client.close()

    async def _sync_loop(self) -> None:
        token = await self.store.sync_token()
        history = token is None
        full_state = True  # the first sync of every start brings the rooms' state (power levels, creators)
        failures = 0
        while True:
            try:
                response = await self.client.sync(timeout=SYNC_TIMEOUT_MS, since=token, full_state=full_state)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                response = SyncError(f"{type(exc).__name__}: {exc}")
            if isinstance(response, SyncError):
                if response.status_code == "M_UNKNOWN_TOKEN":
                    raise LoginFailed("the homeserver no longer accepts our access token (M_UNKNOWN_TOKEN)")
                failures += 1
                if failures == 1:
                    log.warning("sync_failing", error=response.message)
                delay = min(MAX_SYNC_BACKOFF_S, 2 ** min(failures, 10) / 2)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            if failures:
                log.info("sync_recovered", after_failures=failures)
                failures = 0
            await self._handle_sync(response, history)
            await self._crypto_upkeep()
            token = response.next_batch
            await self.store.set_sync_token(token)
            history = full_state = False
            if not self.ready.is_set():
                self.ready.set()
                log.info("ready", rooms=len(self.rooms), user_id=self.client.user_id)

    async def _crypto_upkeep(self) -> None:
        if not self.client.olm:
            return
        if self.client.should_upload_keys:
            await self.client.keys_upload()
        if self.client.should_query_keys:
            await self.client.keys_query()
        if self.client.should_claim_keys:
            await self.client.keys_claim(self.client.get_users_for_key_claiming())
        await self.client.send_to_device_messages()

    async def _handle_sync(self, response: SyncResponse, history: bool) -> None:
        synced_at = time.time()  # when this batch arrived: the start of every prompt's dispatch in it
        for room_id, info in response.rooms.invite.items():
            await self._consider_invite(room_id, info.invite_state)
        for room_id, info in response.rooms.join.items():
            room = self.rooms.get(room_id)
            if room is None:
                continue
            self._note_creators(room_id, [*info.state, *info.timeline.events])
            first_sight = await self.store.mark_room_seen(room_id)
            if history or first_sight:
                continue
            for event in info.timeline.events:
                await self._consider_event(room_id, room, event, synced_at)

    def _note_creators(self, room_id: str, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, RoomCreateEvent):
                extra = event.source.get("content", {}).get("additional_creators") or []
                self.creators[room_id] = {event.sender, *[user for user in extra if isinstance(user, str)]}

    def _power_level(self, room_id: str, user_id: str) -> float:
        """The user's power level; creators of version 12+ rooms rank above every level."""
        room = self.client.rooms.get(room_id)
        if room is None:
            return 0
        if room.room_version not in LEGACY_ROOM_VERSIONS and user_id in self.creators.get(room_id, set()):
            return math.inf
        return room.power_levels.get_user_level(user_id)

    async def _consider_invite(self, room_id: str, invite_state: list[Any]) -> None:
        room = self.rooms.get(room_id)
        inviter = next(
            (
                event.sender
                for event in invite_state
                if isinstance(event, InviteMemberEvent) and event.state_key == self.client.user_id
            ),
            None,
        )
        if room is None or inviter not in room.allowed_users:
            log.info("invite_ignored", room_id=room_id, inviter=inviter)
            return
        joined = await self.client.join(room_id)
        log.info("invite_accepted", room_id=room_id, inviter=inviter, ok=not isinstance(joined, JoinError))

    async def _consider_event(self, room_id: str, room: RoomSettings, event: Any, synced_at: float) -> None:
        if isinstance(event, MegolmEvent):
            log.warning("undecryptable_event", room_id=room_id, event_id=event.event_id, sender=event.sender)
            return
        if not isinstance(event, RoomMessageText) or event.sender == self.client.user_id:
            return
        refusal = self._refusal(room_id, room, event)
        hops = self._hops(event)
        if refusal is None and hops >= room.max_hops:
            refusal = f"hop limit {room.max_hops} reached"
        if refusal is not None:
            log.info("prompt_ignored", room_id=room_id, event_id=event.event_id, sender=event.sender, reason=refusal)
            return
        if not await self.store.claim_event(room_id, event.event_id):
            return
        prompt = Prompt(room_id, event.event_id, event.sender, strip_reply_fallback(event.body), hops)
        log.info(
            "prompt_accepted",
            room_id=room_id,
            event_id=event.event_id,
            sender=event.sender,
            hops=hops,
            synced_at=round(synced_at, 6),
        )
        self.workers[room_id].inbox.put_nowait(prompt)

    def _refusal(self, room_id: str, room: RoomSettings, event: RoomMessageText) -> str | None:
        """Why this message must not run as a prompt, or None if it may."""
        content = event.source.get("content", {})
        if MARKER_KEY in content:
            if event.sender not in room.allowed_bots:
                return "output of an agent that is not in allowed_bots"
        elif event.sender not in room.allowed_users:
            return "sender not in allowed_users"
        if (content.get("m.relates_to") or {}).get("rel_type") == "m.replace":
            return "an edit of an earlier message"
        matrix_room = self.client.rooms.get(room_id)
        if matrix_room is not None and matrix_room.encrypted and not event.decrypted:
            return "unencrypted message in an encrypted room"
        if room.require_verified_device and not event.verified:
            return "the sender's device is not verified"
        if room.min_power_level is not None:
            level = self._power_level(room_id, event.sender)
            if level < room.min_power_level:
                return f"power level {level} below {room.min_power_level}"
        return None

    @staticmethod
    def _hops(event: RoomMessageText) -> int:
        """How many agents this prompt has already passed through."""
        content = event.source.get("content", {})
        marker = content.get(MARKER_KEY)
        value = marker.get("hops") if isinstance(marker, dict) else content.get(HOPS_KEY, 0)
        return value if isinstance(value, int) and value >= 0 else 0
