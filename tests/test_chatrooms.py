"""Rooms made from the chat: their settings, the admin commands' arguments (every one chosen by whoever typed it)
and what each command changes, records and answers (no homeserver: a fake daemon and a real database)."""

import asyncio
import contextlib
import json
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nio import JoinedRoomsResponse, JoinError, JoinResponse
from typer.testing import CliRunner

from aiagentchat import cchat, intake
from aiagentchat.bot import Bot
from aiagentchat.chatrooms import Refused, RoomAdmin, project_dir, sources, tool_names, user_id
from aiagentchat.commands import Command, Commands
from aiagentchat.private import Credentials
from aiagentchat.settings import ConfigError, Settings, check_safety, load_settings
from aiagentchat.store import Prompt, Store
from aiagentchat.storedrooms import stored_rooms
from tests.test_intake import Approvals, event, text
from tests.test_settings import write

pytestmark = pytest.mark.anyio
ADMIN, ALICE, BOB = "@admin:x", "@alice:x", "@bob:x"
ROOM_ID = "!chat:x"


# --- settings -------------------------------------------------------------------------------------------------


def test_room_defaults_admins_and_project_roots_are_read_from_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "code").mkdir()
    path = write(
        tmp_path,
        '[paths]\ndata_dir = "{data}"\n[daemon]\nadmins = ["@admin:x"]\nproject_roots = ["~/code"]\n'
        '[room_defaults]\ntimeout_s = 45\nunlisted_tools = "deny"\nallowed_tools = ["Read"]\n',
    )
    settings = load_settings(path)
    assert settings.daemon.admins == [ADMIN] and settings.daemon.project_roots == [tmp_path / "code"]
    room = settings.room_defaults.room(ROOM_ID, {"allowed_users": [ALICE]})
    assert (room.id, room.allowed_users, room.timeout_s, room.unlisted_tools) == (ROOM_ID, [ALICE], 45, "deny")
    assert settings.claude_for(room).allowed_tools == ["Read"]
    assert settings.workdir_for(room) == tmp_path / "data" / "rooms" / settings.workdir_for(room).name
    check_safety(settings)


def test_without_settings_nobody_is_an_admin_and_no_project_root_exists():
    settings = Settings()
    assert settings.daemon.admins == [] and settings.daemon.project_roots == []
    assert settings.room_defaults.room(ROOM_ID, {}).allowed_users == []


def test_project_roots_must_exist_and_stay_apart_from_the_data_directory(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        check_safety(load_settings(write(tmp_path, f'[daemon]\nproject_roots = ["{tmp_path}/none"]\n')))
    with pytest.raises(ConfigError, match="overlap"):
        overlapping = f'[paths]\ndata_dir = "{{data}}"\n[daemon]\nproject_roots = ["{tmp_path}"]\n'
        check_safety(load_settings(write(tmp_path, overlapping)))


def test_room_defaults_are_checked_like_a_configured_room(tmp_path):
    settings = load_settings(write(tmp_path, '[room_defaults]\nextra_args = ["--dangerously-skip-permissions"]\n'))
    with pytest.raises(ConfigError, match="room room_defaults: --dangerously-skip-permissions is refused"):
        check_safety(settings)
    settings = load_settings(write(tmp_path, '[room_defaults]\nenv_passthrough = ["AIAGENTCHAT_*"]\n'))
    with pytest.raises(ConfigError, match="would hand the daemon's secret"):
        check_safety(settings)
    settings = load_settings(write(tmp_path, '[room_defaults]\npermission_mode = "bypassPermissions"\n'))
    assert check_safety(settings) == ["room room_defaults runs the agent with bypassPermissions: no tool call is asked"]


# --- arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["@bob:x", "@bob.smith:matrix.example.org", "@b_o-b=/x:host:8448"])
def test_a_user_id_is_one_full_matrix_id(good):
    assert user_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "bob", "@bob", "bob:x", "@bob:x @eve:x", "@bob :x", "@:x", "#room:x", "@b:" + "x" * 300]
)
def test_anything_else_is_refused_as_a_user_id(bad):
    with pytest.raises(Refused, match="is not a Matrix user id"):
        user_id(bad)


