"""The control socket without a homeserver: made privately, another user refused, garbage answered with an error
line (Hypothesis writes it), a client that stops reading dropped and told, the stream of what the rooms'
batchers are handed, and the operator's actions through the paths people's actions take."""

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nio import MatrixRoom, UnknownToDeviceEvent
from nio.crypto import OlmDevice

from aiagentchat import control, doctor, logs
from aiagentchat.approvals import Pending
from aiagentchat.batcher import Begin, Block, EndOfRun, Notice, Text
from aiagentchat.bot import Bot
from aiagentchat.control import CLIENT_BUFFER_BYTES, OPERATOR, socket_path
from aiagentchat.errors import ConfigError
from aiagentchat.settings import RoomSettings
from aiagentchat.store import Prompt
from tests.test_dispatch import ROOMS, a_bot
from tests.test_hostile_events import ALICE

pytestmark = pytest.mark.anyio
ROOM = ROOMS[0]
NOBODY = 65534
NOW = 1_764_500_000.0


class Line:
    """A client of the socket: JSON lines both ways."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, message: dict[str, Any] | bytes) -> None:
        self.writer.write(message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def read(self, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            line = await self.reader.readline()
        assert line, "the daemon closed the connection"
        return json.loads(line)

    async def until(self, wanted, timeout: float = 5) -> dict[str, Any]:
        """The first message `wanted` accepts, skipping the others, within `timeout`."""
        async with asyncio.timeout(timeout):
            while not wanted(message := await self.read(timeout)):
                pass
        return message

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        return await self.until(lambda m: m["type"] in ("reply", "error") and m.get("id") == message.get("id"))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Bot, Path]]:
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    async with a_bot(directory) as (bot, _store), bot.control.serving(socket_path(directory)):
        yield bot, socket_path(directory)


@contextlib.asynccontextmanager
async def connected(path: Path) -> AsyncIterator[Line]:
    line = Line(*await asyncio.open_unix_connection(str(path)))
    try:
        yield line
    finally:
        await line.close()


def prompt(event_id: str, text: str = "do it") -> Prompt:
    return Prompt(ROOM, event_id, ALICE, text, 0)


async def test_the_socket_is_0600_in_a_private_dir_and_a_dir_open_to_others_or_a_planted_file_stops_the_start(
    tmp_path,
):
    async with served(tmp_path) as (_bot, path):
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert not path.exists()  # taken away when the daemon stops

    path.parent.chmod(0o755)
    with pytest.raises(ConfigError, match="must be 0700"):
        async with served_in(path.parent):
            pass
    path.parent.chmod(0o700)
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        async with served_in(path.parent):
            pass
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)  # bound, never listening: what a killed daemon leaves
    stale.bind(str(path))
    stale.close()
    async with served_in(path.parent) as bot, connected(path) as client:
        assert (await client.ask({"op": "snapshot", "id": 1}))["user_id"] == bot.client.user_id


@contextlib.asynccontextmanager
async def served_in(directory: Path) -> AsyncIterator[Bot]:
    async with a_bot(directory) as (bot, _store), bot.control.serving(socket_path(directory)):
        yield bot


def connect_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    """Connect from a child that has become uid/gid 65534; it prints what it read, or the error."""
    code = (
        "import os, socket, sys\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except OSError as e:\n"
        "    print('connect failed:', e.strerror); sys.exit(0)\n"
        "s.settimeout(5)\n"
        "print(s.makefile().read())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True, timeout=20
    )


@pytest.mark.skipif(os.getuid() != 0, reason="becoming another user needs root")
async def test_another_user_is_refused_by_the_files_and_again_by_the_peer_check():
    base = Path(tempfile.mkdtemp(prefix="control-"))  # not under pytest's 0700 tree: only our modes count here
    try:
        base.chmod(0o711)
        await refused_twice(base)
    finally:
        shutil.rmtree(base)


async def refused_twice(base: Path) -> None:
    async with served(base) as (_bot, path):
        walled = await asyncio.to_thread(connect_as_nobody, path)
        assert walled.stdout.strip() == "connect failed: Permission denied", walled
        # open the files to everyone: the peer's uid (SO_PEERCRED) still keeps it out
        path.parent.chmod(0o711)
        path.chmod(0o666)
        with structlog.testing.capture_logs() as logged:
            refused = await asyncio.to_thread(connect_as_nobody, path)
        (line,) = refused.stdout.strip().splitlines()
        assert json.loads(line) == {"type": "error", "error": "refused: only the daemon's own user may connect"}
        assert [e["peer"].split(", ")[1] for e in logged if e["event"] == "control_refused"] == [f"uid {NOBODY}"]
        async with connected(path) as own:  # the daemon's own user still gets in
            assert (await own.ask({"op": "snapshot", "id": "s"}))["ok"] is True


GARBAGE = [
    (b"not json\n", "not a JSON line"),
    (b"[1, 2]\n", "a request is a JSON object"),
    (b'{"op": "launch"}\n', "`op` is one of answer, drop, new, snapshot, stop, subscribe"),
    (b'{"op": 7}\n', "`op` is one of"),
    (b'{"op": "snapshot", "id": [1]}\n', "`id` is a string or an integer"),
    (b'{"op": "stop"}\n', "`room` is a room id"),
    (b'{"op": "stop", "room": "!elsewhere:x"}\n', "no room '!elsewhere:x' is served"),
    (b'{"op": "stop", "room": "' + ROOM.encode() + b'"}\n', "nothing is running in that room"),
    (b'{"op": "drop", "room": "' + ROOM.encode() + b'", "prompt": 3}\n', "`prompt` is a queued prompt"),
    (b'{"op": "answer", "room": "' + ROOM.encode() + b'", "approval": "k", "verdict": "yes"}\n', "`verdict` is"),
    (
        b'{"op": "answer", "room": "' + ROOM.encode() + b'", "approval": "k", "verdict": "allow"}\n',
        "that request is no",
    ),
    (b'{"op": "subscribe", "logs": "yes"}\n', "`logs` is true or false"),
    (b"\xff\xfe\x00\n", "not a JSON line"),
    (b"[" * 60_000 + b"\n", "not a JSON line"),
]


async def test_each_garbage_line_gets_an_error_line_and_the_connection_goes_on(tmp_path):
    async with served(tmp_path) as (_bot, path), connected(path) as client:
        for line, error in GARBAGE:
            await client.send(line)
            answer = await client.read()
            assert answer["type"] == "error" and answer["error"].startswith(error), (line, answer)
        assert (await client.ask({"op": "snapshot", "id": 2}))["rooms"][0]["id"] == ROOM


async def test_a_line_over_the_limit_ends_that_connection_with_an_error_and_no_other(tmp_path):
    async with served(tmp_path) as (_bot, path), connected(path) as other, connected(path) as client:
        await client.send(b"x" * (200 * 1024) + b"\n")
        assert (await client.read())["error"] == "a line over 65536 bytes"
        assert await client.reader.read() == b""
        assert (await other.ask({"op": "snapshot", "id": 3}))["ok"] is True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=300).filter(lambda b: b"\n" not in b and b.strip()), min_size=1, max_size=5))
def test_whatever_a_client_writes_it_gets_one_answer_a_line_and_the_daemon_goes_on(tmp_path_factory, lines):
    async def check() -> None:
        async with served(tmp_path_factory.mktemp("h")) as (_bot, path), connected(path) as client:
            for line in lines:
                await client.send(line + b"\n")
                answer = await client.read()
                assert answer["type"] in ("error", "reply"), answer
            assert (await client.ask({"op": "snapshot", "id": "after"}))["ok"] is True

    asyncio.run(check())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("id", "room", "prompt", "approval", "verdict", "text", "logs")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(
        st.fixed_dictionaries(
            {"op": st.sampled_from(["snapshot", "subscribe", "stop", "drop", "answer", "new", "launch"])},
            optional={name: JSON | st.sampled_from([ROOM, "allow", "deny", "always", "$queued"]) for name in FIELDS},
        ),
        min_size=1,
        max_size=4,
    )
)
def test_requests_with_any_fields_of_any_type_get_a_reply_or_an_error_and_nothing_breaks(tmp_path_factory, requests):
    async def check() -> None:
        async with served(tmp_path_factory.mktemp("j")) as (_bot, path), connected(path) as client:
            for request in requests:
                await client.send(request)
                answer = await client.until(lambda m: m["type"] in ("error", "reply"))
                assert answer["type"] == "reply" or isinstance(answer["error"], str), answer
                assert answer.get("error") != "internal error; see the log", (request, answer)
            assert (await client.ask({"op": "snapshot", "id": "after"}))["ok"] is True

    asyncio.run(check())


async def test_a_client_that_stops_reading_is_dropped_and_told_while_the_others_keep_up(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "CLOSE_GRACE_S", 0.2)
    loop, failures = asyncio.get_running_loop(), []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: failures.append(context))
    try:
        async with served(tmp_path) as (bot, path), connected(path) as slow, connected(path) as reader:
            for client in (slow, reader):
                await client.ask({"op": "subscribe", "id": "sub"})
            batcher = bot.workers[ROOM].batcher
            await batcher.put(Begin("$p", {}))
            chunk = "y" * 4000
            sent = 0
            with structlog.testing.capture_logs() as logged:
                while sent < 3 * CLIENT_BUFFER_BYTES:  # the slow one never reads: the socket buffers fill, then ours
                    bot.control.observe(ROOM, Text("$p", chunk))
                    sent += len(chunk)
                    message = await reader.until(lambda m: m["type"] == "output")
                    assert message == {"type": "output", "room": ROOM, "prompt": "$p", "kind": "text", "text": chunk}
                await asyncio.sleep(0)
            assert [e["event"] for e in logged if e["event"] == "control_client_dropped"] == ["control_client_dropped"]
            last = None
            async with asyncio.timeout(10):
                while line := await slow.reader.readline():
                    last = json.loads(line)
            assert last is not None and last["type"] == "dropped" and "stopped reading" in last["reason"]
            assert (await reader.ask({"op": "snapshot", "id": "still"}))["ok"] is True
            past_the_grace = asyncio.Event()
            loop.call_later(0.3, past_the_grace.set)  # after the daemon's own timer to cut the dropped connection
            await past_the_grace.wait()
    finally:
        loop.set_exception_handler(handler)
    assert failures == []  # the cut of a connection that had closed by itself failed in the event loop


async def test_the_stream_shows_a_run_its_tool_lines_and_its_end_and_a_snapshot_the_running_prompt(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        subscribed = await client.ask({"op": "subscribe", "id": 1})
        assert [room["state"] for room in subscribed["rooms"]] == ["idle"] * len(ROOMS)
        worker = bot.workers[ROOM]
        worker.current, worker.current_since = prompt("$run", "list the files"), 1000.0
        worker.inbox.put_nowait(prompt("$next", "then this"))
        await worker.batcher.put(Begin("$run", {}))
        await worker.batcher.put(Block("$run", "💻 `ls -la`", "tool"))
        await worker.batcher.put(Text("$run", "Here are\nthe files"))
        room = await client.until(lambda m: m["type"] == "room" and m["room"]["running"]["tools"])
        assert room["room"]["state"] == "running"
        assert room["room"]["running"] | {"activity": None} == {
            "prompt": "$run",
            "sender": ALICE,
            "text": "list the files",
            "since": 1000.0,
            "runs": 1,
            "tools": ["💻 `ls -la`"],
            "activity": None,
        }
        assert room["room"]["queue"] == [{"prompt": "$next", "sender": ALICE, "text": "then this"}]
        snapshot = await client.ask({"op": "snapshot", "id": 2})
        (shown,) = [r for r in snapshot["rooms"] if r["id"] == ROOM]
        assert shown["running"]["activity"] == "the files" and shown["running"]["tools"] == ["💻 `ls -la`"]
        worker.current = None
        await worker.batcher.put(EndOfRun("$run", {"ok": True}, "done"))
        end = await client.until(lambda m: m["type"] == "end")
        assert end == {"type": "end", "room": ROOM, "prompt": "$run", "state": "done", "final": {"ok": True}}
        idle = await client.until(lambda m: m["type"] == "room" and m["room"]["running"] is None)
        assert idle["room"]["state"] == "idle"


async def test_the_log_reaches_subscribers_who_ask_for_it_redacted(tmp_path):
    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        async with served(tmp_path) as (_bot, path), connected(path) as quiet, connected(path) as client:
            await quiet.ask({"op": "subscribe", "id": 1})
            await client.ask({"op": "subscribe", "id": 1, "logs": True})
            structlog.get_logger("aiagentchat.test").info("probe_event", room_id=ROOM, access_token="syt_secret")
            record = (await client.until(lambda m: m["type"] == "log" and m["record"]["event"] == "probe_event"))[
                "record"
            ]
            assert record["room_id"] == ROOM and record["access_token"] == "[redacted]"
            assert "syt_secret" not in stream.getvalue() and "probe_event" in stream.getvalue()
            snapshot = await quiet.ask({"op": "snapshot", "id": 9})  # the other one was sent no log line
            assert snapshot["ok"] is True
    finally:
        logging.getLogger().handlers[:] = []


async def test_the_operators_actions_go_the_way_peoples_do_and_name_the_operator(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        worker, policy = bot.workers[ROOM], bot.policies[ROOM]
        worker.current = prompt("$run")
        stopped = await client.ask({"op": "stop", "room": ROOM, "id": "stop"})
        assert stopped["outcome"] == "stopping" and worker._stopped_by == OPERATOR

        queued = prompt("$queued")
        await bot.store.add_prompt(queued)
        worker.inbox.put_nowait(queued)
        assert (await client.ask({"op": "drop", "room": ROOM, "prompt": "$queued", "id": "d"}))["ok"] is True
        assert worker.waiting_prompts() == [] and worker._dropped == {"$queued": OPERATOR}
        again = await client.ask({"op": "drop", "room": ROOM, "prompt": "$queued", "id": "d2"})
        assert again["error"] == "that prompt is not queued"

        pending = policy.pending = Pending("$run", "Bash", {"command": "make test"}, False)
        wrong = await client.ask({"op": "answer", "room": ROOM, "approval": "other", "verdict": "allow", "id": "a0"})
        assert wrong["error"] == "that request is no longer waiting"
        answer = {"op": "answer", "room": ROOM, "approval": pending.key, "verdict": "deny", "text": "not now"}
        assert (await client.ask(answer | {"id": "a"}))["outcome"] == "deny"
        assert pending.answer.result().verdict == "deny" and pending.answer.result().by == OPERATOR
        assert pending.answer.result().text == "not now"
        assert (await client.ask(answer | {"id": "a2"}))["error"] == "that request is answered already"

        question = policy.pending = Pending("$run", "AskUserQuestion", {"questions": []}, True)
        unanswered = {"op": "answer", "room": ROOM, "approval": question.key, "verdict": "allow", "id": "q"}
        assert (await client.ask(unanswered))["error"].startswith("the agent asked a question")
        policy.pending = None

        assert (await client.ask({"op": "new", "room": ROOM, "id": "n"}))["ok"] is True
        assert worker.fresh is True
        notices = []
        while not worker.batcher._queue.empty():
            if isinstance(item := worker.batcher._queue.get_nowait(), Notice):
                notices.append(item.markdown)
        assert notices == [
            "The operator: 🆕 The next prompt starts a new conversation (the running prompt finishes in the current one)."
        ]


async def test_doctor_asks_the_socket_whether_the_daemon_runs_and_what_its_rooms_do(tmp_path):
    async with served(tmp_path) as (bot, path):
        bot.workers[ROOM].current, bot.workers[ROOM].current_since = prompt("$run"), NOW
        running = await doctor._daemon(bot.settings)
        assert running.line() == f"✅ daemon: running, starting, serving {len(ROOMS)} room(s): {ROOM} running"
    assert (await doctor._daemon(bot.settings)).line() == "✅ daemon: not running"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    left = await doctor._daemon(bot.settings)
    assert left.line() == f"✅ daemon: not running ({path} is left from a daemon that did not stop cleanly)"


VERIFY_GARBAGE = [
    ({"op": "verify", "user": 5}, "`user` is a Matrix user id"),
    ({"op": "verify", "user": "alice"}, "`user` is a Matrix user id"),
    ({"op": "verify", "user": ALICE, "device": "two words"}, "`device` is a device id"),
    ({"op": "verify", "device": "PHONE"}, "`device` needs `user`"),
    ({"op": "verify", "timeout": "soon"}, "`timeout` is a number of seconds"),
    ({"op": "verify", "timeout": 0}, "`timeout` is a number of seconds"),
    ({"op": "verify", "timeout": True}, "`timeout` is a number of seconds"),
    ({"op": "verify_confirm", "match": "yes"}, "`match` is true"),
    ({"op": "verify_confirm", "match": True}, "no verification is waiting for an answer"),
    ({"op": "verify_cancel"}, "no verification is under way"),
]


def verification(check) -> Any:
    """Accepts a stream line about the verification that satisfies `check`."""
    return lambda message: message["type"] == "verification" and check(message["verification"])


async def test_verify_ops_refuse_bad_fields_and_run_one_at_a_time_until_cancelled(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        for number, (request, error) in enumerate(VERIFY_GARBAGE):
            answer = await client.ask(request | {"id": number})
            assert answer["type"] == "error" and answer["error"].startswith(error), (request, answer)
        assert bot.crypto.verification is None

        await client.ask({"op": "subscribe", "id": "s"})
        started = await client.ask({"op": "verify", "id": "v"})
        assert started["outcome"] == "started" and started["verification"]["phase"] == "waiting"
        await client.until(verification(lambda v: any("Waiting for an allowed user" in line for line in v["lines"])))
        assert bot.crypto.verification is not None
        second = await client.ask({"op": "verify", "user": ALICE, "device": "PHONE", "id": "v2"})
        assert second["type"] == "error" and "under way already" in second["error"]
        assert (await client.ask({"op": "snapshot", "id": "snap"}))["verification"]["phase"] == "waiting"
        no_emoji = await client.ask({"op": "verify_confirm", "match": True, "id": "c"})
        assert no_emoji["type"] == "error" and "no verification is waiting" in no_emoji["error"]

        assert (await client.ask({"op": "verify_cancel", "id": "x"}))["outcome"] == "cancelled"  # once it ended
        ended = (await client.ask({"op": "snapshot", "id": "after"}))["verification"]
        assert ended["phase"] == "failed" and ended["lines"][-1] == "❌ Not verified: cancelled by the operator"
        assert bot.crypto.verification is None and len(bot.client.to_device_callbacks) == 0
        assert (await client.ask({"op": "verify", "timeout": 30, "id": "again"}))["outcome"] == "started"


async def test_a_verification_nobody_starts_ends_at_its_timeout(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        await client.ask({"op": "subscribe", "id": 1})
        await client.ask({"op": "verify", "timeout": 1, "id": 2})
        ended = await client.until(verification(lambda v: v["phase"] == "failed"), timeout=10)
        assert ended["verification"]["lines"][-1] == "❌ Not verified: no verification before the time limit"
        assert bot.crypto.verification is None
        assert (await client.ask({"op": "snapshot", "id": 3}))["verification"]["phase"] == "failed"


def verification_request(sender: str, content: dict[str, Any]) -> UnknownToDeviceEvent:
    """A verification request as nio hands it to the to-device callbacks."""
    source = {"type": "m.key.verification.request", "sender": sender, "content": content}
    return UnknownToDeviceEvent(source, sender, "m.key.verification.request")


async def test_while_the_console_waits_for_a_verification_the_daemon_declines_only_the_others(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        request = {"from_device": "PHONE", "methods": ["m.sas.v1"], "transaction_id": "t1"}
        outgoing = bot.client.olm.outgoing_to_device_messages
        await bot.crypto._decline_verification(verification_request(ALICE, request))
        assert [m.content["transaction_id"] for m in outgoing] == ["t1"]  # no verification under way: declined

        await client.ask({"op": "verify", "id": 1})
        await bot.crypto._decline_verification(verification_request(ALICE, request | {"transaction_id": "t2"}))
        await bot.crypto._decline_verification(verification_request("@mallory:x", request | {"transaction_id": "t3"}))
        assert [m.content["transaction_id"] for m in outgoing] == ["t1", "t3"]
        assert "aiagentchat console" in outgoing[-1].content["reason"]
        await client.ask({"op": "verify_cancel", "id": 2})


async def test_a_hostile_or_failing_verification_request_ends_the_verification_and_never_reaches_nio(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        await client.ask({"op": "verify", "id": 1})
        session = bot.control._verification.session
        for content in ({"from_device": "PHONE", "methods": 5}, {"from_device": "PHONE", "methods": {"m.sas.v1": 1}}):
            await session._on_event(verification_request(ALICE, content))  # ignored: not a list of methods
        assert not session.cancelled

        async def unreachable() -> None:
            raise aiohttp.ClientConnectionError("homeserver down")

        bot.client.keys_query = unreachable  # type: ignore[method-assign]
        request = {"from_device": "PHONE", "methods": ["m.sas.v1"], "transaction_id": "t1"}
        await session._on_event(verification_request(ALICE, request))
        assert session.cancelled == "it failed here: ClientConnectionError: homeserver down"
        await client.ask({"op": "verify_cancel", "id": 2})


async def test_a_rooms_trust_names_the_allowed_users_its_trust_accepts_no_device_of(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        assert (await client.ask({"op": "snapshot", "id": 1}))["rooms"][0]["trust"] is None  # not encrypted
        bot.client.rooms[ROOM] = MatrixRoom(ROOM, bot.client.user_id, encrypted=True)
        bot.rooms[ROOM] = RoomSettings(id=ROOM, allowed_users=[ALICE], trust="verified")
        summary = (await client.ask({"op": "snapshot", "id": 2}))["rooms"][0]
        assert summary["trust"] == {"policy": "verified", "unverified": [ALICE]}  # no device of hers known

        phone = OlmDevice(ALICE, "PHONE", {"ed25519": "e" * 43, "curve25519": "c" * 43})
        bot.client.olm.device_store.add(phone)
        assert (await client.ask({"op": "snapshot", "id": 3}))["rooms"][0]["trust"]["unverified"] == [ALICE]
        bot.client.verify_device(phone)
        assert (await client.ask({"op": "snapshot", "id": 4}))["rooms"][0]["trust"]["unverified"] == []
        bot.rooms[ROOM] = RoomSettings(id=ROOM, allowed_users=[ALICE, "@bob:x"], trust="all")
        assert (await client.ask({"op": "snapshot", "id": 5}))["rooms"][0]["trust"]["unverified"] == ["@bob:x"]


async def test_a_room_being_left_is_no_longer_shown_and_the_others_still_are(tmp_path):
    async with served(tmp_path) as (bot, path), connected(path) as client:
        await client.ask({"op": "subscribe", "id": "sub"})
        del bot.rooms[ROOM]  # `!leave`: forgotten at once, its tasks end once the homeserver has answered
        await bot.workers[ROOM].batcher.put(Notice("", "👋 Leaving this room", {}))
        await bot.workers[ROOMS[1]].batcher.put(Notice("", "still here", {}))
        changed = await client.until(lambda m: m["type"] == "room" and m["room"]["id"] == ROOMS[1])
        assert changed["room"]["state"] == "idle"
        snapshot = await client.ask({"op": "snapshot", "id": "after"})
        assert [room["id"] for room in snapshot["rooms"]] == ROOMS[1:]
        refused = await client.ask({"op": "stop", "room": ROOM, "id": "gone"})
        assert refused == {"type": "error", "id": "gone", "error": f"no room {ROOM!r} is served"}
