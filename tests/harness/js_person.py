"""A test person on matrix-js-sdk with its Rust crypto, configured as today's Element: devices not cross-signed by
their owner get no room keys and their messages fail to decrypt (`OnlySignedDevicesIsolationMode`, MSC4153).

    async with JsPerson() as alice:
        await alice.login(synapse.base_url, mxid, password)
        await alice.bootstrap_cross_signing(password)
        room = await alice.create_room(invite=[bob_mxid])
        await alice.send_text(room, "hello")
        event = await alice.wait_for_event(lambda e: e["sender"] == bob_mxid and e["room_id"] == room)

The person is a Node process (tests/harness/js_person/person.mjs, the SDK pinned in package.json) spoken to with
one JSON line per request and per reply. Every timeline event it sees is kept in `events` once its decryption has
settled (again when the outcome changes): `room_id`, `event_id`, `sender`, `type` (the clear type), `state_key`
(None for a message), `encrypted` (it was on the wire), `content` (clear, or None when it failed to decrypt) and
`decryption_failure` (None, or a js-sdk `DecryptionFailureCode` such as
"UNSIGNED_SENDER_DEVICE"). Its stderr is kept to show when something fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from typing import Any, Self

from tests.harness import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "harness" / "js_person" / "person.mjs"
REQUEST_TIMEOUT_S = 60.0
STDERR_LINES = 80

Event = dict[str, Any]


class JsPersonError(AssertionError):
    """A request the person refused or could not answer in time, or the person's process died."""