@pytest.mark.parametrize(
    ("argument", "tools"),
    [
        ("Read", ["Read"]),
        ("Read, Edit  Write", ["Read", "Edit", "Write"]),
        ("Bash(git status:*) Read", ["Bash(git status:*)", "Read"]),
        (
            "mcp__files__read_file,WebFetch(domain:example.org)",
            ["mcp__files__read_file", "WebFetch(domain:example.org)"],
        ),
    ],
)
def test_tool_names(argument, tools):
    assert tool_names(argument) == tools


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("", "name at least one tool"),
        (" , ", "name at least one tool"),
        ("rm -rf", "`-rf` is not a tool name"),
        ("Bash(git status:*", "`Bash(git` is not a tool name"),
        ("Read)", "`Read)` is not a tool name"),
        ("Bash(a)(b)", "is not a tool name"),
        ("`Read`", "is not a tool name"),
        (" ".join(["Read"] * 101), "at most 100 tools"),
    ],
)
def test_bad_tool_names_are_refused(argument, reason):
    with pytest.raises(Refused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        tool_names(argument)


@pytest.fixture
def tree(tmp_path):
    """Two project roots, a place outside them, links out of and into a root, and the data directory."""
    roots = [tmp_path / "code", tmp_path / "more"]
    for root in roots:
        (root / "site" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "code" / "escape").symlink_to(tmp_path / "outside")
    (tmp_path / "code" / "inner").symlink_to(tmp_path / "more" / "site")
    (tmp_path / "outside" / "back").symlink_to(tmp_path / "code" / "site")
    (tmp_path / "code" / "file.txt").write_text("x")
    data = tmp_path / "data"
    data.mkdir()
    return SimpleNamespace(root=tmp_path, roots=roots, data=data)


def test_a_project_inside_a_root_is_taken_resolved(tree):
    code, more = tree.roots
    assert project_dir(f"{code}/site", tree.roots, tree.data) == code / "site"
    assert project_dir(f"{code}/site/sub/..", tree.roots, tree.data) == code / "site"
    assert project_dir(str(code), tree.roots, tree.data) == code
    assert project_dir(f"{code}/inner", tree.roots, tree.data) == more / "site"  # a link from one root to another
    assert project_dir(f"{tree.root}/outside/back", tree.roots, tree.data) == code / "site"  # it leads back in


def test_a_project_under_the_daemons_home_is_named_with_a_tilde(tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tree.root))
    assert project_dir("~/code/site", tree.roots, tree.data) == tree.roots[0] / "site"


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("{root}/outside", "is outside the project roots"),
        ("{root}/code/../outside", "is outside the project roots"),
        ("{root}/code/site/../../outside", "is outside the project roots"),
        ("{root}/code/escape", "(it leads to `{root}/outside`) is outside the project roots"),
        ("{root}/code/escape/..", "is outside the project roots"),
        ("/", "is outside the project roots"),
        ("{root}/code/missing", "does not exist"),
        ("{root}/code/file.txt", "is not a directory"),
        ("code/site", "is not an absolute path"),
        ("../code", "is not an absolute path"),
        ("{root}/code/site\x00/x", "does not exist"),
    ],
)
def test_a_project_elsewhere_is_refused_with_the_reason(tree, argument, reason):
    with pytest.raises(Refused) as info:
        project_dir(argument.format(root=tree.root), tree.roots, tree.data)
    assert reason.format(root=tree.root) in str(info.value)


def test_a_project_that_holds_or_lies_in_the_data_directory_is_refused(tree):
    site = tree.roots[0] / "site"
    for data in (site / "sub", site, site / "sub" / "deeper"):
        with pytest.raises(Refused, match="overlaps the daemon's data directory"):
            project_dir(str(site / "sub" if data != site / "sub" / "deeper" else site), tree.roots, data)


def test_a_link_loop_is_refused(tree):
    loop = tree.roots[0] / "loop"
    loop.symlink_to(loop)
    with pytest.raises(Refused, match="does not exist"):
        project_dir(str(loop), tree.roots, tree.data)


def test_without_project_roots_project_is_off(tree):
    with pytest.raises(Refused, match="no `project_roots`"):
        project_dir(str(tree.roots[0]), [], tree.data)


