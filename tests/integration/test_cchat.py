"""cchat as a real subprocess against a real Synapse and a real daemon running the real Claude Code CLI."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from aiagentchat.secret_storage import encode_recovery_key, new_recovery_key, write_secret
from tests.harness import coverage_env
from tests.harness.e2e import E2EUser
from tests.harness.matrix_user import MatrixUser, body, messages
from tests.integration.conftest import bot_events, encrypted_room, run_ended, same_sas

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

JSON_KEYS = {"ok", "result", "cost_usd", "duration_ms", "session_id", "events"}


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


class Cchat:
    """`python -m aiagentchat.cchat` with its own config dir, HOME and working directory (no settings.toml)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("config", "home", "cwd"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root / "home"),
            "LANG": "C.UTF-8",
            "CCHAT_CONFIG_DIR": str(root / "config"),
        } | coverage_env()
        self.user_id = ""

    @property
    def credentials(self) -> Path:
        return self.root / "config" / "credentials.json"

    async def start(self, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiagentchat.cchat", *args,
            env=self.env | (env or {}), cwd=self.root / "cwd",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def __call__(self, *args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 120):
        proc = await self.start(*args, env=env)
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin.encode())
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"cchat {' '.join(args)} still running after {timeout} s") from None
        return Ran(proc.returncode, out.decode(), err.decode())

    async def login(self, homeserver: str, user_id: str, password: str) -> Ran:
        ran = await self("login", "--homeserver", homeserver, "--user", user_id, env={"CCHAT_PASSWORD": password})
        assert ran.code == 0, ran.stderr
        self.user_id = user_id
        return ran


@pytest.fixture
async def cli(world, tmp_path) -> Cchat:
    """cchat logged in as the world's user (a device of its own), told who the bot is (CCHAT_BOT) for the commands
    run without the daemon's settings."""
    cli = Cchat(tmp_path / "cchat")
    cli.env["CCHAT_BOT"] = world.bot_id
    await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    return cli


async def stranger(world) -> tuple[MatrixUser, Cchat]:
    """A second account, logged in both as a test client (to join rooms) and with its own cchat."""
    name, password = f"stranger{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    user_id = await world.synapse.register(name, password)
    user = MatrixUser()
    await user.login(world.synapse.base_url, user_id, password)
    cli = Cchat(world.tmp_path / f"cchat-{name}")
    await cli.login(world.synapse.base_url, user_id, password)
    return user, cli


async def nothing_sent_by(world, room: str, user_id: str) -> bool:
    """True once the world's user saw a later sentinel and no message of `user_id` before it."""
    sentinel = await world.user.send_text(room, "sentinel")
    await world.user.wait_for(lambda evs: any(e.get("event_id") == sentinel for e in evs), room_id=room)
    return messages(world.user.room_events(room), sender=user_id) == []


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and text.endswith("\n")


def marked(prompt_id: str, result: str) -> dict:
    """The marker of a run's final event, as the bot (or a forger) puts it in an event's content."""
    final = {"ok": True, "result": result, "cost_usd": "0.1", "duration_ms": 10, "num_turns": 1, "session_id": "s"}
    return {"org.aiagentchat": {"prompt": prompt_id, "hops": 1, "final": final}}


async def prompt_sent(user, room: str, sender: str, match) -> str:
    """The event id of the first event of `sender` in `room` that `match` accepts, once `user` has seen it."""

    def found(events: list[dict]) -> list[str]:
        return [e["event_id"] for e in events if e.get("sender") == sender and match(e)]

    return found(await user.wait_for(lambda events: found(events) != [], timeout=60, room_id=room))[0]


