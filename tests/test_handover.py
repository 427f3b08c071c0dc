"""Handing a conversation between a terminal and a room, without a homeserver: the CLI's folder names, the
newest conversation, id checks, copies that lose no turn and follow no link, cchat's refusals and handback, the
daemon's `!resume`, and the worker starting a new agent that resumes the adopted session."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from aiagentchat import cchat
from aiagentchat.batcher import Notice
from aiagentchat.cchat import Credentials, Fail, Handover
from aiagentchat.commands import Command, Commands
from aiagentchat.handover import (
    HandoverError,
    Transcripts,
    hand_over,
    project_slug,
    resume_command,
    session_id,
    terminal_claude_dir,
)
from aiagentchat.settings import RoomSettings, load_settings
from aiagentchat.store import Prompt, Store, peek_conversation
from tests.harness import REPO_ROOT
from tests.test_runner import fake_claude, make_worker

ME = "@me:example.org"
ONE = "3d6efd0c-1c43-4e35-be68-dc25e341e50a"
TWO = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
LONG = "/tmp/ho/" + "very_long-directory.name" * 10 + "/épée 🍍/x"


# --- where the CLI keeps a conversation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directory", "folder"),
    [  # each seen made by Claude Code 2.1.197 itself, run in that directory
        ("/tmp/ho/proj", "-tmp-ho-proj"),
        ("/tmp/ho/épée 🍍", "-tmp-ho--p-e---"),  # one - per UTF-16 unit: two for the pineapple
        (LONG, "-tmp-ho-" + "very-long-directory-name" * 8 + "-pch3u9"),  # cut at 200, the hash added
    ],
)  # fmt: skip
def test_the_folder_of_a_directory_is_named_as_the_cli_names_it(directory, folder):
    assert project_slug(directory) == folder


@pytest.mark.parametrize("text", [ONE, ONE.upper(), f"  {ONE}\n"])
def test_a_conversation_id_is_a_uuid_in_lower_case(text):
    assert session_id(text) == ONE


@pytest.mark.parametrize("text", ["", "latest", "../" + ONE, ONE + ".jsonl", ONE[:-1], ONE.replace("-", ""), "x" * 36])
def test_anything_but_a_uuid_is_refused_as_a_conversation_id(text):
    with pytest.raises(HandoverError, match="is not a conversation id"):
        session_id(text)


def test_the_terminals_conversations_are_in_claude_config_dir_else_home():
    assert terminal_claude_dir({"HOME": "/home/me"}) == Path("/home/me/.claude")
    assert terminal_claude_dir({"HOME": "/home/me", "CLAUDE_CONFIG_DIR": "/etc/cc"}) == Path("/etc/cc")


def test_the_resume_command_quotes_the_directory():
    assert resume_command(Path("/srv/site"), ONE) == f"cd /srv/site && claude --resume {ONE}"
    assert resume_command(Path("/srv/my site's"), ONE) == f"cd '/srv/my site'\"'\"'s' && claude --resume {ONE}"


def write(transcripts: Transcripts, session: str, data: bytes, mtime: int | None = None) -> Path:
    transcripts.folder.mkdir(parents=True, exist_ok=True)
    path = transcripts.path(session)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_the_newest_conversation_is_the_last_written_non_empty_transcript(tmp_path):
    terminal = Transcripts.in_claude_dir(tmp_path / ".claude", Path("/srv/site"))
    assert terminal.newest() is None  # no folder yet
    write(terminal, ONE, b'{"turn": 1}\n', mtime=1_000)
    write(terminal, TWO, b'{"turn": 1}\n', mtime=2_000)
    assert terminal.newest() == TWO
    write(terminal, "a0000000-0000-4000-8000-000000000000", b"", mtime=3_000)  # empty: the CLI skips it
    (terminal.folder / "notes.jsonl").write_text("{}\n")  # not a conversation's name
    os.utime(terminal.folder / "notes.jsonl", (4_000, 4_000))
    (terminal.folder / "b0000000-0000-4000-8000-000000000000.jsonl").mkdir()
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n")
    (terminal.folder / "c0000000-0000-4000-8000-000000000000.jsonl").symlink_to(outside)
    assert terminal.newest() == TWO
    assert terminal.has(TWO) and not terminal.has("a0000000-0000-4000-8000-000000000000")
    assert not terminal.has("c0000000-0000-4000-8000-000000000000")


# --- copying a conversation -------------------------------------------------------------------------------------


def test_a_conversation_is_copied_whole_and_the_source_is_left_as_it_was(tmp_path):
    workdir = Path("/srv/site")
    terminal = Transcripts.in_claude_dir(tmp_path / "me" / ".claude", workdir)
    room = Transcripts.in_home(tmp_path / "room-home", workdir)
    source = write(terminal, ONE, b'{"turn": 1}\n', mtime=1_000)
    (tmp_path / "room-home").mkdir()

    assert hand_over(terminal, room, ONE) is True
    copied = tmp_path / "room-home" / ".claude" / "projects" / "-srv-site" / f"{ONE}.jsonl"
    assert copied.read_bytes() == b'{"turn": 1}\n' and oct(copied.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "room-home" / ".claude").stat().st_mode & 0o777) == "0o700"
    assert source.read_bytes() == b'{"turn": 1}\n' and source.stat().st_mtime == 1_000
    assert hand_over(terminal, room, ONE) is False  # the same: nothing to do

    write(terminal, ONE, b'{"turn": 1}\n{"turn": 2}\n')  # it went on in the terminal: the room's copy grows
    assert hand_over(terminal, room, ONE) is True
    assert copied.read_bytes() == b'{"turn": 1}\n{"turn": 2}\n'
    assert hand_over(room, terminal, ONE) is False


def test_a_copy_that_went_on_elsewhere_is_never_replaced(tmp_path):
    workdir = Path("/srv/site")
    terminal = Transcripts.in_claude_dir(tmp_path / "me" / ".claude", workdir)
    room = Transcripts.in_home(tmp_path / "room-home", workdir)
    write(terminal, ONE, b'{"turn": 1}\n{"terminal": 2}\n')
    write(room, ONE, b'{"turn": 1}\n{"room": 2}\n')
    with pytest.raises(HandoverError, match="went on where .* did not"):
        hand_over(terminal, room, ONE)
    with pytest.raises(HandoverError, match="went on where .* did not"):
        hand_over(room, terminal, ONE)
    assert room.path(ONE).read_bytes() == b'{"turn": 1}\n{"room": 2}\n'
    assert terminal.path(ONE).read_bytes() == b'{"turn": 1}\n{"terminal": 2}\n'
    with pytest.raises(HandoverError, match=f"there is no conversation {TWO} in"):
        hand_over(terminal, room, TWO)


def test_the_same_folder_on_both_sides_copies_nothing(tmp_path):
    home = tmp_path / "home"
    terminal = Transcripts.in_claude_dir(home / ".claude", Path("/srv/site"))
    write(terminal, ONE, b'{"turn": 1}\n')
    assert hand_over(terminal, Transcripts.in_home(home, Path("/srv/site")), ONE) is False
    assert terminal.path(ONE).read_bytes() == b'{"turn": 1}\n'


def test_links_an_agent_plants_in_its_home_are_never_followed(tmp_path):
    workdir = Path("/srv/site")
    terminal = Transcripts.in_claude_dir(tmp_path / "me" / ".claude", workdir)
    write(terminal, ONE, b'{"turn": 1}\n')
    victim = tmp_path / "me" / ".bashrc"
    victim.write_text("mine\n")

    home = tmp_path / "room-home"
    room = Transcripts.in_home(home, workdir)
    room.folder.mkdir(parents=True)
    room.path(ONE).symlink_to(victim)  # the transcript itself a link: neither read nor written through
    with pytest.raises(HandoverError, match="it is a link: refused"):
        hand_over(terminal, room, ONE)
    with pytest.raises(HandoverError, match="it is a link: refused"):
        hand_over(room, terminal, ONE)
    assert victim.read_text() == "mine\n" and not room.has(ONE)
    room.path(ONE).unlink()
    assert hand_over(terminal, room, ONE) is True

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for linked in (home / ".claude" / "projects" / "-srv-site", home / ".claude"):  # a folder on the way a link
        other = Transcripts.in_home(tmp_path / f"home-{linked.name}", workdir)
        planted = other.root.joinpath(*other.below[: len(linked.relative_to(home).parts)])
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(HandoverError, match="a link is refused"):
            hand_over(terminal, other, ONE)
        with pytest.raises(HandoverError, match="a link is refused"):
            other.has(ONE)
    assert list(elsewhere.iterdir()) == []

    os.mkfifo(room.folder / f"{TWO}.jsonl")  # handing back from a room must not hang on a FIFO
    with pytest.raises(HandoverError, match="is not a file"):
        hand_over(room, terminal, TWO)


# --- cchat adopt and handback -----------------------------------------------------------------------------------


SETTINGS = """
[matrix]
homeserver = "http://127.0.0.1:9"
user_id = "@bot:example.org"

