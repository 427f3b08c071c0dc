"""The Matrix transport: the bot's client, its login, and sending one event with its outcome classified for
the outbox. Used by the daemon and by `aiagentchat verify`, which needs no daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog
from nio import (
    AsyncClient,
    AsyncClientConfig,
    LoginResponse,
    RoomRedactResponse,
    RoomSendResponse,
    RoomTypingResponse,
    UploadResponse,
    WhoamiResponse,
)

from aiagentchat.api import call, segment
from aiagentchat.crypto import CRYPTO_ERRORS, NETWORK_ERRORS, crypto_dir, pickle_key
from aiagentchat.outbox import RateLimited, SendFailed, SendOutcome, Sent
from aiagentchat.private import Credentials
from aiagentchat.settings import Settings

log = structlog.get_logger(__name__)


class LoginFailed(Exception):
    """The homeserver refused our credentials; a person must fix the configuration."""


class TokenRevoked(Exception):
    """The homeserver stopped accepting the access token while the daemon ran (M_UNKNOWN_TOKEN)."""

    def __init__(self) -> None:
        super().__init__(
            "the homeserver no longer accepts the bot's access token (M_UNKNOWN_TOKEN): the device was logged "
            "out or the account deactivated. Remove data_dir/credentials.json and start again with "
            "AIAGENTCHAT_MATRIX__PASSWORD set (or a new AIAGENTCHAT_MATRIX__ACCESS_TOKEN)"
        )


def make_client(settings: Settings) -> AsyncClient:
    """The bot's client: its crypto store under the data dir, nio's own retries off (the outbox and the sync
    loop own retrying), and a real pickle key."""
    return AsyncClient(
        settings.matrix.homeserver,
        settings.matrix.user_id,
        store_path=str(crypto_dir(settings)),
        config=AsyncClientConfig(
            max_limit_exceeded=0,
            max_timeouts=0,
            request_timeout=settings.matrix.request_timeout_s,
            store_sync_tokens=False,
            encryption_enabled=True,
            pickle_key=pickle_key(settings),
        ),
    )


def credentials_path(settings: Settings) -> Path:
    return settings.paths.data_dir / "credentials.json"


async def login(client: AsyncClient, settings: Settings) -> None:
    """Log in with the configured access token, else the saved one, else the password (saving the new token);
    LoginFailed when none works."""
    matrix = settings.matrix
    if matrix.access_token is not None:
        client.access_token = matrix.access_token.get_secret_value()
        whoami = await client.whoami()
        if not isinstance(whoami, WhoamiResponse):
            raise LoginFailed(f"the configured access token was refused: {whoami.message}")
        client.restore_login(whoami.user_id, whoami.device_id or "", client.access_token)
        log.info("logged_in", user_id=whoami.user_id, device_id=whoami.device_id, via="access_token")
        return
    path = credentials_path(settings)
    saved = Credentials.load(path)
    if saved and saved.homeserver == matrix.homeserver and saved.user_id == matrix.user_id:
        client.restore_login(saved.user_id, saved.device_id, saved.access_token)
        whoami = await client.whoami()
        if isinstance(whoami, WhoamiResponse):
            log.info("logged_in", user_id=saved.user_id, device_id=saved.device_id, via="saved_token")
            return
        if whoami.status_code != "M_UNKNOWN_TOKEN":
            raise LoginFailed(f"whoami failed: {whoami.status_code} {whoami.message}")
        log.warning("saved_token_rejected", device_id=saved.device_id)
    if matrix.password is None:
        raise LoginFailed(
            "no usable credentials: set AIAGENTCHAT_MATRIX__PASSWORD (first login) or AIAGENTCHAT_MATRIX__ACCESS_TOKEN"
        )
    response = await client.login(matrix.password.get_secret_value(), device_name=matrix.device_name)
    if not isinstance(response, LoginResponse):
        raise LoginFailed(f"login as {matrix.user_id} failed: {response.message}")
    Credentials(matrix.homeserver, response.user_id, response.device_id, response.access_token).save(path)
    log.info("logged_in", user_id=response.user_id, device_id=response.device_id, via="password")


class MatrixSender:
    """Sends one event, classifying the outcome for the outbox, which owns the retry and 429 policy. Waits
    for `ready` (the first sync, which tells nio the rooms) before its first send."""

    def __init__(self, client: AsyncClient, ready: asyncio.Event) -> None:
        self._client = client
        self._ready = ready

    async def send(
        self, room_id: str, content: dict[str, Any], txn_id: str, event_type: str = "m.room.message"
    ) -> SendOutcome:
        await self._ready.wait()
        if room_id not in self._client.rooms:
            return SendFailed("the bot is not in this room", retryable=False)
        try:
            response = await self._client.room_send(
                room_id, event_type, content, tx_id=txn_id, ignore_unverified_devices=True
            )
        except NETWORK_ERRORS as exc:
            return SendFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        except CRYPTO_ERRORS as exc:  # e.g. the room's members or their keys not synced yet: try again
            return SendFailed(f"not encrypted yet: {type(exc).__name__}: {exc}", retryable=True)
        if isinstance(response, RoomSendResponse):
            return Sent(response.event_id)
        return failure(response)

    async def redact(self, room_id: str, event_id: str, txn_id: str) -> SendOutcome:
        await self._ready.wait()
        try:
            response = await self._client.room_redact(room_id, event_id, tx_id=txn_id)
        except NETWORK_ERRORS as exc:
            return SendFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        if isinstance(response, RoomRedactResponse):
            return Sent(response.event_id)
        return failure(response)

    async def typing(self, room_id: str, typing: bool, timeout_ms: int) -> bool:
        await self._ready.wait()
        try:
            response = await self._client.room_typing(room_id, typing, timeout_ms)
        except NETWORK_ERRORS:
            return False
        if isinstance(response, RoomTypingResponse):
            return True
        if response.status_code == "M_UNKNOWN_TOKEN":
            raise TokenRevoked()
        return False

    async def receipt(self, room_id: str, event_id: str) -> bool:
        """An unthreaded public read receipt (`m.read`): the sender sees the bot has read up to `event_id`."""
        await self._ready.wait()
        path = f"/rooms/{segment(room_id)}/receipt/m.read/{segment(event_id)}"
        try:
            reply = await call(self._client, "POST", path, {})
        except NETWORK_ERRORS:
            return False
        if reply.status == 401 and reply.body.get("errcode") == "M_UNKNOWN_TOKEN":
            raise TokenRevoked()
        return reply.ok

    async def upload(self, room_id: str, path: Path, mimetype: str) -> dict[str, Any] | SendOutcome:
        await self._ready.wait()
        room = self._client.rooms.get(room_id)
        encrypt = bool(room is not None and room.encrypted)
        try:
            with path.open("rb") as handle:
                response, keys = await self._client.upload(
                    handle, mimetype, path.name, encrypt=encrypt, filesize=path.stat().st_size
                )
        except FileNotFoundError:
            return SendFailed(f"{path.name} is gone", retryable=False)
        except NETWORK_ERRORS as exc:
            return SendFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        if not isinstance(response, UploadResponse):
            return failure(response)
        if encrypt:
            return {"file": {**(keys or {}), "url": response.content_uri}}
        return {"url": response.content_uri}


def failure(response: Any) -> SendOutcome:
    """What a homeserver's error answer means for the outbox; TokenRevoked when the token is dead."""
    if response.status_code == "M_UNKNOWN_TOKEN":
        raise TokenRevoked()
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