async def test_login_saves_a_private_login_and_a_second_login_keeps_the_device(world, tmp_path):
    cli = Cchat(tmp_path / "cchat")
    first = await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    saved = json.loads(cli.credentials.read_text())
    assert set(saved) == {"homeserver", "user_id", "device_id", "access_token"}
    assert saved["homeserver"] == world.synapse.base_url and saved["user_id"] == world.user.user_id
    assert stat.S_IMODE(cli.credentials.stat().st_mode) == 0o600
    assert saved["access_token"] not in first.stdout + first.stderr
    assert world.user_password not in first.stdout + first.stderr

    await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    again = json.loads(cli.credentials.read_text())
    assert again["device_id"] == saved["device_id"]

    wrong = await cli("login", "--homeserver", world.synapse.base_url, "--user", world.user.user_id,
                      env={"CCHAT_PASSWORD": "wrong"})  # fmt: skip
    assert wrong.code == 2 and one_line(wrong.stderr) and "refused" in wrong.stderr
    assert json.loads(cli.credentials.read_text()) == again


async def test_send_wait_json_returns_the_answer(world, cli):
    room = await world.room()
    await world.daemon([{"id": room}]).start()
    ran = await cli("send", room, "say hi there", "--wait", "--json", "--timeout", "90")
    assert ran.code == 0, ran.stderr
    assert one_line(ran.stdout)
    answer = json.loads(ran.stdout)
    assert set(answer) == JSON_KEYS
    assert answer["ok"] is True
    assert "hi there" in answer["result"]
    assert isinstance(answer["session_id"], str) and answer["session_id"]
    assert isinstance(answer["duration_ms"], int)
    # the answer (with the footer when the run ended before its status was due), never the status or its edits
    assert len(answer["events"]) == 1 and answer["events"][0].startswith("hi there")
    assert ran.stderr == ""


async def test_send_prints_the_prompt_event_id_and_an_alias_works(world, cli):
    alias_local = f"cchat{secrets.token_hex(3)}"
    room = await world.user.create_room(invite=[world.bot_id], alias=alias_local)
    await world.daemon([{"id": room}]).start()
    ran = await cli("send", f"#{alias_local}:{world.user.user_id.split(':', 1)[1]}", "say by alias")
    assert ran.code == 0, ran.stderr
    prompt_id = ran.stdout.strip()
    assert prompt_id.startswith("$") and one_line(ran.stdout)
    events = await world.user.wait_for(
        lambda evs: bot_events(evs, prompt_id, status=True) != [], timeout=60, room_id=room
    )
    prompt = next(e for e in events if e.get("event_id") == prompt_id)
    assert prompt["sender"] == world.user.user_id and prompt["content"]["body"] == "say by alias"
    assert "org.aiagentchat.hops" not in prompt["content"]


async def test_send_by_name_reads_stdin_and_prints_the_answer(world, cli):
    room = await world.room()
    await world.daemon([{"id": room, "name": "work"}]).start()
    config = str(world.tmp_path / "settings.toml")
    ran = await cli("send", "work", "-", "--wait", "--config", config, "--timeout", "90", stdin="slow 6\n")
    assert ran.code == 0, ran.stderr
    assert ran.stdout.startswith("w1 w2 w3 w4 w5 w6") and ran.stdout.endswith("\n")
    assert ran.stderr == ""  # no progress line when stderr is not a terminal
    events = await world.user.wait_for(lambda evs: messages(evs, sender=world.user.user_id) != [], room_id=room)
    assert [p["content"]["body"] for p in messages(events, sender=world.user.user_id)] == ["slow 6"]


async def test_an_agent_error_exits_1(world, cli):
    room = await world.room()
    await world.daemon([{"id": room}]).start()
    ran = await cli("send", room, "fail400", "--wait", "--json", "--timeout", "90")
    assert ran.code == 1, ran.stderr
    answer = json.loads(ran.stdout)
    assert set(answer) == JSON_KEYS and answer["ok"] is False
    assert one_line(ran.stderr) and ran.stderr.startswith("cchat: the agent reported an error")


async def test_a_hanging_agent_exits_3_at_the_timeout(world, cli):
    room = await world.room()
    await world.daemon([{"id": room}], claude={"timeout_s": 300}).start()
    started = time.monotonic()
    ran = await cli("send", room, "hang", "--wait", "--json", "--timeout", "5", timeout=60)
    took = time.monotonic() - started
    assert ran.code == 3, ran.stderr
    assert 5 <= took < 20
    assert one_line(ran.stderr) and "within 5 s" in ran.stderr
    answer = json.loads(ran.stdout)
    assert answer["ok"] is False and answer["result"] is None