[paths]
data_dir = "{data}"

[[rooms]]
id = "!work:example.org"
name = "work"
workdir = "{workdir}"
allowed_users = ["@me:example.org"]

[[rooms]]
id = "!threads:example.org"
name = "threads"
workdir = "{workdir}"
shared_workdir = true
reply_mode = "thread"
session_scope = "thread"
allowed_users = ["@me:example.org"]

[[rooms]]
id = "!private:example.org"
name = "private"
allowed_users = ["@someone:example.org"]
"""


@pytest.fixture
def site(tmp_path, monkeypatch) -> SimpleNamespace:
    """A project directory, the daemon's settings with a room working in it, a terminal's HOME with a saved
    cchat login, and the room's side of a handover."""
    workdir, data, home = tmp_path / "site", tmp_path / "data", tmp_path / "me"
    for folder in (workdir, data, home):
        folder.mkdir()
    config = tmp_path / "settings.toml"
    config.write_text(SETTINGS.format(data=data, workdir=workdir))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("CCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("AIAGENTCHAT_CONFIG", raising=False)
    Credentials("http://127.0.0.1:9", ME, "DEV", "tok").save(tmp_path / "config" / "credentials.json")
    monkeypatch.chdir(workdir)
    settings = load_settings(config)
    side = cchat.handover_room(settings, cchat.lookup_room(settings, "work"), "work")
    terminal = Transcripts.in_claude_dir(home / ".claude", workdir)
    return SimpleNamespace(workdir=workdir, data=data, config=config, settings=settings, side=side, terminal=terminal)


def invoke(*args: str):
    return CliRunner().invoke(cchat.app, list(args))


def test_the_rooms_side_is_its_workdir_and_its_home_or_with_the_sandbox_off_this_users_home(site, tmp_path):
    assert site.side == Handover("work", site.workdir, site.settings.home_for(site.settings.rooms[0]), True)
    assert site.side.transcripts.folder == site.side.home / ".claude" / "projects" / project_slug(str(site.workdir))
    off = RoomSettings(id="!off:x", workdir=site.workdir, sandbox="off")
    assert cchat.handover_room(site.settings, off, "off").home == tmp_path / "me"
    with pytest.raises(Fail, match="keeps a conversation per thread") as refused:
        cchat.handover_room(site.settings, site.settings.rooms[1], "threads")
    assert refused.value.code == 2


def test_adopt_takes_the_newest_conversation_of_the_directory_or_the_one_named(site):
    write(site.terminal, ONE, b"{}\n", mtime=1_000)
    write(site.terminal, TWO, b"{}\n", mtime=2_000)
    claude_dir = site.terminal.root
    assert cchat.terminal_session(site.side, site.workdir, None, claude_dir) == (TWO, site.terminal)
    assert cchat.terminal_session(site.side, Path("."), ONE.upper(), claude_dir) == (ONE, site.terminal)


@pytest.mark.parametrize(
    ("cwd", "session", "says"),
    [
        ("elsewhere", None, "work works in {workdir}, not in {tmp}/elsewhere: a conversation goes on in the directory"),
        ("missing", None, "{tmp}/missing: No such file or directory"),
        ("site", None, "no Claude Code conversation was started in {workdir} (none in {folder})"),
        ("site", "latest", "'latest' is not a conversation id"),
        ("site", TWO, f"no conversation {TWO} was started in {{workdir}} (not in {{folder}})"),
    ],
)
def test_adopt_refuses_with_a_reason(site, tmp_path, cwd, session, says):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(Fail) as refused:
        cchat.terminal_session(site.side, tmp_path / cwd, session, site.terminal.root)
    expected = says.format(workdir=site.workdir, tmp=tmp_path, folder=site.terminal.folder)
    assert refused.value.code == 2 and refused.value.message.startswith(expected), refused.value.message


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["nowhere"], 2, "cchat: unknown room 'nowhere'"),
        (["private"], 4, "cchat: @me:example.org is not in allowed_users of private; nothing done"),
        (["threads"], 2, "cchat: threads keeps a conversation per thread"),
        (["work"], 2, "cchat: no Claude Code conversation was started in"),
        (["work", "--session", "../../x"], 2, "cchat: '../../x' is not a conversation id"),
        (["work", "--timeout", "0"], 2, "cchat: --timeout must be more than 0 seconds"),
    ],
)
def test_adopt_refuses_before_anything_is_copied_or_sent(site, args, code, says):
    result = invoke("adopt", *args, "--config", str(site.config))
    assert (result.exit_code, result.stdout) == (code, "")
    assert result.stderr.startswith(says) and result.stderr.count("\n") == 1, result.stderr
    assert not (site.data / "homes").exists()