# --- the intake ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["!allow @bob:x", "!deny @alice:x", "!tools", "!project /", "!leave"])
def test_an_admin_not_in_allowed_users_may_run_admin_commands_only(body):
    room = Settings().room_defaults.room(ROOM_ID, {"allowed_users": [ALICE]})

    def decide(body: str, admin: bool) -> intake.Decision:
        incoming = intake.read(event(text(body), sender=ADMIN))
        return intake.decide(room, incoming, intake.RoomState("@bot:x", False, 0, Approvals(), admin))

    assert isinstance(decide(body, admin=True), intake.RunCommand)
    assert decide(body, admin=False) == intake.Refuse("sender not in allowed_users")
    assert decide("say hi", admin=True) == intake.Refuse("sender not in allowed_users")  # a prompt: no
    assert decide("!status", admin=True) == intake.Refuse("sender not in allowed_users")  # not an admin command


# --- the commands -------------------------------------------------------------------------------------------------


class Host:
    """The daemon as the admin commands see it: its rooms made from the chat, their directories, what left."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.chat: dict[str, dict[str, Any]] = {ROOM_ID: {"allowed_users": [ALICE]}}
        self.changed: list[tuple[str, dict[str, Any]]] = []
        self.left: list[str] = []
        self.dirs: dict[Path, str] = {}

    def chat_settings(self, room_id: str) -> dict[str, Any] | None:
        return self.chat.get(room_id)

    async def change(self, room_id: str, chat: dict[str, Any]) -> None:
        self.chat[room_id] = chat
        self.changed.append((room_id, chat))

    def workdirs(self) -> dict[Path, str]:
        return self.dirs

    def leave(self, room_id: str) -> None:
        self.left.append(room_id)


class Worker:
    def __init__(self) -> None:
        self.said: list[Any] = []
        self.current: Prompt | None = None
        self.inbox: asyncio.Queue[Prompt] = asyncio.Queue()
        self.batcher = SimpleNamespace(put=self._put)
        self.in_threads = (0, 0)  # prompts running and queued in the lanes of threads with worktrees

    def running(self) -> list[Any]:
        return [self] * (self.current is not None) + [object()] * self.in_threads[0]

    def queued(self) -> int:
        return self.inbox.qsize() + self.in_threads[1]

    async def _put(self, item: Any) -> None:
        self.said.append(item)


@pytest.fixture
def admin(tree, store):
    settings = Settings(
        paths={"data_dir": tree.data},
        daemon={"admins": [ADMIN], "project_roots": tree.roots},
        room_defaults={"timeout_s": 45, "allowed_tools": ["Read"]},
    )
    host = Host(settings)
    return SimpleNamespace(settings=settings, host=host, admin=RoomAdmin(settings, store, host), store=store)


async def answer(admin, body: str, sender: str = ADMIN, room_id: str = ROOM_ID, worker: Worker | None = None) -> str:
    """Run one admin command in the room (with its current settings); the room's answer."""
    worker = worker or Worker()
    chat = admin.host.chat.get(room_id, {})
    room = admin.settings.room_defaults.room(room_id, chat)
    word, _, argument = body.removeprefix("!").partition(" ")
    asked = Prompt(room_id, f"$e{len(admin.host.changed)}", sender, body, thread="$root")
    await admin.admin.run(room_id, room, worker, asked, Command(word, argument.strip()))
    (notice,) = worker.said
    assert notice.reply_to == asked.event_id and notice.thread == "$root"
    return notice.markdown


async def test_allow_and_deny_change_who_may_prompt_and_are_recorded(admin):
    assert "@bob:x may now prompt" in await answer(admin, "!allow @bob:x")
    assert admin.host.chat[ROOM_ID]["allowed_users"] == [ALICE, BOB]
    assert "may prompt here already" in await answer(admin, "!allow @bob:x")
    assert "may no longer prompt" in await answer(admin, "!deny @alice:x")
    assert admin.host.chat[ROOM_ID]["allowed_users"] == [BOB]
    assert "may not prompt here already" in await answer(admin, "!deny @alice:x")
    assert "is not a Matrix user id" in await answer(admin, "!allow alice")
    assert "is not a Matrix user id" in await answer(admin, "!allow")
    assert [(c.command, c.detail) for c in await admin.store.room_changes(ROOM_ID)] == [
        ("deny", ALICE),
        ("allow", BOB),
    ]


async def test_the_commands_are_for_admins_in_rooms_made_from_the_chat(admin):
    for body in ("!allow @bob:x", "!deny @alice:x", "!tools", "!project /", "!leave"):
        refused = await answer(admin, body, sender=ALICE)
        assert f"`!{body[1:].split()[0]}` is for the daemon's admins" in refused
        configured = await answer(admin, body, room_id="!file:x")
        assert "configured in settings.toml" in configured
    assert admin.host.changed == [] and admin.host.left == []
    assert await admin.store.room_changes(ROOM_ID) == []


