"""The integration-test harness itself: a real Synapse, the scripted model server and the real Claude Code CLI."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

import aiohttp
import pytest

from tests.harness.claude_cli import StreamJsonClaude, descendants, is_result, run_one_shot
from tests.harness.matrix_user import MatrixUser, body, messages
from tests.harness.model_server import ModelServer, parse_messages
from tests.harness.synapse import Synapse

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def unique(name: str) -> str:
    """A user name no other test (sharing the same Synapse) registers."""
    return f"{name}{secrets.token_hex(3)}"


@pytest.fixture
def claude_dirs(tmp_path: Path) -> tuple[str, str]:
    """(HOME, working directory) for one CLI run."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return str(home), str(work)


async def test_two_users_exchange_a_message(synapse: Synapse) -> None:
    alice, bob = unique("alice"), unique("bob")
    alice_id = await synapse.register(alice, "alice-pw")
    bob_id = await synapse.register(bob, "bob-pw", admin=True)
    assert (alice_id, bob_id) == (f"@{alice}:localhost", synapse.mxid(bob))
    async with MatrixUser() as alice, MatrixUser() as bob:
        await alice.login(synapse.base_url, alice_id, "alice-pw")
        await bob.login(synapse.base_url, bob_id, "bob-pw")
        room = await alice.create_room(invite=[bob_id], name="harness")
        await bob.wait_for(lambda _: room in bob.invites, timeout=10)
        await bob.join(room)
        sent = await alice.send_text(room, "hello bob")
        events = await bob.wait_for(
            lambda evs: any(body(e) == "hello bob" for e in evs), timeout=10, room_id=room
        )
        [message] = messages(events, sender=alice_id)
        assert message["event_id"] == sent
        assert message["room_id"] == room

        reply = await bob.send_text(room, "hello alice")
        after = await alice.wait_for(lambda evs: len(messages(evs)) >= 1, timeout=10, room_id=room, after=sent)
        assert [(e["event_id"], body(e)) for e in messages(after)] == [(reply, "hello alice")]
        assert alice.messages_since(room, sent) == messages(after)


async def test_wait_for_fails_with_what_it_saw(synapse: Synapse) -> None:
    mxid = await synapse.register(unique("dave"), "dave-pw")
    async with MatrixUser() as dave:
        await dave.login(synapse.base_url, mxid, "dave-pw")
        room = await dave.create_room(name="lonely")
        await dave.send_text(room, "anyone?")
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"(?s)within 0.5 s.*anyone\?"):
            await dave.wait_for(lambda evs: False, timeout=0.5, room_id=room)
        assert time.monotonic() - started < 5


async def test_synapse_restart_keeps_data(synapse: Synapse) -> None:
    mxid = await synapse.register(unique("carol"), "carol-pw")
    base_url = synapse.base_url
    await synapse.stop()
    assert not synapse.running
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as session:
            await session.get(base_url + "/_matrix/client/versions")
    await synapse.start()
    assert synapse.base_url == base_url
    async with MatrixUser() as carol:
        await carol.login(synapse.base_url, mxid, "carol-pw")
        assert carol.user_id == mxid


async def _burst(synapse: Synapse, username: str, count: int) -> list[int]:
    """Send up to `count` messages as fast as possible with raw HTTP, stopping at the first 429 (Synapse holds
    each 429 answer back for 0.5 s); returns the status codes."""
    mxid = await synapse.register(unique(username), "pw")
    async with MatrixUser() as user:
        await user.login(synapse.base_url, mxid, "pw")
        room = await user.create_room(name="burst")
        assert user.client is not None
        headers = {"Authorization": f"Bearer {user.client.access_token}"}
        statuses = []
        async with aiohttp.ClientSession(headers=headers) as session:
            for n in range(count):
                url = f"{synapse.base_url}/_matrix/client/v3/rooms/{room}/send/m.room.message/burst{n}"
                async with session.put(url, json={"msgtype": "m.text", "body": f"m{n}"}) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        body = await resp.json()
                        assert body["errcode"] == "M_LIMIT_EXCEEDED", body
                        break
        return statuses