async def test_a_user_the_settings_do_not_allow_exits_4_and_sends_nothing(world, cli):
    other, other_cli = await stranger(world)
    room = await world.user.create_room(invite=[world.bot_id, other.user_id])
    await other.join(room)
    try:
        config = str(world.tmp_path / "settings.toml")
        world.daemon([{"id": room, "name": "work"}])  # writes the daemon's settings; not started
        for target in ("work", room):
            ran = await other_cli("send", target, "say sneaky", "--wait", "--config", config, "--timeout", "30")
            assert ran.code == 4, ran.stderr
            assert ran.stdout == "" and one_line(ran.stderr) and "nothing sent" in ran.stderr
        assert await nothing_sent_by(world, room, other.user_id)
    finally:
        await other.close()


async def test_not_joined_or_refused_by_the_room_exits_4(world, cli):
    other, other_cli = await stranger(world)
    try:
        room = await world.user.create_room(invite=[other.user_id])
        ran = await other_cli("send", room, "say not joined")
        assert ran.code == 4 and one_line(ran.stderr) and "not joined" in ran.stderr

        await other.join(room)
        client = world.user.client
        levels = await client.room_get_state_event(room, "m.room.power_levels")
        muted = await client.room_put_state(room, "m.room.power_levels", levels.content | {"events_default": 50})
        assert muted.event_id
        ran = await other_cli("send", room, "say muted")
        assert ran.code == 4 and one_line(ran.stderr) and "not allowed" in ran.stderr, ran.stderr
        assert await nothing_sent_by(world, room, other.user_id)
    finally:
        await other.close()


async def test_an_agent_calling_cchat_counts_the_hop(world, cli):
    room = await world.room()
    ran = await cli("send", room, "say from an agent", env={"AIAGENTCHAT_HOPS": "1"})
    assert ran.code == 0, ran.stderr
    prompt_id = ran.stdout.strip()
    events = await world.user.wait_for(lambda evs: any(e.get("event_id") == prompt_id for e in evs), room_id=room)
    prompt = next(e for e in events if e.get("event_id") == prompt_id)
    assert prompt["content"]["org.aiagentchat.hops"] == 2


async def test_tail_shows_recent_output_then_follows_as_json_lines_until_ctrl_c(world, cli):
    room = await world.room()
    await world.daemon([{"id": room}]).start()
    earlier = await world.user.send_text(room, "say earlier words")
    await world.user.wait_for(run_ended(earlier), timeout=60, room_id=room)
    proc = await cli.start("tail", room, "--json", "-n", "1")

    async def lines_until_final() -> list[dict]:
        lines = [json.loads(await proc.stdout.readline())]
        while lines[-1]["final"] is None:
            lines.append(json.loads(await proc.stdout.readline()))
        return lines

    try:
        async with asyncio.timeout(60):
            history = await lines_until_final()  # printed after tail took its position: it now follows
            later = await world.user.send_text(room, "say tailed words")
            followed = await lines_until_final()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(10):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
            raise AssertionError(f"cchat tail still ran 10 s after SIGINT; it said: {err.decode()[-3000:]}") from None
    assert proc.returncode == 0 and err == b""
    assert [line["prompt"] for line in history] == [earlier]
    assert history[0]["final"]["ok"] is True and history[0]["body"].startswith("earlier words")
    assert [line["prompt"] for line in followed] == [later] and followed[0]["body"].startswith("tailed words")
    assert set(followed[0]) == {"prompt", "body", "final"}
    assert followed[-1]["final"]["ok"] is True


async def recovery_key_of(world, user: E2EUser) -> str:
    """The world's user's recovery key, their self-signing key kept in their secret storage as Element keeps it."""
    key = new_recovery_key()
    await write_secret(user.client, "m.cross_signing.self_signing", world.user_identity.seeds()["self_signing"], key)
    return encode_recovery_key(key)