async def test_tools_shows_and_changes_the_lists(admin):
    shown = await answer(admin, "!tools")
    assert "**Run without asking:** `Read`" in shown and "**Always refused:** none" in shown
    changed = await answer(admin, "!tools allow Bash(git status:*), Edit")
    assert "**Run without asking:** `Read`, `Bash(git status:*)`, `Edit`" in changed
    changed = await answer(admin, "!tools deny Edit WebFetch")
    assert "**Run without asking:** `Read`, `Bash(git status:*)`\n" in changed
    assert "**Always refused:** `Edit`, `WebFetch`" in changed
    assert "**Always refused:** `WebFetch`" in await answer(admin, "!tools remove Edit")
    assert admin.host.chat[ROOM_ID]["disallowed_tools"] == ["WebFetch"]
    reset = await answer(admin, "!tools reset")
    assert "**Run without asking:** `Read`\n" in reset and "allowed_tools" not in admin.host.chat[ROOM_ID]
    assert "is not known" in await answer(admin, "!tools grant Read")
    assert "is not a tool name" in await answer(admin, "!tools allow rm -rf /")
    assert "takes no tool names" in await answer(admin, "!tools reset Read")
    assert [c.command for c in await admin.store.room_changes(ROOM_ID)] == ["tools"] * 4


async def test_project_moves_the_room_within_the_roots_only(admin, tree):
    site = tree.roots[0] / "site"
    default = admin.settings.workdir_for(admin.settings.room_defaults.room(ROOM_ID, {}))
    assert f"Working directory: `{default}`" in await answer(admin, "!project")
    assert "outside the project roots" in await answer(admin, f"!project {tree.root}/code/escape")
    admin.host.dirs = {site: "!other:x"}
    assert "already the working directory of room !other:x" in await answer(admin, f"!project {site}")
    admin.host.dirs = {}
    busy = Worker()
    busy.current = Prompt(ROOM_ID, "$running", ALICE, "work")
    assert "prompts are running or queued" in await answer(admin, f"!project {site}", worker=busy)
    for threads in ((1, 0), (0, 1)):  # a thread running or waiting in its own worktree
        busy = Worker()
        busy.in_threads = threads
        assert "prompts are running or queued" in await answer(admin, f"!project {site}", worker=busy)
    assert admin.host.changed == []
    assert "starts a new conversation there" in await answer(admin, f"!project {site}/sub/..")
    assert admin.host.chat[ROOM_ID]["workdir"] == str(site)
    assert "is this room's working directory already" in await answer(admin, f"!project {site}")
    assert [(c.command, c.detail) for c in await admin.store.room_changes(ROOM_ID)] == [("project", str(site))]


async def test_leave_forgets_the_room_only_when_nothing_runs(admin):
    await admin.store.add_chat_room(ROOM_ID, ADMIN, {"allowed_users": [ALICE]})
    waiting = Worker()
    waiting.inbox.put_nowait(Prompt(ROOM_ID, "$queued", ALICE, "later"))
    assert "running or queued" in await answer(admin, "!leave", worker=waiting)
    for threads in ((1, 0), (0, 1)):  # a thread running or waiting in its own worktree
        busy = Worker()
        busy.in_threads = threads
        assert "running or queued" in await answer(admin, "!leave", worker=busy)
    assert "takes no argument" in await answer(admin, "!leave now")
    assert admin.host.left == [] and await admin.store.chat_room(ROOM_ID) is not None
    goodbye = await answer(admin, "!leave")
    assert "Leaving this room" in goodbye and "stays" in goodbye
    assert admin.host.left == [ROOM_ID] and await admin.store.chat_room(ROOM_ID) is None


async def test_status_names_where_each_setting_comes_from(admin, tree):
    settings = admin.settings
    chat = {"allowed_users": [ALICE], "workdir": str(tree.roots[0])}
    room = settings.room_defaults.room(ROOM_ID, chat)
    lines = sources(settings, room, chat)
    assert f"  - `allowed_users` = `{ALICE}` (chat)" in lines
    assert f"  - `workdir` = `{tree.roots[0]}` (chat)" in lines
    assert "  - `allowed_tools` = `Read` (room_defaults)" in lines
    assert "  - `disallowed_tools` = none ([claude])" in lines
    assert "  - `timeout_s` = `45.0` (room_defaults)" in lines
    default = sources(settings, settings.room_defaults.room(ROOM_ID, {}), {})
    assert any(line.startswith("  - `workdir` = ") and line.endswith("(built-in default)") for line in default)
    assert sources(settings, room, None) == ["- **Settings:** from settings.toml"]


