"""The daemon's wiring and lifecycle: login, the rooms' tasks (each supervised, so a room that fails restarts
alone), the sync loop, and acting on what the intake decides about each event."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from nio import (
    InviteMemberEvent,
    InviteNameEvent,
    JoinedRoomsResponse,
    JoinError,
    MegolmEvent,
    MemoryDownloadResponse,
    RoomCreateEvent,
    RoomLeaveError,
    RoomMemberEvent,
    RoomResolveAliasResponse,
    SyncError,
    SyncResponse,
)
from nio.crypto import decrypt_attachment
from nio.exceptions import EncryptionError
from pydantic import ValidationError

from aiagentchat import chatrooms, commands, intake
from aiagentchat.approvals import RoomToolPolicy
from aiagentchat.batcher import Accepted, Batcher, Notice
from aiagentchat.chatrooms import ADMIN_WORDS, RoomAdmin
from aiagentchat.commands import Commands, over_budget
from aiagentchat.control import Hub
from aiagentchat.crypto import Crypto, DeviceLock
from aiagentchat.desk import Desk
from aiagentchat.guard import ToolGuard
from aiagentchat.intake import Incoming, Malformed
from aiagentchat.metrics import Metrics
from aiagentchat.outbox import Outbox
from aiagentchat.processes import kill_leftover
from aiagentchat.runner import RoomWorker
from aiagentchat.sandbox import wall_for
from aiagentchat.settings import RoomSettings, Settings
from aiagentchat.store import Prompt, Store
from aiagentchat.storedrooms import checked_chat
from aiagentchat.transport import MatrixSender, TokenRevoked, login, make_client
from aiagentchat.uploads import FileRefused, check_size, image_type, save_upload
from aiagentchat.worktrees import Worktrees

log = structlog.get_logger(__name__)

SYNC_TIMEOUT_MS = 30_000
MAX_SYNC_BACKOFF_S = 30.0
RESTART_BACKOFF_S = 1.0  # the first restart of a failed room task; doubled on each failure after
MAX_RESTART_BACKOFF_S = 60.0
SLOW_COMMANDS = {"get", "merge", "discard"}  # done in the room's own task, not in the sync loop
HEALTHY_AFTER_S = 60.0  # a room task that ran this long before failing starts its back-off afresh


def fatal(exc: BaseException) -> bool:
    """What the daemon cannot recover from, and so exits on (cli.py's exit codes): a revoked token, or a
    database that fails (not one statement that does)."""
    if isinstance(exc, TokenRevoked):
        return True
    statement = (sqlite3.ProgrammingError, sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, statement)


async def supervise(
    room_id: str,
    task: str,
    run: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run one of a room's tasks. When it fails unexpectedly, log it, let `recover` tell the room (the
    prompt it ran is answered as failed, never lost) and start it again with back-off; the daemon's
    other rooms never notice. What the daemon cannot recover from ends it."""
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        started = loop.time()
        try:
            await run()
            return
        except Exception as exc:
            if fatal(exc):
                raise
            failures = 1 if loop.time() - started >= HEALTHY_AFTER_S else failures + 1
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** (failures - 1))
            log.exception("room_task_failed", room_id=room_id, task=task, failures=failures, restart_in_s=delay)
        if recover is not None:
            await guarded(recover(), "room_recovery_failed", room_id=room_id, task=task)
        await asyncio.sleep(delay)
        log.info("room_task_restarted", room_id=room_id, task=task)


async def guarded(step: Awaitable[None], failed: str, **context: Any) -> None:
    """Await one step (handling one event, a room's recovery); an unexpected exception is logged with its
    traceback as `failed` and goes no further, unless the daemon cannot recover from it."""
    try:
        await step
    except Exception as exc:
        if fatal(exc):
            raise
        log.exception(failed, **context)


