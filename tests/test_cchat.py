"""cchat without a network: saved login, ROOM resolution, prompts from stdin, the --json object, exit codes."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nio import RoomMessagesResponse, RoomResolveAliasError, RoomResolveAliasResponse
from typer.testing import CliRunner

from aiagentchat import cchat
from aiagentchat.cchat import Answer, Credentials, Fail, Live, SendRequest
from aiagentchat.plainclient import Response
from aiagentchat.settings import load_settings
from tests.harness import REPO_ROOT

ME = "@me:example.org"
SETTINGS = """
[matrix]
homeserver = "http://127.0.0.1:9"
user_id = "@bot:example.org"

[[rooms]]
id = "!work:example.org"
name = "work"
allowed_users = ["@me:example.org"]

[[rooms]]
id = "#ops:example.org"
name = "ops"
allowed_bots = ["@me:example.org"]

[[rooms]]
id = "!private:example.org"
name = "private"
allowed_users = ["@someone:example.org"]
"""


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A config dir with a saved login for ME at a port nothing listens on; cwd without settings.toml."""
    config = tmp_path / "config"
    monkeypatch.setenv("CCHAT_CONFIG_DIR", str(config))
    monkeypatch.delenv("AIAGENTCHAT_CONFIG", raising=False)
    monkeypatch.delenv("AIAGENTCHAT_HOPS", raising=False)
    monkeypatch.delenv("CCHAT_BOT", raising=False)
    monkeypatch.chdir(tmp_path)
    Credentials("http://127.0.0.1:9", ME, "DEV", "tok").save(config / "credentials.json")
    return tmp_path


@pytest.fixture
def settings_file(tmp_path) -> Path:
    path = tmp_path / "daemon-settings.toml"
    path.write_text(SETTINGS)
    return path


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cchat.app, list(args), input=input)


# --- saved login -------------------------------------------------------------------------------------------------


def test_credentials_are_private_and_a_planted_symlink_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    path = tmp_path / "config" / "credentials.json"
    path.parent.mkdir()
    path.symlink_to(victim)

    Credentials("https://hs", ME, "DEV", "secret-token").save(path)

    assert victim.read_text() == "do not touch"
    assert not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {
        "homeserver": "https://hs",
        "user_id": ME,
        "device_id": "DEV",
        "access_token": "secret-token",
    }
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temp file left behind
    assert cchat.load_credentials(path) == Credentials("https://hs", ME, "DEV", "secret-token")


def test_the_saved_login_has_the_daemons_layout(tmp_path):
    path = tmp_path / "credentials.json"
    Credentials("https://hs", ME, "DEV", "tok").save(path)
    assert json.loads(path.read_text()) == {
        "homeserver": "https://hs", "user_id": ME, "device_id": "DEV", "access_token": "tok"}


def test_a_readable_or_linked_saved_login_is_refused(tmp_path):
    path = tmp_path / "credentials.json"
    Credentials("https://hs", ME, "DEV", "tok").save(path)
    path.chmod(0o644)
    with pytest.raises(Fail, match="others can read it") as caught:
        cchat.load_credentials(path)
    assert caught.value.code == 2
    link = tmp_path / "link.json"
    link.symlink_to(path)
    path.chmod(0o600)
    with pytest.raises(Fail, match="symbolic link"):
        cchat.load_credentials(link)
    with pytest.raises(Fail, match="not logged in"):
        cchat.load_credentials(tmp_path / "missing.json")


def test_the_config_dir_follows_cchat_config_dir_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cchat.config_dir({"CCHAT_CONFIG_DIR": "/x/y"}) == Path("/x/y")
    assert cchat.config_dir({"XDG_CONFIG_HOME": "/xdg"}) == Path("/xdg/aiagentchat")
    assert cchat.config_dir({"XDG_CONFIG_HOME": "relative"}) == tmp_path / ".config" / "aiagentchat"
    assert cchat.config_dir({}) == tmp_path / ".config" / "aiagentchat"