ADMIN_HELP = [
    "- `!allow @USER`: let USER prompt in this room",
    "- `!deny @USER`: take USER's right to prompt here away",
    "- `!tools`: the tools run without asking and those always refused; `tools allow|deny|remove TOOL…`, `tools reset`",
    "- `!project PATH`: make PATH (under the daemon's project_roots) this room's working directory; a new conversation",
    "- `!leave`: the bot leaves this room and forgets it; its working directory stays",
]


async def test_help_lists_the_admin_commands_to_an_admin_of_a_room_made_from_the_chat_only(admin, store, tmp_path):
    commands = Commands(store, tmp_path, admin_commands=admin.admin.commands_for)

    async def helped(sender: str, room_id: str = ROOM_ID, word: str = "help") -> list[str]:
        room = admin.settings.room_defaults.room(room_id, admin.host.chat.get(room_id, {}))
        notice = await commands.answer(room_id, room, Worker(), sender, Command(word, ""))
        return notice.markdown.splitlines()

    shown = await helped(ADMIN)
    assert shown[shown.index(ADMIN_HELP[0]) - 1].startswith("**Admin commands**")
    assert [line for line in shown if line in ADMIN_HELP] == ADMIN_HELP
    assert "- `!status`: the running prompt, the queue, the session, the model and today's cost" in shown
    assert [line for line in await helped(ADMIN, word="nosuch") if line in ADMIN_HELP] == ADMIN_HELP
    for sender, room_id in ((ALICE, ROOM_ID), (ADMIN, "!file:x")):  # not an admin; a room of settings.toml
        lines = await helped(sender, room_id)
        assert "- `!status`: the running prompt, the queue, the session, the model and today's cost" in lines
        assert not any("Admin commands" in line or "`!allow" in line or "`!leave" in line for line in lines)


async def test_the_daemons_help_asks_its_room_admin(tmp_path, store):
    settings = Settings(
        matrix={"homeserver": "http://127.0.0.1:9", "user_id": "@bot:x"},
        paths={"data_dir": tmp_path / "data"},
        daemon={"admins": [ADMIN]},
    )
    bot = Bot(settings, store)
    try:
        bot.chat[ROOM_ID] = {"allowed_users": [ADMIN]}
        room = settings.room_defaults.room(ROOM_ID, bot.chat[ROOM_ID])
        for sender, listed in ((ADMIN, True), (ALICE, False)):
            notice = await bot.commands.answer(ROOM_ID, room, Worker(), sender, Command("help", ""))
            assert (ADMIN_HELP[-1] in notice.markdown.splitlines()) is listed
    finally:
        await bot.client.close()
        bot.device_lock.release()


def test_nothing_in_a_command_reaches_outside_its_checks(tree):
    """A NUL byte, a very long path and a path through a file are refused with a reason, never raised."""
    for argument in ("/\x00", "/" + "a" * 5000, f"{tree.root}/code/file.txt/x"):
        with pytest.raises(Refused):
            project_dir(argument, tree.roots, tree.data)
    assert os.path.isdir(tree.roots[0])


async def test_a_stored_project_outside_todays_roots_falls_back_to_the_rooms_own_directory(tree, store):
    code, more = tree.roots
    settings = Settings(
        matrix={"homeserver": "http://127.0.0.1:9", "user_id": "@bot:x"},
        paths={"data_dir": tree.data},
        daemon={"project_roots": [code]},
    )
    bot = Bot(settings, store)
    try:
        kept = {"allowed_users": [ALICE], "workdir": str(code / "site")}
        assert bot._checked_chat(ROOM_ID, kept) == kept
        assert bot._checked_chat(ROOM_ID, {"allowed_users": [ALICE], "workdir": str(more / "site")}) == {
            "allowed_users": [ALICE]
        }
    finally:
        await bot.client.close()
        bot.device_lock.release()