async def cross_signed(world, cli: Cchat, user: E2EUser) -> None:
    ran = await cli("verify", "--recovery-key", env={"CCHAT_RECOVERY_KEY": await recovery_key_of(world, user)})
    assert ran.code == 0 and "is cross-signed by" in ran.stdout, ran.stderr


async def test_an_encrypted_room_works_as_a_plain_one(world, cli):
    user = await world.device()  # another device of the same person, to look at what cchat sent
    room, _ = await encrypted_room(world, user)
    await cross_signed(world, cli, user)
    ran = await cli("send", room, "say sealed both ways", "--wait", "--json")
    assert ran.code == 0, ran.stderr
    assert "not cross-signed" not in ran.stderr
    result = json.loads(ran.stdout)
    assert result["ok"] is True and "sealed both ways" in "".join(result["events"])
    events = await user.wait_for(lambda evs: any(body(e) == "say sealed both ways" for e in evs), room_id=room)
    [prompt] = [e["event_id"] for e in events if body(e) == "say sealed both ways"]
    assert (await user.raw_event(room, prompt))["type"] == "m.room.encrypted"
    stored = cli.root / "config" / "store"
    assert stat.S_IMODE((cli.root / "config" / "pickle_key").stat().st_mode) == 0o600 and any(stored.iterdir())


async def test_a_long_answer_is_followed_complete_and_in_order(world, cli):
    """A stand-in bot (the bot's account, no daemon) answers with more events than one sync holds."""
    room = await world.room()
    bot = MatrixUser()
    await bot.login(world.synapse.base_url, world.bot_id, world.bot_password)
    try:
        await bot.join(room)
        proc = await cli.start("send", room, "say many", "--wait", "--json", "--timeout", "60")
        events = await world.user.wait_for(
            lambda evs: any(e.get("content", {}).get("body") == "say many" for e in evs), room_id=room
        )
        prompt_id = next(e["event_id"] for e in events if e.get("content", {}).get("body") == "say many")
        other = await world.user.send_text(room, "a human in between")
        proc.send_signal(signal.SIGSTOP)  # cchat falls behind: its next sync is limited and must page forward
        for i in range(150):
            await bot.send_text(room, f"part {i}\n", **{"org.aiagentchat": {"prompt": prompt_id, "hops": 1}})
            if i == 70:  # another run's output in between is not part of this answer
                await bot.send_text(room, "not mine", **{"org.aiagentchat": {"prompt": other, "hops": 1}})
        final = {"ok": True, "result": "150 parts", "cost_usd": "0.5", "duration_ms": 10, "num_turns": 1,
                 "session_id": "s-1"}  # fmt: skip
        await bot.send_text(room, "done", **{"org.aiagentchat": {"prompt": prompt_id, "hops": 1, "final": final}})
        proc.send_signal(signal.SIGCONT)
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        await bot.close()
    assert proc.returncode == 0, err
    assert json.loads(out) == {
        "ok": True,
        "result": "150 parts",
        "cost_usd": 0.5,
        "duration_ms": 10,
        "session_id": "s-1",
        "events": [f"part {i}\n" for i in range(150)] + ["done"],
    }


async def test_a_final_answer_forged_by_another_member_is_not_taken_and_escapes_are_not_printed(world, cli):
    """A stand-in bot (the bot's account, no daemon) answers after another member forged the final answer."""
    other = await world.another_user()
    room = await world.user.create_room(invite=[world.bot_id, other.user_id])
    await other.join(room)
    bot = MatrixUser()
    await bot.login(world.synapse.base_url, world.bot_id, world.bot_password)
    try:
        await bot.join(room)
        proc = await cli.start("send", room, "say forged", "--wait", "--timeout", "60", "--bot", world.bot_id)
        prompt_id = await prompt_sent(world.user, room, world.user.user_id, lambda e: body(e) == "say forged")
        await other.send_text(room, "forged answer", **marked(prompt_id, "forged"))
        await other.wait_for(lambda evs: any(body(e) == "forged answer" for e in evs), room_id=room)
        await bot.send_text(room, "\x1b]0;retitled\x07\x1b[31mreal\x1b[0m answer", **marked(prompt_id, "real"))
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        await bot.close()
    assert proc.returncode == 0, err
    assert out.decode() == "real answer\n"


