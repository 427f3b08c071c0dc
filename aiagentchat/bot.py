"""The Matrix side: login, sync, turning room messages into prompts, and sending output."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    JoinedRoomsResponse,
    JoinError,
    LoginResponse,
    MegolmEvent,
    MemoryDownloadResponse,
    ReactionEvent,
    RoomCreateEvent,
    RoomEncryptedFile,
    RoomEncryptedImage,
    RoomMessageFile,
    RoomMessageImage,
    RoomRedactResponse,
    RoomMessageText,
    RoomResolveAliasResponse,
    RoomSendResponse,
    SyncError,
    SyncResponse,
    UploadResponse,
    WhoamiResponse,
)
from nio.crypto import decrypt_attachment
from nio.exceptions import EncryptionError

from aiagentchat import commands
from aiagentchat.approvals import Answer, Pending, RoomToolPolicy, reaction_verdict, text_verdict
from aiagentchat.batcher import QUEUED, Batcher, Notice, React
from aiagentchat.commands import Commands
from aiagentchat.crypto import CRYPTO_ERRORS, Crypto, DeviceLock, crypto_dir, pickle_key
from aiagentchat.outbox import Outbox, RateLimited, Sent, SendFailed, SendOutcome
from aiagentchat.guard import ToolGuard
from aiagentchat.processes import kill_leftover
from aiagentchat.private import Credentials
from aiagentchat.render import MARKER_KEY
from aiagentchat.runner import RoomWorker
from aiagentchat.settings import RoomSettings, Settings
from aiagentchat.store import Prompt, Store
from aiagentchat.uploads import FileRefused, check_size, image_type, save_upload

log = structlog.get_logger(__name__)

HOPS_KEY = "org.aiagentchat.hops"
LEGACY_ROOM_VERSIONS = {str(version) for version in range(1, 12)}
SYNC_TIMEOUT_MS = 30_000
STOP_REACTION = "🛑"
UPLOAD_EVENTS = (RoomMessageFile, RoomMessageImage, RoomEncryptedFile, RoomEncryptedImage)
MAX_SYNC_BACKOFF_S = 30.0


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


_REPLY_FALLBACK = re.compile(r"\A(?:>[^\n]*\n)+\n?")


def strip_reply_fallback(body: str) -> str:
    """Drop the quoted `> ` lines a reply carries, so someone else's words never become the prompt."""
    return _REPLY_FALLBACK.sub("", body, count=1)


def thread_of(event: Any) -> str:
    """The root of the thread the event was posted in; "" for the room's main timeline."""
    relates = event.source.get("content", {}).get("m.relates_to") or {}
    root = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
    return root if isinstance(root, str) else ""


def replied_to(event: Any) -> str | None:
    """The event this one is a reply to; None when it is none, or only a thread's fallback for old clients."""
    relates = event.source.get("content", {}).get("m.relates_to") or {}
    if relates.get("is_falling_back") is True:
        return None
    target = (relates.get("m.in_reply_to") or {}).get("event_id")
    return target if isinstance(target, str) else None


def prompt_text(event: RoomMessageText) -> str | None:
    """What the agent is asked: a person's message without its reply fallback, or, from another agent, the
    result of its run's final event (None for any other event of that agent: its streamed output, a
    failed run)."""
    marker = event.source.get("content", {}).get(MARKER_KEY)
    if marker is None:
        return strip_reply_fallback(event.body)
    final = marker.get("final") if isinstance(marker, dict) else None
    if isinstance(final, dict) and final.get("ok") is True and isinstance(final.get("result"), str):
        return final["result"]
    return None


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
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return SendFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        except CRYPTO_ERRORS as exc:  # e.g. the room's members or their keys not synced yet: try again
            return SendFailed(f"not encrypted yet: {type(exc).__name__}: {exc}", retryable=True)
        if isinstance(response, RoomSendResponse):
            return Sent(response.event_id)
        return _failure(response)

    async def redact(self, room_id: str, event_id: str, txn_id: str) -> SendOutcome:
        await self._ready.wait()
        try:
            response = await self._client.room_redact(room_id, event_id, tx_id=txn_id)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return SendFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        if isinstance(response, RoomRedactResponse):
            return Sent(response.event_id)
        return _failure(response)

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
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return SendFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        if not isinstance(response, UploadResponse):
            return _failure(response)
        if encrypt:
            return {"file": {**(keys or {}), "url": response.content_uri}}
        return {"url": response.content_uri}