class Bot:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.device_lock = DeviceLock(settings)
        self.client = make_client(settings)
        self.rooms: dict[str, RoomSettings] = {}
        self.workers: dict[str, RoomWorker] = {}
        self.policies: dict[str, RoomToolPolicy] = {}
        self.desks: dict[str, Desk] = {}
        self.creators: dict[str, set[str]] = {}
        self.chat: dict[str, dict[str, Any]] = {}  # rooms made from the chat that are served: their chat-set keys
        self.admin = RoomAdmin(settings, store, self)
        self._group: asyncio.TaskGroup | None = None  # the rooms' tasks run in it, those started later too
        self._room_tasks: dict[str, _RoomTasks] = {}
        self._leaving: list[asyncio.Task[None]] = []
        self._seen: set[str] = set()  # rooms recorded as watched, so a sync needs no write for them
        self._syncing = False  # while a sync batch is handled, its prompts are recorded together at its end
        self._accepting: list[tuple[Prompt, float | None]] = []  # accepted, not recorded yet
        self.commands = Commands(
            store, settings.paths.data_dir / "outgoing", self._settings_lines, self.admin.commands_for
        )
        self.ready = asyncio.Event()
        self.last_sync: float | None = None  # time.monotonic() at the end of the last good sync
        self.last_turn: float | None = None  # time.monotonic() when the sync loop last began a request or a wait
        # the longest a turn of a live sync loop takes: a long-poll that hits the request timeout, or a back-off
        self._turn_limit_s = settings.matrix.request_timeout_s + SYNC_TIMEOUT_MS / 1000 + MAX_SYNC_BACKOFF_S
        self.metrics = Metrics(lambda: self.workers)
        self._stopping = asyncio.Event()
        self.crypto = Crypto(self.client, settings, self.rooms, self._batcher_of, self._consider_safely)
        self.control = Hub(self)  # the control socket's view of the rooms (cli.py serves it)

    def stop(self) -> None:
        self._stopping.set()

    async def login(self) -> None:
        await login(self.client, self.settings)

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
        for stored in await self.store.chat_rooms():  # settings.toml wins over what was set in the chat
            if stored.room_id in self.rooms:
                continue
            try:
                chat = self._checked_chat(stored.room_id, stored.settings)
                self.rooms[stored.room_id] = self.settings.room_defaults.room(stored.room_id, chat)
            except ValidationError as exc:
                log.error("chat_room_invalid", room_id=stored.room_id, error=str(exc).splitlines()[0])
                continue
            self.chat[stored.room_id] = chat
            if stored.room_id not in already:
                joined = await self.client.join(stored.room_id)
                if isinstance(joined, JoinError):
                    log.error("room_join_failed", room_id=stored.room_id, error=joined.message)

    def _checked_chat(self, room_id: str, chat: dict[str, Any]) -> dict[str, Any]:
        """A stored room's chat-set keys, its working directory judged again by today's project_roots: one they no
        longer allow is dropped (the room goes back to its own directory under the data dir) and logged."""
        served, refused = checked_chat(self.settings, chat)
        if refused is not None:
            log.warning("room_workdir_refused", room_id=room_id, workdir=chat.get("workdir"), reason=refused)
        return served

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
            status_after_s=output.status_after_s,
            presence=sender,
            tap=self.control.observe,
        )
        workdir = self.settings.workdir_for(room).resolve()
        guard = ToolGuard(self.settings.paths.data_dir, workdir, room.allow_claude_config_writes)
        policy = self.policies[room_id] = RoomToolPolicy(claude, room, room_id, self.store, batcher, self.metrics)
        desk = self.desks[room_id] = Desk(room_id)
        home = self.settings.home_for(room).resolve()
        wall = wall_for(claude, workdir, home, Path.home()) if claude.sandbox == "bwrap" else None
        trees = Worktrees(workdir, self.settings.worktrees_for(room).resolve(), wall) if room.worktrees else None
        return RoomWorker(
            room_id,
            claude,
            workdir,
            self.store,
            batcher,
            policy,
            guard,
            room.reply_mode,
            room.session_scope,
            desk,
            wall,
            self.metrics,
            trees,
            room.max_parallel,
        )

    def waiting_since(self) -> float | None:
        """Since when the longest-waiting room's next event has waited to be delivered; None when none waits."""
        return min(
            (since for worker in self.workers.values() if (since := worker.batcher.waiting_since()) is not None),
            default=None,
        )

    def _batcher_of(self, room_id: str) -> Batcher | None:
        worker = self.workers.get(room_id)
        return worker.batcher if worker is not None else None

    async def run(self) -> None:
        await self.login()
        self.crypto.attach()
        # before any room, so no client meets the device unsigned; what fails here is retried in the background
        await guarded(self.crypto.publish_identity(retry=False), "cross_signing_failed")
        await self._resolve_rooms()
        for pid, started, room_id in await self.store.take_agents():
            if kill_leftover(pid, started):
                log.warning("leftover_agent_killed", pid=pid, room_id=room_id)
        for room_id in list(self.rooms):
            await self._start_room(room_id)
        try:
            async with asyncio.TaskGroup() as self._group:
                daemon_tasks = [
                    self._group.create_task(self._sync_loop()),
                    self._group.create_task(supervise("", "crypto", self.crypto.run)),
                    self._group.create_task(supervise("", "identity", self.crypto.publish_identity)),  # if not done
                ]
                for room_id in self.workers:
                    self._spawn(room_id)
                await self._stopping.wait()
                rooms = [self._room_tasks[room_id] for room_id in self.workers]  # in the order _shut_down expects
                # the sync loop and everything that may still queue a notice for a room
                intake_tasks = [*daemon_tasks, *self._leaving, *(tasks.desk for tasks in rooms)]
                runs, sends = [tasks.run for tasks in rooms], [tasks.send for tasks in rooms]
                await self._shut_down(intake_tasks, runs, sends)
        finally:
            await self.client.close()
            self.device_lock.release()

    async def _start_room(self, room_id: str) -> None:
        """Make the room's worker (with its batcher and desk), answer what an earlier run left running, queue
        what it left queued; once the daemon runs, also start its tasks."""
        room = self.rooms[room_id]
        worker = self._make_worker(room_id, room)
        if (model := await self.store.room_model(room_id)) in room.allowed_models:
            worker.model = model
        await worker.recover()
        self.workers[room_id] = worker  # served from here on: with its tasks, once the daemon runs
        if self._group is not None:
            self._spawn(room_id)

    def _spawn(self, room_id: str) -> None:
        """Start the room's tasks, each supervised: its desk, its worker and its batcher."""
        assert self._group is not None
        worker, desk, group = self.workers[room_id], self.desks[room_id], self._group
        self._room_tasks[room_id] = _RoomTasks(
            group.create_task(supervise(room_id, "desk", desk.run)),
            group.create_task(supervise(room_id, "worker", worker.run, worker.crashed)),
            group.create_task(supervise(room_id, "batcher", worker.batcher.run, worker.batcher.crashed)),
        )

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
            self.last_turn = time.monotonic()
            try:
                response = await self.client.sync(timeout=SYNC_TIMEOUT_MS, since=token, full_state=full_state)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                response = SyncError(f"{type(exc).__name__}: {exc}")
            except Exception:
                response = self._sync_not_handled(token)
                if response is None:
                    raise
            if isinstance(response, SyncError):
                if response.status_code == "M_UNKNOWN_TOKEN":
                    raise TokenRevoked()
                failures += 1
                if failures == 1:
                    log.warning("sync_failing", error=response.message)
                delay = min(MAX_SYNC_BACKOFF_S, 2 ** min(failures, 10) / 2)
                self.last_turn = time.monotonic()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            if failures:
                log.info("sync_recovered", after_failures=failures)
                failures = 0
            if isinstance(response, SyncResponse):
                await self._handle_sync(response, history)
            await self.crypto.upkeep()
            token = response.next_batch
            await self.store.set_sync_token(token)
            self.last_sync = time.monotonic()
            history = full_state = False
            if not self.ready.is_set():
                self.ready.set()
                log.info("ready", rooms=len(self.rooms), user_id=self.client.user_id)

    def sync_loop_alive(self) -> bool:
        """For the systemd watchdog: the sync loop began a request or a back-off wait lately. A homeserver that is
        down does not count against it (a restart would not bring it back, and would end the rooms' runs, whose
        output waits in the outbox); a hung loop or event loop does."""
        return self.last_turn is not None and time.monotonic() - self.last_turn < self._turn_limit_s

    def _sync_not_handled(self, token: str | None) -> _Skipped | None:
        """nio raised while it took in a sync response (its own parsing or room state, before the daemon saw
        an event). If nio had already moved to the batch's end, move past the batch, so it is never read again;
        else None: the error is the daemon's to end on."""
        skipped_to = self.client.next_batch
        if not isinstance(skipped_to, str) or not skipped_to or skipped_to == token:
            return None
        log.exception("sync_batch_skipped", since=token, next_batch=skipped_to)
        return _Skipped(skipped_to)

    async def _handle_sync(self, response: SyncResponse, history: bool) -> None:
        self._syncing = True
        try:
            await self._handle_batch(response, history)
        finally:
            self._syncing = False
            await guarded(self._record_accepted(), "prompts_not_recorded")

    async def _handle_batch(self, response: SyncResponse, history: bool) -> None:
        synced_at = time.time()  # when this batch arrived: the start of every prompt's dispatch in it
        for room_id, info in response.rooms.invite.items():
            await guarded(self._consider_invite(room_id, info.invite_state), "invite_failed", room_id=room_id)
        for room_id, info in response.rooms.join.items():
            room = self.rooms.get(room_id)
            if room is None:
                continue
            self._note_creators(room_id, [*info.state, *info.timeline.events])
            events = info.timeline.events
            if room_id not in self._seen:
                first_sight = await self.store.mark_room_seen(room_id)
                self._seen.add(room_id)
                if first_sight:  # its history is never run; what was sent after the bot joined is new
                    events = self._after_own_join(events)
            if history:
                continue
            for event in events:
                if isinstance(sent_at := getattr(event, "server_timestamp", None), int):
                    self.metrics.sync_lag.observe(max(0.0, synced_at - sent_at / 1000))
                await self._consider_safely(room_id, room, event, synced_at)

    def _after_own_join(self, events: list[Any]) -> list[Any]:
        """The events after the bot's own join in this timeline; none when the join is not in it."""
        joins = [
            index
            for index, event in enumerate(events)
            if isinstance(event, RoomMemberEvent)
            and event.state_key == self.client.user_id
            and event.membership == "join"
        ]
        return events[joins[-1] + 1 :] if joins else []

    def _note_creators(self, room_id: str, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, RoomCreateEvent):
                extra = event.source.get("content", {}).get("additional_creators")
                listed = extra if isinstance(extra, list) else []
                self.creators[room_id] = {event.sender, *[user for user in listed if isinstance(user, str)]}

    def _room_state(self, room_id: str, sender: str) -> intake.RoomState:
        room = self.client.rooms.get(room_id)
        admin = self.admin.is_admin(sender)
        if room is None:
            return intake.RoomState(self.client.user_id, False, 0, self.policies[room_id], admin)
        creators = self.creators.get(room_id, set())
        level = intake.power_level(room.room_version, creators, sender, room.power_levels.get_user_level(sender))
        return intake.RoomState(self.client.user_id, room.encrypted, level, self.policies[room_id], admin)

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
        if room is None and isinstance(inviter, str) and self.admin.is_admin(inviter):
            await self._accept_chat_room(room_id, inviter, invite_state)
            return
        if room is None or inviter not in room.allowed_users:
            log.info("invite_ignored", room_id=room_id, inviter=inviter)
            return
        joined = await self.client.join(room_id)
        log.info("invite_accepted", room_id=room_id, inviter=inviter, ok=not isinstance(joined, JoinError))

    async def _accept_chat_room(self, room_id: str, inviter: str, invite_state: list[Any]) -> None:
        """An admin's invite to a room not in the settings: join it and serve it with the room defaults, the
        inviter as its allowed user and a working directory of its own, from now on and after restarts."""
        if room_id in self._room_tasks:  # still leaving it after `!leave`: invite it again once it has left
            log.info("invite_ignored", room_id=room_id, inviter=inviter, reason="still leaving the room")
            return
        joined = await self.client.join(room_id)
        if isinstance(joined, JoinError):
            log.warning("invite_accepted", room_id=room_id, inviter=inviter, ok=False, error=joined.message)
            return
        chat: dict[str, Any] = {"allowed_users": [inviter]}
        names = [event.name for event in invite_state if isinstance(event, InviteNameEvent)]
        if names and isinstance(names[-1], str) and names[-1].strip():
            chat["name"] = names[-1].strip()[:100]
        await self.store.add_chat_room(room_id, inviter, chat)
        self.rooms[room_id] = self.settings.room_defaults.room(room_id, chat)
        self.chat[room_id] = chat
        await self._start_room(room_id)
        log.info("invite_accepted", room_id=room_id, inviter=inviter, ok=True, made_from_chat=True)

    # --- rooms made from the chat: what chatrooms.RoomAdmin asks of the daemon ---

    def chat_settings(self, room_id: str) -> dict[str, Any] | None:
        return self.chat.get(room_id)

    async def change(self, room_id: str, chat: dict[str, Any]) -> None:
        room = self.rooms[room_id] = self.settings.room_defaults.room(room_id, chat)
        self.chat[room_id] = chat
        claude = self.settings.claude_for(room)
        workdir = self.settings.workdir_for(room).resolve()
        guard = ToolGuard(self.settings.paths.data_dir, workdir, room.allow_claude_config_writes)
        home = self.settings.home_for(room).resolve()
        wall = wall_for(claude, workdir, home, Path.home()) if claude.sandbox == "bwrap" else None
        worker = self.workers[room_id]
        if (claude, workdir) != (worker.claude, worker.workdir):  # `!allow` and `!deny` keep the agent running
            trees = Worktrees(workdir, self.settings.worktrees_for(room).resolve(), wall) if room.worktrees else None
            worker.reconfigure(claude, workdir, guard, wall, trees)
        self.policies[room_id].update(claude, room)

    def workdirs(self) -> dict[Path, str]:
        return {worker.workdir.resolve(): room_id for room_id, worker in self.workers.items()}

    def leave(self, room_id: str) -> None:
        assert self._group is not None
        self.rooms.pop(room_id, None)  # nothing more from it is read
        self.chat.pop(room_id, None)
        leaving = guarded(self._leave(room_id), "room_leave_failed", room_id=room_id)  # never ends the daemon
        self._leaving.append(self._group.create_task(leaving))

    async def _leave(self, room_id: str) -> None:
        """Stop the room's desk and worker (nothing runs: `!leave` refuses otherwise), deliver what it still has
        to send (the answer to `!leave`), then leave the room and forget its tasks."""
        tasks, worker = self._room_tasks[room_id], self.workers[room_id]
        for task in (tasks.desk, tasks.run):
            task.cancel()
        await asyncio.wait([tasks.desk, tasks.run])
        await worker.batcher.close()
        await asyncio.wait([tasks.send])
        left = await self.client.room_leave(room_id)
        ok = not isinstance(left, RoomLeaveError)
        log.info("room_left", room_id=room_id, ok=ok, error=None if ok else left.message)
        for table in (self._room_tasks, self.workers, self.policies, self.desks, self.creators):
            table.pop(room_id, None)
        self._seen.discard(room_id)

    async def _settings_lines(self, room_id: str) -> list[str]:
        """For `!status`: where the room's settings come from."""
        room = self.rooms.get(room_id)
        return [] if room is None else chatrooms.sources(self.settings, room, self.chat.get(room_id))

    async def _consider_safely(
        self, room_id: str, room: RoomSettings, event: Any, synced_at: float | None = None
    ) -> None:
        """Consider one event; whatever goes wrong stays with that event (logged with its traceback), so the
        sync position still moves past it and a poison event is never read twice."""
        event_id, sender = getattr(event, "event_id", None), getattr(event, "sender", None)
        await guarded(
            self._consider_event(room_id, room, event, synced_at),
            "event_failed",
            room_id=room_id,
            event_id=event_id,
            sender=sender,
        )

    async def _consider_event(
        self, room_id: str, room: RoomSettings, event: Any, synced_at: float | None = None
    ) -> None:
        """What the intake decides about a room event, done. `synced_at`: when its sync batch arrived (a held
        encrypted event comes back here when its key arrives, later)."""
        if isinstance(event, MegolmEvent):
            if (problem := intake.encrypted_problem(event)) is not None:
                self._malformed(room_id, event, problem)
            else:
                self.crypto.hold(room_id, room, event)
            return
        incoming = intake.read(event)
        if incoming is None:
            return
        if isinstance(incoming, Malformed):
            self._malformed(room_id, event, incoming.what)
            return
        decision = intake.decide(room, incoming, self._room_state(room_id, incoming.sender))
        if isinstance(decision, intake.Ignore):
            return
        if isinstance(decision, intake.Refuse):
            answering, refusal = decision.answering, decision.reason
        elif self.crypto.await_keys(room_id, room, event):
            return  # considered again once its sender's device list is known
        else:
            answering = isinstance(decision, intake.ApprovalAnswer)
            refusal = await self.crypto.refusal(room_id, room, event)
        if refusal is not None:
            ignored = "approval_answer_ignored" if answering else "prompt_ignored"
            log.info(ignored, room_id=room_id, event_id=incoming.event_id, sender=incoming.sender, reason=refusal)
            return
        await self._act(room_id, room, incoming, decision, synced_at)

    @staticmethod
    def _malformed(room_id: str, event: Any, what: str) -> None:
        event_id, sender = getattr(event, "event_id", None), getattr(event, "sender", None)
        log.warning("event_malformed", room_id=room_id, event_id=event_id, sender=sender, what=what)

    async def _act(
        self, room_id: str, room: RoomSettings, event: Incoming, decision: intake.Decision, synced_at: float | None
    ) -> None:
        if not isinstance(decision, intake.Accept):  # it sees the prompts before it as queued
            await self._record_accepted()
        match decision:
            case intake.ApprovalAnswer():
                await self._answer_approval(room_id, event, decision)
            case intake.StopPrompt(prompt_id=target):
                await self._stop_prompt(room_id, event, target)
            case intake.Confirm(target=target):
                await self._confirm(room_id, event, target)
            case intake.SaveUpload(upload=upload):
                await self._take_upload(room_id, room, event, upload)
            case intake.RunCommand(text=text, command=command):
                await self._run_command(room_id, room, event, text, command)
            case intake.Accept(text=text):
                await self._accept(room_id, room, event, text, synced_at)

    async def _answer_approval(self, room_id: str, event: Incoming, decision: intake.ApprovalAnswer) -> None:
        policy, worker = self.policies[room_id], self.workers[room_id]
        if decision.stop and decision.pending is not None:
            worker.stop_prompt(decision.pending.prompt_id, event.sender)
        elif decision.stop:
            worker.stop(event.sender)
        if decision.record and not await self.store.add_prompt(
            Prompt(room_id, event.event_id, event.sender, event.body, 0), "done"
        ):
            return
        if decision.notice:
            marker = {"command": event.event_id}
            await worker.batcher.put(Notice(event.event_id, decision.notice, marker, thread=event.thread or None))
        elif decision.pending is not None and decision.answer is not None:
            policy.answer(decision.pending, decision.answer)

    async def _stop_prompt(self, room_id: str, event: Incoming, target: str) -> None:
        """🛑 from an allowed user on a prompt: stop it if it runs, drop it if it waits."""
        worker = self.workers[room_id]
        if worker.stop_prompt(target, event.sender):
            outcome = "stopping"
        else:
            outcome = "dropped" if await worker.drop(target, event.sender) else "not running or queued"
        log.info("stop_reaction", room_id=room_id, prompt=target, sender=event.sender, outcome=outcome)

    async def _confirm(self, room_id: str, event: Incoming, target: str) -> None:
        """✅ from an allowed user on an event: a `!discard` request waiting for it is done (in the room's task)."""
        worker = self.workers[room_id]
        if worker.worktrees is None or not any(
            worker.batcher.event_of(ref) == target for ref in worker.worktrees.confirming
        ):
            return
        if await self.store.add_prompt(Prompt(room_id, event.event_id, event.sender, "", 0), "done"):
            self.desks[room_id].add(event.event_id, lambda: self._confirmed(room_id, worker, target, event.sender))

    async def _confirmed(self, room_id: str, worker: RoomWorker, target: str, by: str) -> None:
        await self.commands.confirmed(room_id, worker, target, by)

    async def _run_command(
        self, room_id: str, room: RoomSettings, event: Incoming, text: str, command: commands.Command
    ) -> None:
        worker = self.workers[room_id]
        prompt = Prompt(room_id, event.event_id, event.sender, text, event.hops, thread=event.thread)
        if not await self.store.add_prompt(prompt, "done"):  # recorded: a command is never run twice either
            return
        if command.word in ADMIN_WORDS:
            await self.admin.run(room_id, room, worker, prompt, command)
            return
        if command.word in SLOW_COMMANDS:  # in the room's own task: the sync loop does not wait for a file copy
            self.desks[room_id].add(event.event_id, lambda: self.commands.run(room_id, room, worker, prompt, command))
            return
        await self.commands.run(room_id, room, worker, prompt, command)

    async def _accept(
        self, room_id: str, room: RoomSettings, event: Incoming, text: str, synced_at: float | None
    ) -> None:
        worker = self.workers[room_id]
        prompt = Prompt(room_id, event.event_id, event.sender, text, event.hops, thread=event.thread)
        queued = worker.queued() + sum(accepted.room_id == room_id for accepted, _ in self._accepting)
        if queued >= room.max_queued:
            busy = f"busy: {queued} prompts are queued in this room; send it again later"
            await self._refuse(worker, prompt, busy, "prompt_refused_busy", queued=queued)
            return
        if (spent := await over_budget(self.store, room_id, room)) is not None:
            await self._refuse(worker, prompt, spent, "prompt_refused_budget")
            return
        self._accepting.append((prompt, synced_at))
        if not self._syncing:
            await self._record_accepted()

    async def _record_accepted(self) -> None:
        """Record the prompts accepted since the last call in one transaction (each durable before it is
        acknowledged, as one commit instead of one per prompt), then hand them to their rooms: a sync batch
        that brings prompts for a hundred rooms starts them all at once."""
        accepting, self._accepting = self._accepting, []
        for prompt, _ in accepting:
            if prompt.room_id not in self.rooms:  # `!leave` came between it and here: the room is forgotten
                log.info("prompt_ignored", room_id=prompt.room_id, event_id=prompt.event_id, reason="room left")
        accepting = [(prompt, synced_at) for prompt, synced_at in accepting if prompt.room_id in self.rooms]
        if not accepting:
            return
        async with self.store.transaction():
            added = [await self.store.add_prompt(prompt) for prompt, _ in accepting]
        for (prompt, synced_at), new in zip(accepting, added, strict=True):
            if not new:
                continue
            log.info(
                "prompt_accepted",
                room_id=prompt.room_id,
                event_id=prompt.event_id,
                sender=prompt.sender,
                hops=prompt.hops,
                synced_at=round(synced_at or time.time(), 6),
            )
            worker = self.workers[prompt.room_id]
            await worker.batcher.put(Accepted(prompt.event_id, worker.waits(prompt)))
            worker.inbox.put_nowait(prompt)

    async def _refuse(self, worker: RoomWorker, prompt: Prompt, reason: str, why: str, **details: Any) -> None:
        if await self.store.add_prompt(prompt, "refused"):
            log.warning(why, room_id=prompt.room_id, event_id=prompt.event_id, **details)
            await worker.refuse(prompt, reason)

    async def _take_upload(self, room_id: str, room: RoomSettings, event: Incoming, upload: intake.Upload) -> None:
        """An allowed user's file: recorded now (handled once), downloaded and saved in the room's own task."""
        if await self.store.add_prompt(Prompt(room_id, event.event_id, event.sender, "", 0), "done"):
            self.desks[room_id].add(event.event_id, lambda: self._save_upload(room_id, room, event, upload))

    async def _save_upload(self, room_id: str, room: RoomSettings, event: Incoming, upload: intake.Upload) -> None:
        """Save the file into the room's working directory; the room's next prompt is told."""
        worker = self.workers[room_id]
        marker = {"upload": event.event_id}
        try:
            check_size(upload.size, room.max_upload_bytes)
            data = await self._download(upload)
            check_size(len(data), room.max_upload_bytes)
            worker.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = save_upload(worker.workdir, event.body, data)
        except (FileRefused, OSError) as exc:
            log.warning("upload_refused", room_id=room_id, event_id=event.event_id, reason=str(exc))
            refused = f"⛔ File not saved: {exc}."
            await worker.batcher.put(Notice(event.event_id, refused, marker, thread=event.thread or None))
            return
        log.info("upload_saved", room_id=room_id, event_id=event.event_id, path=path, bytes=len(data))
        image = upload.image and image_type(path, len(data)) is not None
        await self.store.add_upload(room_id, {"path": path, "bytes": len(data), "image": image})
        told = "shows it to the agent" if image else "tells the agent where it is"
        notice = f"📎 Saved as `{path}` ({len(data):,} bytes); the next prompt {told}."
        await worker.batcher.put(Notice(event.event_id, notice, marker, thread=event.thread or None))

    async def _download(self, upload: intake.Upload) -> bytes:
        if not upload.url.startswith("mxc://"):
            raise FileRefused("its address is not an mxc:// URL")
        try:
            response = await self.client.download(mxc=upload.url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FileRefused(f"the homeserver did not hand it over ({type(exc).__name__})") from exc
        if not isinstance(response, MemoryDownloadResponse):
            raise FileRefused(f"the homeserver did not hand it over ({getattr(response, 'message', response)})")
        if upload.key is None or upload.sha256 is None or upload.iv is None:
            return response.body
        try:
            return decrypt_attachment(response.body, upload.key, upload.sha256, upload.iv)
        except (KeyError, ValueError, EncryptionError) as exc:
            raise FileRefused(f"it could not be decrypted ({exc})") from exc


@dataclass(frozen=True)
class _RoomTasks:
    desk: asyncio.Task[None]
    run: asyncio.Task[None]
    send: asyncio.Task[None]


@dataclass(frozen=True)
class _Skipped:
    """A sync batch nio could not take in, moved past."""

    next_batch: str