def test_login_needs_a_full_user_id_and_a_password(home, monkeypatch):
    monkeypatch.delenv("CCHAT_PASSWORD", raising=False)
    result = invoke("login", "--homeserver", "http://127.0.0.1:9", "--user", "me")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "full Matrix ID" in result.stderr
    result = invoke("login", "--homeserver", "http://127.0.0.1:9", "--user", ME)
    assert result.exit_code == 2
    assert result.stderr == "cchat: no password: set CCHAT_PASSWORD or run cchat login on a terminal\n"


# --- ROOM resolution ---------------------------------------------------------------------------------------------


class FakeClient:
    homeserver = "http://fake"
    olm = None  # no encryption: nothing to upkeep

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self.resolved: list[str] = []

    async def room_resolve_alias(self, alias: str):
        self.resolved.append(alias)
        if alias in self.aliases:
            return RoomResolveAliasResponse(alias, self.aliases[alias], [])
        return RoomResolveAliasError("Room alias not found", "M_NOT_FOUND")


@pytest.mark.anyio
async def test_room_is_resolved_by_name_from_a_settings_file(settings_file):
    settings = load_settings(settings_file)
    client = FakeClient({"#ops:example.org": "!ops:example.org", "#other:example.org": "!other:example.org"})

    room_id, entry = await cchat.resolve_room(client, "work", settings)
    assert (room_id, entry.name) == ("!work:example.org", "work")
    assert client.resolved == []  # a name with a room id needs no request

    room_id, entry = await cchat.resolve_room(client, "ops", settings)
    assert (room_id, entry.name) == ("!ops:example.org", "ops")

    room_id, entry = await cchat.resolve_room(client, "!ops:example.org", settings)  # id of an alias entry
    assert (room_id, entry.name) == ("!ops:example.org", "ops")

    room_id, entry = await cchat.resolve_room(client, "#other:example.org", settings)
    assert (room_id, entry) == ("!other:example.org", None)

    assert await cchat.resolve_room(client, "!x:example.org", None) == ("!x:example.org", None)

    with pytest.raises(Fail, match="unknown room 'nope'") as caught:
        await cchat.resolve_room(client, "nope", settings)
    assert caught.value.code == 2
    with pytest.raises(Fail, match="#gone:example.org not found") as caught:
        await cchat.resolve_room(client, "#gone:example.org", settings)
    assert caught.value.code == 2


def test_the_built_in_homeservers_room_local_is_found_by_name(tmp_path):
    from aiagentchat.localserver import Account, Accounts

    data = tmp_path / "data"
    (data / "homeserver").mkdir(parents=True)
    Accounts(Account("@bot:localhost", "pw"), Account("@you:localhost", "pw"), "!local:localhost").save(
        data / "homeserver" / "accounts.json"
    )
    config = tmp_path / "settings.toml"
    config.write_text(f'[paths]\ndata_dir = "{data}"\n')
    entry = cchat.lookup_room(cchat.read_settings(config), "local")
    assert entry is not None and entry.id == "!local:localhost" and cchat.may_prompt(entry, "@you:localhost")
    assert cchat.bot_user(None, cchat.read_settings(config)) == "@bot:localhost"