def test_adopt_takes_up_a_conversation_of_where_you_are_also_through_scripts_cchat(site, monkeypatch, tmp_path):
    requests = []

    async def adopted(request: cchat.AdoptRequest) -> int:
        requests.append(request)
        return 0

    monkeypatch.setattr(cchat, "run_adopt", adopted)
    monkeypatch.setenv("CCHAT_CWD", str(tmp_path / "typed-here"))  # what scripts/cchat passes on
    for args in ([], ["--cwd", "sub"], ["--cwd", "/srv/site"]):
        assert invoke("adopt", "work", *args).exit_code == 0
    monkeypatch.delenv("CCHAT_CWD")
    assert invoke("adopt", "work", "--session", ONE).exit_code == 0
    assert [request.cwd for request in requests] == [
        tmp_path / "typed-here", tmp_path / "typed-here" / "sub", Path("/srv/site"), site.workdir
    ]  # fmt: skip
    assert requests[-1] == cchat.AdoptRequest("work", ONE, site.workdir, 60.0, None)


def test_scripts_cchat_adopts_from_where_it_was_called_not_from_the_project(site, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CCHAT_CWD"}
    script = REPO_ROOT / "scripts" / "cchat"
    command = [script, "adopt", "work", "--config", str(site.config)]
    ran = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, check=False)
    assert ran.returncode == 2
    assert ran.stderr.startswith(f"cchat: work works in {site.workdir}, not in {elsewhere}:"), ran.stderr