async def test_rc_message_raised_unless_default_asked(synapse: Synapse) -> None:
    assert set(await _burst(synapse, "burster", 15)) == {200}
    async with Synapse(default_rc_message=True) as strict:
        statuses = await _burst(strict, "limited", 15)
    # the default burst is 10 actions per account; creating the room was one of them
    assert statuses[:5] == [200] * 5 and statuses[-1] == 429, statuses


async def test_cli_one_shot_says_hello(model: ModelServer, claude_dirs: tuple[str, str]) -> None:
    home, work = claude_dirs
    await model.clear()
    run = await run_one_shot("say hello", base_url=model.base_url, home=home, cwd=work)
    result = run.result
    assert result["result"] == "hello", run.events
    assert result["is_error"] is False
    assert run.returncode == 0, run.stderr
    assert [e["type"] for e in run.events][0] == "system"

    requests = await model.requests()
    turns = [r for r in requests if r["has_tools"]]
    assert [r["latest_user_text"] for r in turns] == ["say hello"], requests
    assert turns[0]["path"] == "/v1/messages"


async def test_cli_bidirectional_protocol(model: ModelServer, claude_dirs: tuple[str, str]) -> None:
    """The CLI behaviour the runner is built on (see "Observed CLI behaviour" in model_server.py)."""
    home, work = claude_dirs
    await model.clear()
    claude = await StreamJsonClaude.start(
        base_url=model.base_url, home=home, cwd=work, args=["--include-partial-messages"]
    )
    try:
        await claude.initialize()

        await claude.send_user("say hello")
        assert (await claude.read_until(is_result, 30))[-1]["result"] == "hello"
        await claude.send_user("recall")
        assert (await claude.read_until(is_result, 30))[-1]["result"] == "I remember: say hello"

        # text arrives live: one stream_event delta per word, 0.2 s apart
        await claude.send_user("slow 4")
        await claude.read_until(_is_text_delta, 30)
        first_delta = time.monotonic()
        events = await claude.read_until(is_result, 30)
        assert time.monotonic() - first_delta > 0.4
        assert [_delta_text(e) for e in events if _is_text_delta(e)] == [" w2", " w3", " w4"]
        assert events[-1]["result"] == "w1 w2 w3 w4"

        # harmless Bash runs without a permission request
        await claude.send_user("bash echo hi")
        events = await claude.read_until(is_result, 30)
        assert not [e for e in events if e["type"] == "control_request"], events
        assert events[-1]["result"] == "tool said: hi"

        # Write asks (can_use_tool); allow it
        target = Path(work) / "made.txt"
        await claude.send_user(f"write {target} written by the test")
        request = (await claude.read_until(lambda e: e["type"] == "control_request", 30))[-1]
        assert request["request"]["subtype"] == "can_use_tool"
        assert request["request"]["tool_name"] == "Write"
        await claude.answer_permission(request, allow=True)
        events = await claude.read_until(is_result, 30)
        assert events[-1]["result"].startswith("tool said: File created successfully")
        assert target.read_text() == "written by the test"

        # interrupt while the model hangs: an error result arrives promptly and the process lives on
        await claude.send_user("hang")
        await _wait_for_request(model, "hang")
        sent = time.monotonic()
        await claude.interrupt()
        events = await claude.read_until(is_result, 10)
        elapsed = time.monotonic() - sent
        result = events[-1]
        assert result["subtype"] == "error_during_execution" and result["is_error"] is True, result
        assert elapsed < 3, elapsed
        assert (await model.requests())[-1]["disconnected"] is True
        # an interrupt while idle is acknowledged and produces no result line (2.1.332 adds
        # `response: {"still_queued": []}` to the acknowledgement)
        request_id = await claude.interrupt()
        events = await claude.read_until(lambda e: e["type"] == "control_response", 10)
        acknowledged = events[-1]["response"]
        assert (acknowledged["subtype"], acknowledged["request_id"]) == ("success", request_id), acknowledged
        assert not [e for e in events if is_result(e)], events

        await claude.send_user("say still here")
        assert (await claude.read_until(is_result, 30))[-1]["result"] == "still here"
    finally:
        await claude.close()