class JsPerson:
    def __init__(self, name: str = "js person") -> None:
        self.name = name
        self.user_id = ""
        self.device_id = ""
        self.events: list[Event] = []  # timeline events, in the order their outcomes arrived
        self.stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._process: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._changed = asyncio.Condition()  # notified on every event line, and when the process ends
        self._devices_updates = 0  # how many "devices" lines arrived
        self._readers: list[asyncio.Task[None]] = []
        self._exit = ""  # why the process is gone, once it is

    # --- process ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            "node",
            str(SCRIPT),
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=2**24,
        )
        self._readers = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    async def close(self, timeout: float = 10) -> None:
        """Ask the person to stop; kill it if it has not exited within `timeout`."""
        process = self._process
        if process is None:
            return
        if process.returncode is None and not self._exit:
            with contextlib.suppress(JsPersonError):
                await self._request("close", timeout=timeout)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._process = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stderr_tail(self) -> str:
        return "\n".join(self.stderr)

    async def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for raw in self._process.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                self.stderr.append(f"(not a protocol line on stdout) {raw.decode(errors='replace').rstrip()}")
                continue
            if "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    if message["ok"]:
                        future.set_result(message["result"])
                    else:
                        future.set_exception(JsPersonError(f"{self.name}: {message['error']}"))
                continue
            if message["event"] == "timeline":
                self.events.append({key: value for key, value in message.items() if key != "event"})
            else:
                self._devices_updates += 1
            async with self._changed:
                self._changed.notify_all()
        code = await self._process.wait()
        self._exit = f"{self.name} exited with {code}"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(JsPersonError(f"{self._exit}; stderr:\n{self.stderr_tail()}"))
        self._pending.clear()
        async with self._changed:
            self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        async for raw in self._process.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())

    async def _request(self, op: str, timeout: float = REQUEST_TIMEOUT_S, **args: Any) -> Any:
        if self._process is None or self._process.stdin is None:
            raise JsPersonError(f"{self.name} is not started")
        if self._exit:
            raise JsPersonError(f"{self._exit}; stderr:\n{self.stderr_tail()}")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._process.stdin.write(json.dumps({"id": request_id, "op": op, **args}).encode() + b"\n")
        await self._process.stdin.drain()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise JsPersonError(
                f"{self.name}: {op} got no answer within {timeout} s; stderr:\n{self.stderr_tail()}"
            ) from None
        finally:
            self._pending.pop(request_id, None)

    # --- operations ------------------------------------------------------------------------------------------

    async def login(self, base_url: str, user_id: str, password: str) -> str:
        """Log in, start crypto and syncing; this device's id, once the first sync is done."""
        result = await self._request("login", base_url=base_url, user_id=user_id, password=password)
        self.user_id, self.device_id = user_id, result["device_id"]
        return self.device_id

    async def bootstrap_cross_signing(self, password: str) -> str:
        """Create and upload this user's cross-signing keys, signing this device; the public master key."""
        return (await self._request("bootstrap_cross_signing", password=password))["master_key"]

    async def cross_sign_device(self, device_id: str) -> None:
        """Sign another device of this user (this session holds the private keys after bootstrapping)."""
        await self._request("cross_sign_device", device_id=device_id)

    async def verify_device(self, user_id: str, device_id: str, timeout: float = 120) -> dict[str, Any]:
        """Emoji verification of that device, started and confirmed here; what this side showed: `emoji` (the
        symbols) and `decimals`."""
        return await self._request("verify_device", timeout=timeout, user_id=user_id, device_id=device_id)

    async def accept_verification(self, user_id: str, timeout: float = 120) -> dict[str, Any]:
        """Accept the next emoji verification a device of `user_id` requests and confirm it; what was shown, as
        `verify_device` returns it."""
        return await self._request("accept_verification", timeout=timeout, user_id=user_id)

    async def create_room(self, invite: list[str] | None = None, encrypted: bool = True) -> str:
        return (await self._request("create_room", invite=invite or [], encrypted=encrypted))["room_id"]

    async def join(self, room_id: str) -> None:
        await self._request("join", room_id=room_id)

    async def send_text(self, room_id: str, text: str) -> str:
        """Send an m.text message, encrypted in an encrypted room (keys only to devices signed by their owner)."""
        return (await self._request("send_text", room_id=room_id, text=text))["event_id"]

    async def device_status(self, user_id: str, device_id: str) -> dict[str, bool]:
        """`signed_by_owner`, `cross_signing_verified`, `locally_verified`, `known`, as this device sees it."""
        return await self._request("device_status", user_id=user_id, device_id=device_id)

    async def user_identity(self, user_id: str) -> dict[str, Any]:
        """`master_key` (None when the user has none) and `verified`, as this device sees it."""
        return await self._request("user_identity", user_id=user_id)

    async def room_encrypted(self, room_id: str) -> bool:
        return (await self._request("room_encrypted", room_id=room_id))["encrypted"]

    # --- waiting ---------------------------------------------------------------------------------------------

    async def wait_for_event(self, predicate: Callable[[Event], bool], timeout: float = 60) -> Event:
        """The first timeline event (outcome) that satisfies `predicate`, waiting for it up to `timeout`."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._match(predicate) or self._exit), timeout)
            except TimeoutError:
                pass
        found = self._match(predicate)
        if found is None:
            raise JsPersonError(f"{self.name}: no such event within {timeout} s{self._seen()}")
        return found

    async def wait_for_device(
        self, user_id: str, device_id: str, predicate: Callable[[dict[str, bool]], bool], timeout: float = 60
    ) -> dict[str, bool]:
        """A device's status once `predicate` holds for it: checked now and after each change the SDK reports to
        the devices or identity of any user."""
        deadline = time.monotonic() + timeout
        while True:
            updates = self._devices_updates
            status = await self.device_status(user_id, device_id)
            if predicate(status):
                return status
            remaining = deadline - time.monotonic()
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda seen=updates: self._devices_updates > seen or self._exit),
                        remaining,
                    )
                except TimeoutError:
                    raise JsPersonError(
                        f"{self.name}: {user_id} {device_id} still {status} after {timeout} s{self._seen()}"
                    ) from None
            if self._exit:
                raise JsPersonError(f"{self._exit}; stderr:\n{self.stderr_tail()}")

    def _match(self, predicate: Callable[[Event], bool]) -> Event | None:
        return next((event for event in self.events if predicate(event)), None)

    def _seen(self) -> str:
        shown = "\n".join(json.dumps(event, sort_keys=True)[:300] for event in self.events[-30:])
        exited = f"; {self._exit}" if self._exit else ""
        return f"{exited}; last {min(len(self.events), 30)} events seen:\n{shown}\nstderr:\n{self.stderr_tail()}"