def test_adopt_makes_the_rooms_home_as_the_daemon_would(site):
    cchat.make_home(site.side, site.data)
    assert oct(site.side.home.stat().st_mode & 0o777) == oct(site.side.home.parent.stat().st_mode & 0o777) == "0o700"


async def stored(database: Path, room_id: str, session: str | None, running: bool = False) -> None:
    store = await Store.open(database)
    try:
        if session is not None:
            await store.set_session_id(room_id, session)
        if running:
            await store.add_prompt(Prompt(room_id, "$run", ME, "say hi"), "running")
    finally:
        await store.close()


@pytest.mark.anyio
async def test_handback_copies_the_rooms_conversation_and_prints_the_command_that_resumes_it(site):
    await stored(site.settings.database, "!work:example.org", None)
    with pytest.raises(Fail, match="work has no conversation yet"):
        await cchat.run_handback("work", site.config)
    await stored(site.settings.database, "!work:example.org", ONE)
    with pytest.raises(Fail, match=f"there is no conversation {ONE} in"):
        await cchat.run_handback("work", site.config)
    write(site.side.transcripts, ONE, b'{"room": 1}\n')

    assert await cchat.run_handback("work", site.config) == f"cd {site.workdir} && claude --resume {ONE}"
    assert site.terminal.path(ONE).read_bytes() == b'{"room": 1}\n'
    assert peek_conversation(site.settings.database, "!work:example.org") == (ONE, False)
    beside = sorted(path.name for path in site.settings.database.parent.iterdir() if "-" in path.name)
    assert beside == [], f"{beside}: a reader's own -wal/-shm would keep a daemon of another user out"
    write(site.terminal, ONE, b'{"terminal": 1}\n')
    with pytest.raises(Fail, match="went on where"):
        await cchat.run_handback("work", site.config)