def test_without_a_settings_file_the_daemons_defaults_find_the_room_local_in_data(tmp_path, monkeypatch):
    # The daemon without a settings file runs on its defaults (data_dir ./data): cchat reads the same, when needed.
    monkeypatch.delenv("AIAGENTCHAT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    from aiagentchat.localserver import Account, Accounts

    (tmp_path / "data" / "homeserver").mkdir(parents=True)
    Accounts(Account("@bot:localhost", "pw"), Account("@you:localhost", "pw"), "!local:localhost").save(
        tmp_path / "data" / "homeserver" / "accounts.json"
    )
    settings = cchat.read_settings(None, cchat.needs_settings("local", None, follows=True))
    assert cchat.lookup_room(settings, "local").id == "!local:localhost"
    assert cchat.bot_user(None, settings) == "@bot:localhost"
    assert cchat.read_settings(None, cchat.needs_settings("!r:x", "@bot:x", follows=True)) is None  # nothing to find


def test_scripts_cchat_reads_the_projects_settings_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AIAGENTCHAT_CONFIG"} | {"CCHAT_CONFIG_DIR": str(tmp_path)}
    script = REPO_ROOT / "scripts" / "cchat"
    found = subprocess.run(
        [script, "rooms", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert found.returncode == 0, found.stderr
    assert isinstance(json.loads(found.stdout), list)
    # the same command run here directly has no settings file to read
    command = [sys.executable, "-m", "aiagentchat.cchat", "rooms"]
    here = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert here.returncode == 2 and "no settings file" in here.stderr


def loaded_modules(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded once `code` ran (also when it ends with SystemExit)."""
    report = "import atexit, sys; atexit.register(lambda: print(*sorted(sys.modules), file=sys.stderr)); "
    command = [sys.executable, "-c", report + code]
    ran = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    return set(ran.stderr.split())


# what a command loads only when it needs it (typer itself uses pydantic, so that is not among them)
HEAVY = {"aiagentchat.batcher", "aiagentchat.runner", "aiagentchat.crypto", "aiagentchat.settings", "nio"}
HEAVY |= {"nio.crypto", "vodozemac", "pydantic_settings", "aiohttp", "rich"}


def test_importing_cchat_loads_no_daemon_pipeline_no_nio_crypto_and_no_settings():
    loaded = loaded_modules("import aiagentchat.cchat")
    assert "aiagentchat.cchat" in loaded
    assert loaded.isdisjoint(HEAVY), sorted(loaded.intersection(HEAVY))


def test_help_loads_neither_rich_nor_a_matrix_client():
    loaded = loaded_modules("from aiagentchat.cchat import app; app(['send', '--help'])")
    assert "typer" in loaded
    assert loaded.isdisjoint(HEAVY), sorted(loaded.intersection(HEAVY))


def test_the_plain_clients_answers_read_like_nios():
    ok = SimpleNamespace(status=200, headers={})
    answer = Response(ok, {"next_batch": "s2", "rooms": {"join": {"!r:x": {"timeline": {"events": [{"a": 1}, 7]}}}}})
    room = answer.rooms.join["!r:x"]
    assert [e.source for e in room.timeline.events] == [{"a": 1}] and room.timeline.limited is False
    assert (answer.next_batch, answer.status_code, answer.event_id) == ("s2", None, None)
    assert Response(ok, {"rooms": "nonsense"}).rooms.join == {}
    refused = Response(SimpleNamespace(status=429, headers={}), {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 5})
    assert (refused.status_code, refused.retry_after_ms, refused.next_batch, refused.chunk) == (
        "M_LIMIT_EXCEEDED", 5, None, None
    )  # fmt: skip
    assert Response(SimpleNamespace(status=502, headers={}), {}).status_code is None  # a proxy's page: no errcode


def test_tail_ends_its_output_with_a_newline_even_inside_a_run(capsys):
    marker = {"prompt": "$p"}
    assert cchat.show_tail_event("first words", marker, as_json=False) is True  # the run goes on: line open
    assert cchat.show_tail_event(" and the end", marker | {"final": {"ok": True}}, as_json=False) is False
    assert cchat.show_tail_event("line\n", marker, as_json=False) is False
    assert capsys.readouterr().out == "first words and the end\nline\n"


def test_the_bot_is_the_option_else_the_settings_user(settings_file):
    settings = load_settings(settings_file)
    assert cchat.bot_user(None, settings) == "@bot:example.org"
    assert cchat.bot_user("@other:example.org", settings) == "@other:example.org"
    with pytest.raises(Fail, match="which user is the bot") as caught:
        cchat.bot_user(None, None)
    assert caught.value.code == 2


@pytest.mark.parametrize("command", [["send", "!r:x", "hi", "--wait"], ["tail", "!r:x"]])
def test_waiting_or_tailing_without_knowing_the_bot_exits_2(home, command):
    result = invoke(*command)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        "cchat: which user is the bot? pass --bot @bot:server, or --config with the daemon's settings\n"
    )


def test_allowed_users_and_allowed_bots_may_prompt(settings_file):
    settings = load_settings(settings_file)
    assert cchat.may_prompt(cchat.lookup_room(settings, "work"), ME)
    assert cchat.may_prompt(cchat.lookup_room(settings, "ops"), ME)
    assert not cchat.may_prompt(cchat.lookup_room(settings, "private"), ME)


def test_a_user_the_settings_do_not_allow_gets_4_and_nothing_is_sent(home, settings_file):
    result = invoke("send", "private", "say hi", "--config", str(settings_file))
    assert result.exit_code == 4
    assert result.stdout == ""
    assert result.stderr == (
        "cchat: @me:example.org is not in allowed_users or allowed_bots of private; nothing sent\n"
    )


# --- the prompt --------------------------------------------------------------------------------------------------


@pytest.fixture
def sent(monkeypatch) -> list[SendRequest]:
    requests: list[SendRequest] = []

    async def fake_run_send(request: SendRequest) -> int:
        requests.append(request)
        return 0

    monkeypatch.setattr(cchat, "run_send", fake_run_send)
    return requests


def test_text_dash_reads_the_prompt_from_stdin(home, sent):
    result = invoke("send", "!r:x", "-", "--wait", "--json", "--timeout", "7", input="say from stdin\nsecond line\n")
    assert result.exit_code == 0, result.stderr
    assert sent == [SendRequest("!r:x", "say from stdin\nsecond line", True, 7.0, True, None)]


def test_text_is_taken_as_given(home, sent):
    assert invoke("send", "work", "say hi there").exit_code == 0
    assert sent[0].text == "say hi there" and not sent[0].wait and sent[0].timeout == 600


def test_hops_from_the_environment_are_counted_up():
    assert cchat.prompt_content("hi", {}) == {"msgtype": "m.text", "body": "hi"}
    assert cchat.prompt_content("hi", {"AIAGENTCHAT_HOPS": "2"}) == {
        "msgtype": "m.text",
        "body": "hi",
        "org.aiagentchat.hops": 3,
    }
    with pytest.raises(Fail, match="AIAGENTCHAT_HOPS"):
        cchat.prompt_content("hi", {"AIAGENTCHAT_HOPS": "many"})


# --- answers -----------------------------------------------------------------------------------------------------


def bot_event(
    event_id: str, prompt: str, body: str, final: dict[str, Any] | None = None, sender: str = "@bot:x"
) -> dict[str, Any]:
    marker: dict[str, Any] = {"prompt": prompt, "hops": 1}
    if final is not None:
        marker["final"] = final
    content = {"msgtype": "m.text", "body": body, "org.aiagentchat": marker}
    return {"type": "m.room.message", "event_id": event_id, "sender": sender, "content": content}


FINAL = {"ok": True, "result": "hi there", "cost_usd": 0.0123, "duration_ms": 1500, "num_turns": 1,
         "session_id": "sess-1"}  # fmt: skip


def test_json_object_from_a_faked_answer():
    answer = Answer("$prompt")
    events = [
        {"type": "m.room.message", "event_id": "$prompt", "sender": ME, "content": {"msgtype": "m.text", "body": "hi"}},
        bot_event("$1", "$other", "someone else's run"),
        bot_event("$2", "$prompt", "hi "),
        {"type": "m.reaction", "event_id": "$3", "content": {"org.aiagentchat": {"prompt": "$prompt"}}},
        bot_event("$4", "$prompt", "there\n"),
        bot_event("$5", "$prompt", "✅ Done · 1.5 s · 1 turn · $0.0123\n", FINAL),
        bot_event("$6", "$prompt", "after the final"),
    ]
    taken = [answer.offer(event) for event in events]
    assert taken == [None, None, "hi ", None, "there\n", "✅ Done · 1.5 s · 1 turn · $0.0123\n", None]
    assert cchat.result_object(answer.final, answer.bodies) == {
        "ok": True,
        "result": "hi there",
        "cost_usd": 0.0123,
        "duration_ms": 1500,
        "session_id": "sess-1",
        "events": ["hi ", "there\n", "✅ Done · 1.5 s · 1 turn · $0.0123\n"],
    }
    assert cchat.exit_code(answer.final) == 0


def test_a_live_status_and_its_edits_are_not_part_of_the_answer():
    answer = Answer("$prompt")
    status = bot_event("$1", "$prompt", "👀 Working · 1 s")
    status["content"]["org.aiagentchat"]["status"] = True
    edit = bot_event("$2", "$prompt", "* ✅ Done · 1.5 s")
    edit["content"]["org.aiagentchat"]["status"] = True
    taken = [answer.offer(event) for event in (status, edit, bot_event("$3", "$prompt", "hi there", FINAL))]
    assert taken == [None, None, "hi there"]
    assert answer.bodies == ["hi there"] and answer.final == FINAL


def test_an_agent_error_gives_1_and_a_timeout_gives_3_with_null_fields():
    failed = {"ok": False, "result": "API Error: 400", "cost_usd": None, "duration_ms": 20, "num_turns": 1,
              "session_id": None}  # fmt: skip
    assert cchat.result_object(failed, ["❌ API Error: 400"]) == {
        "ok": False, "result": "API Error: 400", "cost_usd": None, "duration_ms": 20, "session_id": None,
        "events": ["❌ API Error: 400"],
    }  # fmt: skip
    assert cchat.exit_code(failed) == 1
    assert cchat.result_object(None, ["w1 w2"]) == {
        "ok": False, "result": None, "cost_usd": None, "duration_ms": None, "session_id": None, "events": ["w1 w2"],
    }  # fmt: skip
    assert cchat.exit_code(None) == 3


def test_terminal_escapes_and_control_characters_are_stripped_but_newlines_and_tabs_stay():
    assert cchat.printable("\x1b[31mred\x1b[0m and \x1b[2J\x1b[1;1Hplain") == "red and plain"
    assert cchat.printable("\x1b]0;owned title\x07after") == "after"
    assert cchat.printable("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\") == "link"
    assert cchat.printable("\x1bP+q\x1b\\\x1bcreset\x1b(B") == "reset"
    assert cchat.printable("\x9b31mC1 \x9d2;t\x9cok") == "C1 ok"
    assert cchat.printable("bell\x07 back\x08space\rover\x00\x7f") == "bell backspaceover"
    assert cchat.printable("a\tb\nc ✅ é") == "a\tb\nc ✅ é"


def test_an_error_line_carries_no_escapes(capsys):
    cchat.error_line("the agent reported an error: \x1b]0;title\x07\x1b[2Jwiped\nnext")
    assert capsys.readouterr().err == "cchat: the agent reported an error: wiped next\n"


def test_an_answer_and_a_tailed_event_are_printed_without_escapes(capsys):
    answer = Answer("$p")
    answer.offer(bot_event("$1", "$p", "\x1b]0;title\x07hi\x1b[2K\n", {"ok": True, "result": "\x1b[31mhi\x1b[0m"}))
    assert answer.bodies == ["hi\n"] and answer.final == {"ok": True, "result": "hi"}
    cchat.show_tail_event("\x1b[1mbold\x1b[0m", {"prompt": "$p", "final": {"result": "\x1b[5mx"}}, as_json=False)
    cchat.show_tail_event("\x1b[1mbold\x1b[0m", {"prompt": "$p", "final": {"result": "\x1b[5mx"}}, as_json=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bold" and json.loads(out[1]) == {"prompt": "$p", "body": "bold", "final": {"result": "x"}}


def test_a_cost_sent_as_a_decimal_string_becomes_a_number():
    # Canonical JSON (what Synapse accepts in events) has no floats: a daemon has to send the cost as text.
    assert cchat.result_object(FINAL | {"cost_usd": "0.0123"}, [])["cost_usd"] == 0.0123
    assert cchat.result_object(FINAL | {"cost_usd": 2}, [])["cost_usd"] == 2.0
    assert cchat.result_object(FINAL | {"cost_usd": "n/a"}, [])["cost_usd"] is None


class FakeSyncClient:
    """Serves scripted /sync answers for one room, and /messages pages from a full history."""

    homeserver = "http://fake"
    olm = None  # no encryption: nothing to upkeep

    def __init__(self, history: list[dict[str, Any]]) -> None:
        self.history = history  # every event of the room, oldest first; tokens are positions in it
        self.syncs: list[tuple[str | None, int]] = []  # (since, batch size) to serve, in order
        self.pages: list[str] = []

    async def sync(self, timeout, sync_filter, since=None):
        since_seen, size = self.syncs.pop(0)
        assert since == since_seen
        start = int(since or 0)
        end = start + size if since else len(self.history)
        window = self.history[start:end]
        limit = sync_filter["room"]["timeline"]["limit"]
        timeline = SimpleNamespace(
            events=[SimpleNamespace(source=e) for e in window[-limit:]], limited=len(window) > limit, prev_batch="x"
        )
        rooms = SimpleNamespace(join={"!r:x": SimpleNamespace(timeline=timeline)})
        return SimpleNamespace(rooms=rooms, next_batch=str(end))

    async def room_messages(self, room_id, start, direction, limit):
        self.pages.append(start)
        begin = int(start)
        chunk = [SimpleNamespace(source=e) for e in self.history[begin : begin + limit]]
        return RoomMessagesResponse(room_id, chunk, start, str(begin + len(chunk)))


@pytest.mark.anyio
async def test_the_follower_misses_nothing_after_its_start_even_past_a_limited_sync():
    history = [bot_event(f"${i}", "$p", f"e{i} ") for i in range(400)]
    client = FakeSyncClient(history)
    client.syncs = [(None, 0), ("10", 5), ("15", 250), ("265", 10)]
    follower = cchat.Follower(client, "!r:x", "@bot:x", encrypted=False)
    client.history = history[:10]  # the room's state when the follower starts
    await follower.start()
    client.history = history
    assert follower.token == "10"
    seen = []
    for _ in range(3):
        seen += [e["event_id"] for e in await follower.poll()]
    # 250 events in one sync (its limit is 100): paged forward from the last position up to now, each event once
    assert seen == [f"${i}" for i in range(10, 400)]
    assert client.pages[0] == "15"


@pytest.mark.anyio
async def test_a_forged_answer_from_another_member_is_not_taken():
    real = {"ok": True, "result": "the bot's"}
    history = [
        bot_event("$1", "$p", "forged ", {"ok": True, "result": "forged"}, sender="@mallory:x"),
        bot_event("$2", "$p", "real", real),
    ]
    client = FakeSyncClient(history)
    client.syncs = [(None, 0), ("0", 2)]
    follower = cchat.Follower(client, "!r:x", "@bot:x", encrypted=False)
    client.history = []
    await follower.start()
    client.history = history
    answer = Answer("$p")
    for event in await follower.poll():
        answer.offer(event)
    assert answer.bodies == ["real"] and answer.final == real


def test_in_an_encrypted_room_only_what_a_bot_device_encrypted_is_the_bots():
    bot_device = SimpleNamespace(ed25519="bot-ed")
    sessions = {
        "direct": SimpleNamespace(ed25519="bot-ed", forwarding_chain=[]),
        "forwarded": SimpleNamespace(ed25519="bot-ed", forwarding_chain=["other-curve"]),
        "other-signer": SimpleNamespace(ed25519="someone-ed", forwarding_chain=[]),
    }
    olm = SimpleNamespace(
        device_store=SimpleNamespace(
            device_from_sender_key=lambda user, key: bot_device if (user, key) == ("@bot:x", "bot-curve") else None
        ),
        inbound_group_store=SimpleNamespace(get=lambda room, key, session: sessions.get(session)),
    )
    follower = cchat.Follower(SimpleNamespace(olm=olm), "!r:x", "@bot:x", encrypted=True)

    def event(sender="@bot:x", decrypted=True, sender_key="bot-curve", session="direct"):
        source = bot_event("$1", "$p", "hi", sender=sender)
        return SimpleNamespace(source=source, decrypted=decrypted, sender_key=sender_key, session_id=session)

    assert follower.from_bot(event())
    assert not follower.from_bot(SimpleNamespace(source=bot_event("$1", "$p", "hi")))  # plaintext, no decryption
    assert not follower.from_bot(event(decrypted=False))
    assert not follower.from_bot(event(sender="@mallory:x"))
    assert not follower.from_bot(event(sender_key="mallory-curve"))  # a room key from a device not the bot's
    assert not follower.from_bot(event(session="forwarded"))
    assert not follower.from_bot(event(session="other-signer"))
    assert not follower.from_bot(event(session="unknown"))
    assert cchat.Follower(SimpleNamespace(olm=None), "!r:x", "@bot:x", encrypted=False).from_bot(
        SimpleNamespace(source=bot_event("$1", "$p", "hi"))
    )


def test_live_output_concatenates_bodies_and_draws_nothing_when_stderr_is_not_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    live = Live(out, err, show_bodies=True)
    live.draw()
    for body in ("w1 w2", " w3\n", "✅ Done"):
        live.body(body)
    live.finish()
    assert out.getvalue() == "w1 w2 w3\n✅ Done\n"
    assert err.getvalue() == ""


def test_the_progress_line_shows_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, err = io.StringIO(), Tty()
    live = Live(out, err, show_bodies=False)
    live.draw()
    live.body("hidden with --json")
    live.finish()
    assert out.getvalue() == ""
    assert "waiting for the agent · 0 s" in err.getvalue() and err.getvalue().endswith("\r\x1b[K")


# --- usage errors and rooms --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["send"], "cchat send: Missing argument 'room'."),
        (["send", "!r:x"], "cchat send: Missing argument 'text'."),
        (["send", "!r:x", "hi", "--json"], "cchat: --json needs --wait"),
        (["send", "!r:x", "hi", "--wait", "--timeout", "0"], "cchat: --timeout must be more than 0 seconds"),
        (["send", "!r:x", "hi", "--bogus"], "cchat send: No such option: --bogus"),
        (["send", "!r:x", "   "], "cchat: the prompt is empty"),
        (["send", "nowhere", "hi"], "cchat: unknown room 'nowhere': give a room id"),
        (["send", "work", "hi", "--config", "missing.toml"], "cchat: missing.toml: cannot read settings"),
        (["rooms"], "cchat: no settings file and no built-in homeserver here: pass --config or set AIAGENTCHAT_CONFIG"),
        (["fly"], "cchat: No such command 'fly'."),
    ],
)
def test_usage_errors_exit_2_with_one_stderr_line(home, args, says):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(says) and result.stderr.count("\n") == 1, result.stderr


def test_no_saved_login_exits_2(home):
    os.remove(home / "config" / "credentials.json")
    result = invoke("send", "!r:x", "hi")
    assert result.exit_code == 2
    assert result.stderr.startswith("cchat: not logged in (") and result.stderr.count("\n") == 1


def test_invalid_settings_exit_2_naming_the_line(home, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rooms]]\nid = "!a:x"\nmax_hops = 0\n')
    result = invoke("send", "!a:x", "hi", "--config", str(bad))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"cchat: {bad}:3: rooms.0.max_hops") and result.stderr.count("\n") == 1


def test_rooms_lists_the_settings_rooms(home, settings_file, monkeypatch):
    monkeypatch.setenv("AIAGENTCHAT_CONFIG", str(settings_file))
    result = invoke("rooms")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "work\t!work:example.org\t@me:example.org",
        "ops\t#ops:example.org\t-",
        "private\t!private:example.org\t@someone:example.org",
    ]
    listed = json.loads(invoke("rooms", "--json").stdout)
    assert listed[1] == {
        "name": "ops",
        "id": "#ops:example.org",
        "allowed_users": [],
        "allowed_bots": [ME],
        "max_hops": 3,
    }
