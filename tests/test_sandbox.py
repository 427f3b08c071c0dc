"""The wall's bwrap command line (what is bound, how, and what is not) and the start-up check of bwrap."""

from pathlib import Path

import pytest

from aiagentchat.runner import cli_arguments
from aiagentchat.sandbox import SYSTEM_PATHS, Wall, check_bwrap, installed_under, prepare_home, wall_for
from aiagentchat.settings import ClaudeSettings, ConfigError, RoomSettings, Settings, check_safety

CLI = "/srv/app/node_modules/@anthropic-ai/claude-code/bin/claude.exe"


def wall(**overrides) -> Wall:
    values = {
        "bwrap": "/usr/bin/bwrap",
        "workdir": Path("/data/rooms/abc"),
        "home": Path("/data/homes/abc"),
        "readonly": (),
        "writable": (),
        "credentials": None,
    }
    return Wall(**(values | overrides))


def mounts(argv: list[str]) -> dict[str, tuple[str, str]]:
    """Each mount's destination → (option, source), from bwrap's argument list (up to `--`)."""
    found = {}
    options = argv[: argv.index("--")]
    for index, word in enumerate(options):
        if word in ("--bind", "--ro-bind", "--ro-bind-try"):
            found[options[index + 2]] = (word, options[index + 1])
        elif word in ("--tmpfs", "--proc", "--dev"):
            found[options[index + 1]] = (word, "")
    return found


def test_the_agent_gets_the_system_read_only_and_its_room_read_write():
    argv = wall().argv([CLI, "-p"])
    bound = mounts(argv)
    for path in SYSTEM_PATHS:
        assert bound[path] == ("--ro-bind-try", path)
    assert bound["/srv/app/node_modules"] == ("--ro-bind", "/srv/app/node_modules")
    assert bound["/data/rooms/abc"] == ("--bind", "/data/rooms/abc")
    assert bound["/data/homes/abc"] == ("--bind", "/data/homes/abc")
    assert bound["/tmp"] == ("--tmpfs", "")
    assert bound["/proc"] == ("--proc", "") and bound["/dev"] == ("--dev", "")
    assert argv[0] == "/usr/bin/bwrap"
    assert argv[argv.index("--chdir") + 1] == "/data/rooms/abc"
    assert argv[argv.index("--") + 1 :] == [CLI, "-p"]


def test_nothing_else_is_there():
    bound = mounts(wall().argv([CLI]))
    assert set(bound) == {*SYSTEM_PATHS, "/tmp", "/proc", "/dev", "/srv/app/node_modules", "/data/rooms/abc",
                          "/data/homes/abc"}
    assert "/data" not in bound and "/root" not in bound and "/home" not in bound and "/run" not in bound


def test_the_agent_has_its_own_processes_and_ends_with_the_daemon_but_keeps_the_network():
    argv = wall().argv([CLI])
    options = argv[: argv.index("--")]
    assert "--unshare-pid" in options and "--die-with-parent" in options
    assert "--unshare-net" not in options and "--unshare-all" not in options
    assert "--new-session" not in options  # the runner's own session is the process group it ends
    assert "--clearenv" not in options and "--setenv" not in options  # the environment is the runner's, filtered


def test_private_tmp_comes_before_the_rooms_binds_that_may_live_under_it():
    argv = wall(workdir=Path("/tmp/x/rooms/abc"), home=Path("/tmp/x/homes/abc")).argv([CLI])
    tmpfs = argv.index("--tmpfs")
    assert tmpfs < argv.index("/tmp/x/rooms/abc") and tmpfs < argv.index("/tmp/x/homes/abc")


def test_the_login_is_bound_read_only_into_the_rooms_home():
    login = Path("/root/.claude/.credentials.json")
    bound = mounts(wall(credentials=login).argv([CLI]))
    assert bound["/data/homes/abc/.claude/.credentials.json"] == ("--ro-bind", str(login))
    assert "/root/.claude" not in bound and "/root" not in bound


def test_installed_under_is_the_outermost_node_modules_or_the_binary_folder():
    assert installed_under(Path(CLI)) == Path("/srv/app/node_modules")
    assert installed_under(Path("/home/u/.local/share/claude/versions/2.1.197")) == Path(
        "/home/u/.local/share/claude/versions"
    )


def test_paths_the_settings_add_are_bound_as_they_say():
    bound = mounts(wall(readonly=(Path("/srv/tools"),), writable=(Path("/srv/shared"),)).argv([CLI]))
    assert bound["/srv/tools"] == ("--ro-bind", "/srv/tools")
    assert bound["/srv/shared"] == ("--bind", "/srv/shared")