@pytest.mark.anyio
async def test_handback_waits_for_a_running_prompt_and_needs_a_database(site):
    with pytest.raises(Fail, match="cannot read the daemon's database"):
        await cchat.run_handback("work", site.config)
    await stored(site.settings.database, "!work:example.org", ONE, running=True)
    with pytest.raises(Fail, match="a prompt is running in work"):
        await cchat.run_handback("work", site.config)


def test_handback_prints_only_the_command_on_stdout(site, monkeypatch):
    async def handed_back(room: str, config: Path | None) -> str:
        return f"cd /srv && claude --resume {ONE}"

    monkeypatch.setattr(cchat, "run_handback", handed_back)
    result = invoke("handback", "work")
    assert (result.exit_code, result.stdout) == (0, f"cd /srv && claude --resume {ONE}\n")


@pytest.mark.anyio
async def test_the_answer_to_a_command_is_found_by_its_marker():
    answer = {"type": "m.room.message", "content": {"body": "🔁 \x1b[31mok", "org.aiagentchat": {"command": "$c"}}}
    other = {"type": "m.room.message", "content": {"body": "x", "org.aiagentchat": {"command": "$other"}}}
    batches = [[other], [answer]]
    follower = SimpleNamespace(poll=lambda: asyncio.sleep(0, batches.pop(0) if batches else []))
    assert await cchat.command_reply(follower, "$c", 5) == {"body": "🔁 ok", "marker": {"command": "$c"}}
    assert await cchat.command_reply(SimpleNamespace(poll=lambda: asyncio.sleep(0.01, [])), "$c", 0.05) is None


# --- the daemon's !resume ---------------------------------------------------------------------------------------


class Batcher:
    def __init__(self) -> None:
        self.items: list = []

    async def put(self, item) -> None:
        self.items.append(item)


def idle_worker(tmp_path: Path, **changes) -> SimpleNamespace:
    home, workdir = tmp_path / "room-home", tmp_path / "site"
    wall = SimpleNamespace(home=home)
    values = {
        "current": None,
        "inbox": asyncio.Queue(),
        "wall": wall,
        "workdir": workdir,
        "fresh": True,
        "restart": False,
    }
    return SimpleNamespace(**(values | {"batcher": Batcher()} | changes))