def _uploads_note(saved: list[dict[str, Any]]) -> str:
    """What the agent is told, with the next prompt, of the files uploaded since the last one."""
    listing = "\n".join(
        f"- {upload['path']} ({upload['bytes']:,} bytes{', shown below' if upload.get('image') else ''})"
        for upload in saved
    )
    return f"Files the user uploaded into the working directory for this prompt:\n{listing}"


def _failure(response: Any) -> SendOutcome:
    """What a homeserver's error answer means for the outbox."""
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


class Bot:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        data_dir = settings.paths.data_dir
        self.credentials_path = data_dir / "credentials.json"
        self.device_lock = DeviceLock(settings)
        self.client = AsyncClient(
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
        self.rooms: dict[str, RoomSettings] = {}
        self.workers: dict[str, RoomWorker] = {}
        self.policies: dict[str, RoomToolPolicy] = {}
        self.creators: dict[str, set[str]] = {}
        self._seen: set[str] = set()  # rooms recorded as watched, so a sync needs no write for them
        self.commands = Commands(store, data_dir / "outgoing")
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self.crypto = Crypto(self.client, settings, self.rooms, self._batcher_of, self._consider_event)

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
        """Map the configured rooms to room ids, and join those the bot is not in yet (one request for the
        rooms it is in, instead of a join per room on every start)."""
        joined_rooms = await self.client.joined_rooms()
        already = set(joined_rooms.rooms) if isinstance(joined_rooms, JoinedRoomsResponse) else set()
        for room in self.settings.rooms:
            room_id = room.id
            if room_id.startswith("#"):
                response = await self.client.room_resolve_alias(room_id)
                if not isinstance(response, RoomResolveAliasResponse):
                    log.error("room_alias_unresolved", alias=room_id, error=response.message)
                    continue
                room_id = response.room_id
            self.rooms[room_id] = room
            if room_id in already:
                continue
            joined = await self.client.join(room_id)
            if isinstance(joined, JoinError):
                log.error("room_join_failed", room_id=room_id, error=joined.message)

    def _make_worker(self, room_id: str, room: RoomSettings) -> RoomWorker:
        claude = self.settings.claude_for(room)
        sender = MatrixSender(self.client, self.ready)
        outbox = Outbox(room_id, sender, self.store, max_backoff_s=self.settings.output.max_backoff_s)
        output = self.settings.output
        batcher = Batcher(
            room_id,
            outbox,
            transcripts=self.settings.paths.data_dir / "transcripts",
            interval_s=output.flush_interval_s,
            max_run_bytes=output.max_run_bytes,
            tail_bytes=output.tail_bytes,
            reactions=room.reactions,
            live_status=room.live_status,
        )
        workdir = self.settings.workdir_for(room).resolve()
        guard = ToolGuard(self.settings.paths.data_dir, workdir, room.allow_claude_config_writes)
        policy = self.policies[room_id] = RoomToolPolicy(claude, room, room_id, self.store, batcher)
        return RoomWorker(
            room_id, claude, workdir, self.store, batcher, policy, guard, room.reply_mode, room.session_scope
        )

    def _batcher_of(self, room_id: str) -> Batcher | None:
        worker = self.workers.get(room_id)
        return worker.batcher if worker is not None else None

    async def run(self) -> None:
        await self.login()
        self.crypto.attach()
        await self._resolve_rooms()
        self.workers = {room_id: self._make_worker(room_id, room) for room_id, room in self.rooms.items()}
        for pid, started, room_id in await self.store.take_agents():
            if kill_leftover(pid, started):
                log.warning("leftover_agent_killed", pid=pid, room_id=room_id)
        for room_id, worker in self.workers.items():
            if (model := await self.store.room_model(room_id)) in self.rooms[room_id].allowed_models:
                worker.model = model
            await worker.recover()
        try:
            async with asyncio.TaskGroup() as group:
                intake = [group.create_task(self._sync_loop()), group.create_task(self.crypto.run())]
                runs = [group.create_task(worker.run()) for worker in self.workers.values()]
                sends = [group.create_task(worker.batcher.run()) for worker in self.workers.values()]
                await self._stopping.wait()
                await self._shut_down(intake, runs, sends)
        finally:
            await self.client.close()
            self.device_lock.release()

    async def _shut_down(
        self, intake: list[asyncio.Task[None]], runs: list[asyncio.Task[None]], sends: list[asyncio.Task[None]]
    ) -> None:
        """Stop taking prompts, interrupt the running ones (their rooms are told, their process trees end),
        deliver what is queued, all by one deadline for every room; whatever is not delivered by then stays in
        the outbox for the next start. A task still running at the deadline is cancelled again (a cancellation
        can be swallowed) and its room named in the log."""
        timeout = self.settings.daemon.shutdown_timeout_s
        log.info("stopping", deadline_s=timeout)
        rooms = list(zip(self.workers.values(), runs, strict=True))
        for task in [*intake, *runs]:
            task.cancel()

        async def end_room(worker: RoomWorker, run: asyncio.Task[None]) -> None:
            await asyncio.wait([run])
            await worker.batcher.close()

        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait(intake)  # it may still queue notices: the batchers close after it
                await asyncio.gather(*(end_room(worker, run) for worker, run in rooms))
        except TimeoutError:
            log.warning(
                "shutdown_deadline",
                undelivered_events=sum(worker.batcher.backlog() for worker in self.workers.values()),
                rooms_still_running=[worker.room_id for worker, run in rooms if not run.done()],
            )
            for task in [*intake, *runs, *sends]:
                task.cancel()

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
                    raise TokenRevoked()
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
            await self.crypto.upkeep()
            token = response.next_batch
            await self.store.set_sync_token(token)
            history = full_state = False
            if not self.ready.is_set():
                self.ready.set()
                log.info("ready", rooms=len(self.rooms), user_id=self.client.user_id)

    async def _handle_sync(self, response: SyncResponse, history: bool) -> None:
        synced_at = time.time()  # when this batch arrived: the start of every prompt's dispatch in it
        for room_id, info in response.rooms.invite.items():
            await self._consider_invite(room_id, info.invite_state)
        for room_id, info in response.rooms.join.items():
            room = self.rooms.get(room_id)
            if room is None:
                continue
            self._note_creators(room_id, [*info.state, *info.timeline.events])
            if room_id not in self._seen:
                first_sight = await self.store.mark_room_seen(room_id)
                self._seen.add(room_id)
                if first_sight:
                    continue
            if history:
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

    async def _consider_event(
        self, room_id: str, room: RoomSettings, event: Any, synced_at: float | None = None
    ) -> None:
        """Turn a room event into a prompt, or say why not. `synced_at`: when its sync batch arrived (a held
        encrypted event comes back here when its key arrives, later)."""
        if isinstance(event, MegolmEvent):
            self.crypto.hold(room_id, room, event)
            return
        if not isinstance(event, (RoomMessageText, ReactionEvent, *UPLOAD_EVENTS)):
            return
        if event.sender == self.client.user_id:
            return
        if (answering := self._answer_to(room_id, room, event)) is not None:
            await self._consider_answer(room_id, room, event, *answering)
            return
        refusal = self._refusal(room_id, room, event) or await self.crypto.refusal(room_id, room, event)
        hops = self._hops(event)
        if refusal is None and hops >= room.max_hops:
            refusal = f"hop limit {room.max_hops} reached"
        if refusal is not None:
            log.info("prompt_ignored", room_id=room_id, event_id=event.event_id, sender=event.sender, reason=refusal)
            return
        worker = self.workers[room_id]
        if isinstance(event, ReactionEvent):
            await self._consider_reaction(room_id, worker, event)
            return
        if isinstance(event, UPLOAD_EVENTS):
            await self._save_upload(room_id, room, worker, event)
            return
        text = prompt_text(event) or ""
        command = None if MARKER_KEY in event.source.get("content", {}) else commands.parse(text, room.command_prefix)
        if command is not None and (alias := room.aliases.get(command.word)) is not None:
            text, command = f"{alias} {command.argument}".strip(), None
        saved = await self.store.uploads(room_id) if command is None else []
        note = _uploads_note(saved) if saved else ""
        images = tuple(upload["path"] for upload in saved if upload.get("image"))
        prompt = Prompt(room_id, event.event_id, event.sender, text, hops, note, thread_of(event), images)
        if command is not None:
            if await self.store.add_prompt(prompt, "done"):  # recorded: a command is never run twice either
                await self.commands.run(room_id, room, worker, prompt, command)
            return
        if (queued := worker.inbox.qsize()) >= room.max_queued:
            busy = f"busy: {queued} prompts are queued in this room; send it again later"
            await self._refuse(worker, prompt, busy, "prompt_refused_busy", queued=queued)
            return
        if (spent := await commands.over_budget(self.store, room_id, room)) is not None:
            await self._refuse(worker, prompt, spent, "prompt_refused_budget")
            return
        if await self.store.add_prompt(prompt):
            log.info(
                "prompt_accepted",
                room_id=room_id,
                event_id=event.event_id,
                sender=event.sender,
                hops=hops,
                synced_at=round(synced_at or time.time(), 6),
            )
            if saved:
                await self.store.clear_uploads(room_id)  # told to the agent with this prompt
            if worker.current is not None or worker.inbox.qsize():
                await worker.batcher.put(React(prompt.event_id, QUEUED))
            worker.inbox.put_nowait(prompt)

    def _answer_to(self, room_id: str, room: RoomSettings, event: Any) -> tuple[str, Pending | None] | None:
        """If the event answers an approval request (a reaction or reply to it, or a plain yes/no/always while
        one waits): the request's event id and the request if it still waits. Commands are never answers."""
        policy = self.policies[room_id]
        if isinstance(event, ReactionEvent):
            target = event.reacts_to
        elif isinstance(event, RoomMessageText):
            if commands.parse(strip_reply_fallback(event.body), room.command_prefix) is not None:
                return None
            target = replied_to(event)
            waiting = policy.pending
            if target is None and waiting is not None and event.sender in policy.answerers:
                # not a reply: a plain yes/no/always answers the waiting request, and in the request's own
                # thread any message answers the agent's question
                in_its_thread = waiting.thread is not None and thread_of(event) == waiting.thread
                if text_verdict(event.body) if not waiting.question else in_its_thread:
                    return "", waiting
        else:
            return None
        if not isinstance(target, str):
            return None
        if (pending := policy.request_for(target)) is not None or policy.closed(target) is not None:
            return target, pending
        return None

    async def _consider_answer(
        self, room_id: str, room: RoomSettings, event: Any, target: str, pending: Pending | None
    ) -> None:
        """A reaction or reply to an approval request: only the room's approvers (or allowed users) decide."""
        policy, worker = self.policies[room_id], self.workers[room_id]
        refusal = self._refusal(room_id, room, event, policy.answerers) or await self.crypto.refusal(
            room_id, room, event
        )
        if refusal is not None:
            log.info(
                "approval_answer_ignored", room_id=room_id, event_id=event.event_id, sender=event.sender, reason=refusal
            )
            return
        if isinstance(event, ReactionEvent):
            if event.key.startswith(STOP_REACTION):
                worker.stop(event.sender)
            elif pending is not None and (verdict := reaction_verdict(event.key)) is not None:
                policy.answer(pending, Answer(verdict, event.sender))
            return
        if not await self.store.add_prompt(Prompt(room_id, event.event_id, event.sender, event.body, 0), "done"):
            return
        text = strip_reply_fallback(event.body).strip()
        marker = {"command": event.event_id}
        if pending is None:
            outcome = policy.closed(target) or "it no longer waits"
            decided = f"That request was already decided: {outcome}"
            await worker.batcher.put(Notice(event.event_id, decided, marker, thread=thread_of(event) or None))
            return
        if pending.question:
            declined = reaction_verdict(text) == "deny"
            policy.answer(pending, Answer("deny" if declined else "allow", event.sender, "" if declined else text))
            return
        if (parsed := text_verdict(text)) is None:
            usage = "Answer with `yes`, `no [reason]` or `always` (or react ✅ ❌ 🔁)."
            await worker.batcher.put(Notice(event.event_id, usage, marker, thread=thread_of(event) or None))
            return
        policy.answer(pending, Answer(parsed[0], event.sender, parsed[1]))

    async def _refuse(self, worker: RoomWorker, prompt: Prompt, reason: str, why: str, **details: Any) -> None:
        if await self.store.add_prompt(prompt, "refused"):
            log.warning(why, room_id=prompt.room_id, event_id=prompt.event_id, **details)
            await worker.refuse(prompt, reason)

    async def _consider_reaction(self, room_id: str, worker: RoomWorker, event: ReactionEvent) -> None:
        """🛑 from an allowed user on a prompt: stop it if it runs, drop it if it waits."""
        if not event.key.startswith(STOP_REACTION):
            return
        running = worker.current
        if running is not None and running.event_id == event.reacts_to:
            worker.stop(event.sender)
            outcome = "stopping"
        else:
            outcome = "dropped" if await worker.drop(event.reacts_to, event.sender) else "not running or queued"
        log.info("stop_reaction", room_id=room_id, prompt=event.reacts_to, sender=event.sender, outcome=outcome)

    async def _save_upload(self, room_id: str, room: RoomSettings, worker: RoomWorker, event: Any) -> None:
        """Save an allowed user's file into the room's working directory; the room's next prompt is told."""
        if not await self.store.add_prompt(Prompt(room_id, event.event_id, event.sender, "", 0), "done"):
            return
        info = event.source.get("content", {}).get("info") or {}
        marker = {"upload": event.event_id}
        try:
            check_size(info.get("size") if isinstance(info.get("size"), int) else 0, room.max_upload_bytes)
            data = await self._download(event)
            check_size(len(data), room.max_upload_bytes)
            worker.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = save_upload(worker.workdir, event.body, data)
        except (FileRefused, OSError) as exc:
            log.warning("upload_refused", room_id=room_id, event_id=event.event_id, reason=str(exc))
            refused = f"⛔ File not saved: {exc}."
            await worker.batcher.put(Notice(event.event_id, refused, marker, thread=thread_of(event) or None))
            return
        log.info("upload_saved", room_id=room_id, event_id=event.event_id, path=path, bytes=len(data))
        image = isinstance(event, (RoomMessageImage, RoomEncryptedImage)) and image_type(path, len(data)) is not None
        await self.store.add_upload(room_id, {"path": path, "bytes": len(data), "image": image})
        told = "shows it to the agent" if image else "tells the agent where it is"
        notice = f"📎 Saved as `{path}` ({len(data):,} bytes); the next prompt {told}."
        await worker.batcher.put(Notice(event.event_id, notice, marker, thread=thread_of(event) or None))

    async def _download(self, event: Any) -> bytes:
        response = await self.client.download(mxc=event.url)
        if not isinstance(response, MemoryDownloadResponse):
            raise FileRefused(f"the homeserver did not hand it over ({getattr(response, 'message', response)})")
        if isinstance(event, (RoomEncryptedFile, RoomEncryptedImage)):
            try:
                return decrypt_attachment(response.body, event.key["k"], event.hashes["sha256"], event.iv)
            except (KeyError, EncryptionError) as exc:
                raise FileRefused(f"it could not be decrypted ({exc})") from exc
        return response.body

    def _refusal(self, room_id: str, room: RoomSettings, event: Any, answerers: list[str] | None = None) -> str | None:
        """Why this event (a message, a reaction, a file) must not act on the agent, or None if it may. With
        `answerers`, it answers an approval request: only they may, and never an agent."""
        content = event.source.get("content", {})
        if answerers is not None:
            if MARKER_KEY in content or event.sender not in answerers:
                return "not one of the room's approvers"
        elif MARKER_KEY in content:
            if event.sender not in room.allowed_bots:
                return "output of an agent that is not in allowed_bots"
            if not isinstance(event, RoomMessageText) or prompt_text(event) is None:
                return "not the successful final answer of an agent's run"
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
    def _hops(event: Any) -> int:
        """How many agents this prompt has already passed through."""
        content = event.source.get("content", {})
        marker = content.get(MARKER_KEY)
        value = marker.get("hops") if isinstance(marker, dict) else content.get(HOPS_KEY, 0)
        return value if isinstance(value, int) and value >= 0 else 0