def test_cchat_rooms_lists_the_stored_rooms_that_the_file_does_not_configure(tmp_path):
    async def stored() -> None:
        store = await Store.open(tmp_path / "data" / "aiagentchat.db")
        await store.add_chat_room("!file:x", ADMIN, {"allowed_users": [ADMIN]})
        await store.add_chat_room("!chat:x", ADMIN, {"allowed_users": [ALICE, BOB], "name": "site\x1b[2J"})
        await store.close()

    asyncio.run(stored())
    settings = load_settings(write(tmp_path, '[paths]\ndata_dir = "{data}"\n[[rooms]]\nid = "!file:x"\n'))
    assert cchat.stored_rooms(settings) == [
        {"name": "site\x1b[2J", "id": "!chat:x", "allowed_users": [ALICE, BOB], "stored": True}
    ]
    result = CliRunner().invoke(cchat.app, ["rooms", "--config", str(tmp_path / "settings.toml")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["-\t!file:x\t-", f"site\t!chat:x\t{ALICE},{BOB}\tstored"]
    listed = CliRunner().invoke(cchat.app, ["rooms", "--json", "--config", str(tmp_path / "settings.toml")])
    assert json.loads(listed.stdout)[1]["stored"] is True
    empty = load_settings(write(tmp_path, f'[paths]\ndata_dir = "{tmp_path}/none"\n'))
    assert cchat.stored_rooms(empty) == []


def keep(tmp_path: Path, *rooms: tuple[str, dict[str, Any]]) -> None:
    """Rooms made from the chat, in the database of a daemon whose data dir is tmp_path/data."""

    async def add() -> None:
        store = await Store.open(tmp_path / "data" / "aiagentchat.db")
        for room_id, chat in rooms:
            await store.add_chat_room(room_id, ADMIN, chat)
        await store.close()

    asyncio.run(add())


FILE_ROOM = '[paths]\ndata_dir = "{data}"\n[[rooms]]\nid = "!work:x"\nname = "work"\nallowed_users = ["@bob:x"]\n'


def test_cchat_finds_a_stored_room_by_its_name_or_id_unless_the_file_has_that_name(tmp_path):
    (tmp_path / "code" / "site").mkdir(parents=True)
    keep(
        tmp_path,
        ("!site:x", {"allowed_users": [ALICE], "name": "site"}),
        ("!other:x", {"allowed_users": [ALICE], "name": "work"}),
        ("!moved:x", {"allowed_users": [ALICE], "name": "moved", "workdir": str(tmp_path / "code" / "site")}),
    )
    settings = load_settings(write(tmp_path, FILE_ROOM))
    site = cchat.lookup_room(settings, "site")
    assert (site.id, site.allowed_users) == ("!site:x", [ALICE])
    assert cchat.lookup_room(settings, "!site:x").name == "site"  # by its id too: cchat knows who may prompt there
    assert cchat.lookup_room(settings, "work").id == "!work:x"  # settings.toml wins
    assert cchat.lookup_room(settings, "nope") is None and cchat.lookup_room(settings, "!nope:x") is None
    moved = cchat.lookup_room(settings, "moved")  # no project_roots today: served in its own directory, as the daemon
    assert settings.workdir_for(moved).parent == tmp_path / "data" / "rooms"
    rooted = load_settings(write(tmp_path, FILE_ROOM + f'[daemon]\nproject_roots = ["{tmp_path / "code"}"]\n'))
    assert rooted.workdir_for(cchat.lookup_room(rooted, "moved")) == tmp_path / "code" / "site"
    assert cchat.lookup_room(load_settings(write(tmp_path, f'[paths]\ndata_dir = "{tmp_path}/none"\n')), "site") is None


def test_cchat_commands_take_a_stored_rooms_name_and_refuse_an_ambiguous_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CCHAT_CONFIG_DIR", str(tmp_path / "cchat"))
    for variable in ("AIAGENTCHAT_CONFIG", "AIAGENTCHAT_HOPS", "CCHAT_BOT"):
        monkeypatch.delenv(variable, raising=False)
    Credentials("http://127.0.0.1:9", BOB, "DEV", "tok").save(tmp_path / "cchat" / "credentials.json")
    keep(
        tmp_path,
        ("!site:x", {"allowed_users": [ALICE], "name": "site"}),
        ("!a:x", {"allowed_users": [BOB], "name": "twin"}),
        ("!b:x", {"allowed_users": [BOB], "name": "twin"}),
    )
    config = str(write(tmp_path, FILE_ROOM))
    sent = CliRunner().invoke(cchat.app, ["send", "site", "say hi", "--config", config])
    assert (sent.exit_code, sent.stdout) == (4, "")  # found, with its allowed users: Bob is not one; nothing sent
    assert sent.stderr == f"cchat: {BOB} is not in allowed_users or allowed_bots of site; nothing sent\n"
    ambiguous = "cchat: 2 rooms made from the chat are named 'twin': !a:x, !b:x; give its id\n"
    for command in (["send", "twin", "say hi"], ["tail", "twin", "--bot", "@bot:x"], ["handback", "twin"]):
        refused = CliRunner().invoke(cchat.app, [*command, "--config", config])
        assert (refused.exit_code, refused.stdout, refused.stderr) == (2, "", ambiguous), command


async def test_stored_rooms_are_read_beside_a_running_daemon_and_leave_no_file_behind(tmp_path):
    settings = load_settings(write(tmp_path, FILE_ROOM))
    assert stored_rooms(settings) == []  # no database yet
    store = await Store.open(settings.database)
    try:
        assert stored_rooms(settings) == []
        await store.add_chat_room("!work:x", ADMIN, {"allowed_users": [ALICE]})  # the file's: it wins
        await store.add_chat_room(ROOM_ID, ADMIN, {"allowed_users": [ALICE], "name": "site"})
        await store.add_chat_room("!odd:x", ADMIN, {"allowed_users": [ALICE]})
        await store.set_chat_room("!odd:x", {"max_queued": -1}, ADMIN, "test", "")
        (found, odd) = stored_rooms(settings)  # while the daemon runs: its writes are in the -wal file
        assert (found.room_id, found.room.name, found.room.allowed_users, found.problem) == (
            ROOM_ID,
            "site",
            [ALICE],
            "",
        )
        assert (odd.room, odd.problem) == (None, "max_queued: Input should be greater than or equal to 0")
    finally:
        await store.close()
    files = sorted(settings.paths.data_dir.iterdir())
    assert [entry.room_id for entry in stored_rooms(settings)] == [ROOM_ID, "!odd:x"]
    assert sorted(settings.paths.data_dir.iterdir()) == files  # no -wal or -shm of cchat's or doctor's user
    with contextlib.closing(sqlite3.connect(settings.database)) as db:  # a database from before rooms from the chat
        db.execute("DROP TABLE chat_rooms")
    assert stored_rooms(settings) == []
    settings.database.write_bytes(b"garbage" * 100)
    with pytest.raises(sqlite3.Error):
        stored_rooms(settings)


async def test_at_start_up_the_stored_rooms_are_served_unless_the_file_configures_them(tmp_path, store):
    settings = Settings(
        matrix={"homeserver": "http://127.0.0.1:9", "user_id": "@bot:x"},
        paths={"data_dir": tmp_path / "data"},
        rooms=[{"id": "!file:x", "allowed_users": [BOB], "timeout_s": 5}],
        room_defaults={"timeout_s": 45},
    )
    await store.add_chat_room("!file:x", ADMIN, {"allowed_users": [ALICE]})
    await store.add_chat_room(ROOM_ID, ADMIN, {"allowed_users": [ALICE]})
    await store.add_chat_room("!gone:x", ADMIN, {"allowed_users": [ALICE]})
    bot = Bot(settings, store)
    joins: list[str] = []

    async def joined_rooms() -> JoinedRoomsResponse:
        return JoinedRoomsResponse(["!file:x", ROOM_ID])

    async def join(room_id: str) -> JoinResponse | JoinError:
        joins.append(room_id)
        return JoinError("M_FORBIDDEN: not invited")

    bot.client.joined_rooms, bot.client.join = joined_rooms, join
    try:
        await bot._resolve_rooms()
        assert (bot.rooms["!file:x"].allowed_users, bot.rooms["!file:x"].timeout_s) == ([BOB], 5)
        assert (bot.rooms[ROOM_ID].allowed_users, bot.rooms[ROOM_ID].timeout_s) == ([ALICE], 45)
        assert bot.chat_settings("!file:x") is None and bot.chat_settings(ROOM_ID) == {"allowed_users": [ALICE]}
        assert joins == ["!gone:x"]  # the bot was no longer in it: it tries to join again
    finally:
        await bot.client.close()
        bot.device_lock.release()