async def resume(store: Store, worker: SimpleNamespace, arg: str, room: RoomSettings | None = None) -> Notice:
    room = room or RoomSettings(id="!r:x")
    await Commands(store, Path("/nonexistent")).run(
        "!r:x", room, worker, Prompt("!r:x", "$c", ME, ""), Command("resume", arg)
    )
    (notice,) = worker.batcher.items
    return notice


@pytest.mark.anyio
async def test_resume_takes_up_a_conversation_in_the_rooms_home(tmp_path, store):
    worker = idle_worker(tmp_path)
    write(Transcripts.in_home(worker.wall.home, worker.workdir), ONE, b'{"turn": 1}\n')
    await store.set_session_id("!r:x", TWO)
    await store.add_tool_rule("!r:x", "Bash(git commit *)", ME)

    notice = await resume(store, worker, ONE.upper())
    assert notice.markdown == f"🔁 This room now goes on with conversation `{ONE}`: the next prompt resumes it."
    assert notice.marker == {"resumed": ONE, "command": "$c"} and notice.reply_to == "$c"
    assert await store.session_id("!r:x") == ONE and await store.tool_rules("!r:x") == []
    assert (worker.fresh, worker.restart) == (False, True)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arg", "changes", "room", "says"),
    [
        ("", {}, {}, "Usage: `!resume ID`"),
        ("../../etc/passwd", {}, {}, "⛔ '../../etc/passwd' is not a conversation id"),
        (TWO, {}, {}, f"⛔ This room has no conversation `{TWO}` for its working directory"),
        (ONE, {"current": Prompt("!r:x", "$p", ME, "x")}, {}, "⛔ Not now: a prompt is running."),
        (ONE, {"inbox": "queued"}, {}, "⛔ Not now: 1 queued prompt."),
        (ONE, {}, {"reply_mode": "thread", "session_scope": "thread"}, "⛔ This room keeps a conversation per thread"),
    ],
)
async def test_resume_refuses_and_changes_nothing(tmp_path, store, arg, changes, room, says):
    if changes.get("inbox") == "queued":
        changes["inbox"] = asyncio.Queue()
        changes["inbox"].put_nowait(Prompt("!r:x", "$q", ME, "x"))
    worker = idle_worker(tmp_path, **changes)
    write(Transcripts.in_home(worker.wall.home, worker.workdir), ONE, b'{"turn": 1}\n')
    await store.set_session_id("!r:x", TWO)
    notice = await resume(store, worker, arg, RoomSettings(id="!r:x", **room))
    assert notice.markdown.startswith(says) and "resumed" not in notice.marker
    assert await store.session_id("!r:x") == TWO and worker.restart is False


@pytest.mark.anyio
async def test_resume_in_a_room_without_the_sandbox_looks_in_the_daemons_home(tmp_path, store, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "daemon-home"))
    worker = idle_worker(tmp_path, wall=None)
    write(Transcripts.in_home(tmp_path / "daemon-home", worker.workdir), ONE, b'{"turn": 1}\n')
    assert (await resume(store, worker, ONE)).marker["resumed"] == ONE


@pytest.mark.anyio
async def test_after_resume_the_next_prompt_starts_an_agent_that_resumes_the_adopted_session(tmp_path, store):
    worker, recorder = make_worker(tmp_path, store, fake_claude(tmp_path))

    async def answered(event_id: str, text: str) -> None:
        await worker.inbox.put(Prompt("!room:x", event_id, ME, text))
        async with asyncio.timeout(10):
            assert await recorder.ended.get() == event_id

    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        await answered("$one", "say first")
        first = worker.agent.proc
        await answered("$two", "say second")
        assert worker.agent.proc is first  # without !resume the live agent goes on
        await store.set_session_id("!room:x", ONE)  # what !resume records
        worker.restart = True
        await answered("$three", "argv")
        assert worker.agent.proc is not first and first.returncode is not None
        task.cancel()
    assert worker.restart is False
    argv = json.loads(recorder.output("$three").split("\n")[0])
    assert argv[argv.index("--resume") + 1] == ONE