def _is_text_delta(event: dict) -> bool:
    return event.get("type") == "stream_event" and event["event"].get("delta", {}).get("type") == "text_delta"


def _delta_text(event: dict) -> str:
    return event["event"]["delta"]["text"]


async def _wait_for_request(model: ModelServer, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if any(r["latest_user_text"] == text for r in await model.requests()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the model never received {text!r}: {await model.requests()}")
        await asyncio.sleep(0.05)  # poll interval of the condition above


async def test_cli_kill_ends_running_tools(model: ModelServer, claude_dirs: tuple[str, str]) -> None:
    """The Bash tool runs in its own session, outside the CLI's process group: kill() must still end it."""
    home, work = claude_dirs
    claude = await StreamJsonClaude.start(base_url=model.base_url, home=home, cwd=work)
    try:
        await claude.initialize()
        await claude.send_user("bash echo started; sleep 31")
        await claude.read_until(lambda e: e["type"] == "assistant", 30)
        deadline = time.monotonic() + 10
        while not (tools := _sleepers(claude.proc.pid)):
            assert time.monotonic() < deadline, "the Bash tool never started `sleep 31`"
            await asyncio.sleep(0.05)  # poll interval of the condition above
        assert os.getsid(tools[0]) != os.getsid(claude.proc.pid)
    finally:
        await claude.kill()
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while alive := [pid for pid in tools if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]:
        assert time.monotonic() < deadline, f"tool processes {alive} survived kill()"
        await asyncio.sleep(0.05)  # poll interval of the condition above


def _sleepers(pid: int) -> list[int]:
    found = []
    for child in descendants(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"31"]:
                found.append(child)
        except OSError:
            pass
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"


async def test_model_server_without_cli(model: ModelServer) -> None:
    """Non-streaming answers, errors and count_tokens, straight over HTTP."""
    url = model.base_url
    payload = {"model": "m", "max_tokens": 10, "tools": [{"name": "Bash"}]}
    async with aiohttp.ClientSession() as session:
        async with session.head(url + "/") as resp:
            assert resp.status == 200
        async with session.post(url + "/v1/messages/count_tokens", json={"messages": []}) as resp:
            assert await resp.json() == {"input_tokens": 10}
        messages_ = [{"role": "user", "content": "fail400"}]
        async with session.post(url + "/v1/messages", json={**payload, "messages": messages_}) as resp:
            assert resp.status == 400
            assert (await resp.json())["type"] == "error"
        messages_ = [{"role": "user", "content": [{"type": "text", "text": "big 3"}]}]
        async with session.post(url + "/v1/messages", json={**payload, "messages": messages_}) as resp:
            answer = await resp.json()
        text = answer["content"][0]["text"]
        assert text.splitlines()[2].startswith("line 000003 ") and len(text) == 300
        messages_ = [{"role": "user", "content": "bash ls"}]
        async with session.post(url + "/v1/messages", json={**payload, "messages": messages_}) as resp:
            answer = await resp.json()
        assert answer["stop_reason"] == "tool_use"
        assert answer["content"][0]["input"] == {"command": "ls", "description": "run it"}


def test_latest_user_text_after_an_interrupt() -> None:
    """After an interrupt the CLI merges the interrupted prompt, a marker and the next prompt into one message."""
    reminder = "<system-reminder>\ncontext\n</system-reminder>\n\n"
    merged = [
        {"type": "text", "text": reminder},
        {"type": "text", "text": "hang\n"},
        {"type": "text", "text": "[Request interrupted by user]\n"},
        {"type": "text", "text": "recall"},
    ]
    parsed = parse_messages([{"role": "user", "content": merged}])
    assert parsed.latest_user_text == "recall"
    assert parsed.earlier_user_texts == ["hang"]
    assert not parsed.continuation