def test_wall_for_binds_the_settings_paths_and_a_login_only_when_there_is_one(tmp_path):
    daemon_home = tmp_path / "daemon"
    mcp = tmp_path / "mcp.json"
    mcp.write_text("{}")
    claude = ClaudeSettings(mcp_config=mcp, sandbox_readonly=[Path("/srv/tools")], sandbox_writable=[Path("/srv/x")])
    built = wall_for(claude, tmp_path / "w", tmp_path / "h", daemon_home)
    assert mcp in built.readonly and Path("/srv/tools") in built.readonly
    assert built.writable == (Path("/srv/x"),)
    assert built.credentials is None
    (daemon_home / ".claude").mkdir(parents=True)
    (daemon_home / ".claude" / ".credentials.json").write_text("{}")
    assert wall_for(claude, tmp_path / "w", tmp_path / "h", daemon_home).credentials == (
        daemon_home / ".claude" / ".credentials.json"
    )


def test_the_rooms_home_is_private(tmp_path):
    home = tmp_path / "homes" / "abc"
    prepare_home(wall(home=home))
    assert (home / ".claude").is_dir()
    assert home.stat().st_mode & 0o777 == 0o700


def test_the_cli_reads_only_the_settings_sources_and_mcp_config_it_is_given(tmp_path):
    args = cli_arguments(ClaudeSettings(), None)
    assert args[args.index("--setting-sources") + 1] == ""
    assert "--strict-mcp-config" in args and "--mcp-config" not in args
    mcp = tmp_path / "mcp.json"
    args = cli_arguments(ClaudeSettings(setting_sources=["user", "project"], mcp_config=mcp), None)
    assert args[args.index("--setting-sources") + 1] == "user,project"
    assert args[args.index("--mcp-config") + 1] == str(mcp)


def test_sandbox_is_on_by_default_and_may_be_turned_off_per_room():
    settings = Settings(rooms=[RoomSettings(id="!a:x"), RoomSettings(id="!b:x", sandbox="off")])
    assert [settings.claude_for(room).sandbox for room in settings.rooms] == ["bwrap", "off"]
    assert settings.home_for(settings.rooms[0]) != settings.home_for(settings.rooms[1])


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_start_up_refuses_when_bwrap_is_missing_or_cannot_run(tmp_path, monkeypatch):
    settings = Settings(rooms=[RoomSettings(id="!a:x")])
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="needs bwrap, which is not on PATH; install bubblewrap"):
        check_bwrap(settings)
    executable(tmp_path / "bwrap", "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    with pytest.raises(ConfigError, match='No permissions to creating new namespace; .* sandbox = "off"'):
        check_bwrap(settings)
    executable(tmp_path / "bwrap", "#!/bin/sh\nexit 0\n")
    check_bwrap(settings)


def test_start_up_refuses_a_container_that_masks_proc_and_says_how_to_run_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    refusing = "#!/bin/sh\ncase \"$*\" in *'--proc /proc'*) echo 'bwrap: Can'\\''t mount proc on /newroot/proc: "
    executable(tmp_path / "bwrap", refusing + "Operation not permitted' >&2; exit 1;; esac\nexit 0\n")
    with pytest.raises(ConfigError, match=r"mount proc .*--security-opt 'unmask=/proc/\*'"):
        check_bwrap(Settings(rooms=[RoomSettings(id="!a:x")]))


def test_start_up_checks_bwrap_for_the_built_in_room_and_rooms_an_admin_may_make_from_the_chat(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    own = {"homeserver": "https://matrix.example.org", "user_id": "@bot:example.org"}
    admins = {"admins": ["@admin:x"]}
    check_bwrap(Settings(matrix=own, daemon=admins, room_defaults={"sandbox": "off"}))
    check_bwrap(Settings(matrix=own, room_defaults={}))  # no admin: no room can be made from the chat
    with pytest.raises(ConfigError, match="needs bwrap, which is not on PATH"):
        check_bwrap(Settings(matrix=own, daemon=admins))
    with pytest.raises(ConfigError, match="needs bwrap, which is not on PATH"):
        check_bwrap(Settings())  # the built-in homeserver's room "local"
    check_bwrap(Settings(claude={"sandbox": "off"}))


def test_start_up_does_not_need_bwrap_when_every_room_opts_out(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    own = {"homeserver": "https://matrix.example.org", "user_id": "@bot:example.org"}
    check_bwrap(Settings(matrix=own, rooms=[RoomSettings(id="!a:x", sandbox="off")]))
    check_bwrap(Settings(claude=ClaudeSettings(sandbox="off"), rooms=[RoomSettings(id="!a:x")]))


def test_the_mcp_config_must_name_a_file(tmp_path):
    settings = Settings(rooms=[RoomSettings(id="!a:x", mcp_config=Path("mcp.json"))])
    with pytest.raises(ConfigError, match="mcp_config mcp.json must be the absolute path of a file"):
        check_safety(settings)


def test_a_sandbox_path_must_exist_and_must_not_show_the_data_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for paths, message in (
        ([tmp_path / "missing"], "must be an absolute path that exists"),
        ([data], "would show the agent aiagentchat's data directory"),
        ([tmp_path], "would show the agent aiagentchat's data directory"),
    ):
        settings = Settings(paths={"data_dir": data}, rooms=[RoomSettings(id="!a:x", sandbox_writable=paths)])
        with pytest.raises(ConfigError, match=message):
            check_safety(settings)