async def test_in_an_encrypted_room_a_plaintext_answer_from_the_bots_own_account_is_not_taken(world, cli):
    """Another device of the bot's account, without encryption, posts a plaintext final answer first."""
    user = await world.device()
    room, _ = await encrypted_room(world, user)
    await cross_signed(world, cli, user)
    impostor = MatrixUser()
    await impostor.login(world.synapse.base_url, world.bot_id, world.bot_password)
    try:
        proc = await cli.start("send", room, "slow 20", "--wait", "--json", "--timeout", "90")
        prompt_id = await prompt_sent(impostor, room, world.user.user_id, lambda e: e.get("type") == "m.room.encrypted")
        await impostor.send_text(room, "forged", **marked(prompt_id, "forged"))
        async with asyncio.timeout(90):
            out, err = await proc.communicate()
    finally:
        await impostor.close()
    assert proc.returncode == 0, err
    answer = json.loads(out)
    assert answer["result"].startswith("w1 w2 w3") and "forged" not in out.decode()
    events = await user.wait_for(lambda evs: any(body(e) == "forged" for e in evs), room_id=room)
    [forged] = [e for e in events if body(e) == "forged"]
    assert forged["sender"] == world.bot_id and (await user.raw_event(room, forged["event_id"]))["type"] == (
        "m.room.message"
    )  # it was there, in plaintext, from the bot's user


async def test_an_unsigned_cchat_is_told_why_and_the_recovery_key_signs_it(world, tmp_path):
    user = await world.device()
    room, _ = await encrypted_room(world, user)
    key = await recovery_key_of(world, user)
    cli = Cchat(tmp_path / "cchat")
    cli.env["CCHAT_BOT"] = world.bot_id
    await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    ignored = await cli("send", room, "say from an unsigned cchat", "--wait", "--timeout", "15")
    assert ignored.code == 3 and "is not cross-signed by your identity" in ignored.stderr
    assert "cchat verify --recovery-key" in ignored.stderr
    wrong = await cli("verify", "--recovery-key", env={"CCHAT_RECOVERY_KEY": encode_recovery_key(new_recovery_key())})
    assert wrong.code == 2 and "not the one of the account's secret storage" in wrong.stderr

    relogin = await cli("login", "--homeserver", world.synapse.base_url, "--user", world.user.user_id,
                        "--recovery-key", env={"CCHAT_PASSWORD": world.user_password, "CCHAT_RECOVERY_KEY": key})  # fmt: skip
    assert relogin.code == 0 and "is cross-signed by" in relogin.stdout, relogin.stderr
    ran = await cli("send", room, "say from a signed cchat", "--wait", "--json")
    assert ran.code == 0 and "from a signed cchat" in "".join(json.loads(ran.stdout)["events"]), ran.stderr


async def test_cchat_verify_compares_emoji_with_another_session_which_signs_it(world, people, tmp_path):
    element = await people(world.user.user_id, world.user_password, "element")
    await element.bootstrap_cross_signing(world.user_password)
    cli = Cchat(tmp_path / "cchat")
    await cli.login(world.synapse.base_url, world.user.user_id, world.user_password)
    device_id = json.loads(cli.credentials.read_text())["device_id"]
    proc = await cli.start("verify", "--timeout", "120")
    shown = ""
    verifying = asyncio.create_task(element.verify_device(world.user.user_id, device_id))
    async with asyncio.timeout(60):
        while "numbers:" not in shown:
            line = await proc.stdout.readline()
            assert line, f"cchat verify ended before showing emoji: {shown}"
            shown += line.decode()
    proc.stdin.write(b"y\n")
    assert same_sas(await verifying, shown)
    async with asyncio.timeout(90):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"this device ({device_id}) is cross-signed by {world.user.user_id}'s identity" in out.decode()
    status = await element.device_status(world.user.user_id, device_id)
    assert status["signed_by_owner"] is True
