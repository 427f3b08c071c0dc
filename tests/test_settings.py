import re
import subprocess
import sys
from pathlib import Path

import pytest

from aiagentchat.settings import (
    NOT_DEFAULTS,
    ClaudeSettings,
    ConfigError,
    DaemonSettings,
    RoomSettings,
    Settings,
    check_safety,
    load_settings,
)

GOOD = """
[matrix]
homeserver = "http://127.0.0.1:8008"
user_id = "@bot:localhost"

[paths]
data_dir = "{data}"

[claude]
timeout_s = 120
allowed_tools = ["Read"]

[[rooms]]
id = "!a:localhost"
allowed_users = ["@alice:localhost"]

[[rooms]]
id = "!b:localhost"
allowed_users = ["@bob:localhost"]
timeout_s = 30
allowed_tools = ["Bash(git:*)"]
workdir = "/srv/b"
"""


def write(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text.replace("{data}", str(tmp_path / "data")))
    path.chmod(mode)
    return path


def test_room_overrides_and_default_workdir(tmp_path):
    settings = load_settings(write(tmp_path, GOOD))
    a, b = settings.rooms
    assert settings.claude_for(a).timeout_s == 120
    assert settings.claude_for(b).timeout_s == 30
    assert settings.claude_for(b).allowed_tools == ["Bash(git:*)"]
    assert settings.claude_for(a).allowed_tools == ["Read"]
    assert settings.workdir_for(b) == Path("/srv/b")
    default = settings.workdir_for(a)
    assert default.parent == tmp_path / "data" / "rooms"
    assert "!" not in default.name and len(default.name) == 24
    assert settings.workdir_for(a) != settings.workdir_for(b)


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("AIAGENTCHAT_CLAUDE__TIMEOUT_S", "7")
    monkeypatch.setenv("AIAGENTCHAT_MATRIX__PASSWORD", "from-env")
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.claude.timeout_s == 7
    assert settings.matrix.password.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings)


def test_log_level_in_any_case_from_the_file_or_the_environment(tmp_path, monkeypatch):
    assert load_settings(None).daemon.log_level == "info"
    assert load_settings(write(tmp_path, '[daemon]\nlog_level = "Warning"\n')).daemon.log_level == "warning"
    monkeypatch.setenv("AIAGENTCHAT_DAEMON__LOG_LEVEL", "DEBUG")
    assert load_settings(write(tmp_path, '[daemon]\nlog_level = "error"\n')).daemon.log_level == "debug"


def test_defaults_without_a_file(monkeypatch):
    monkeypatch.delenv("AIAGENTCHAT_CLAUDE__TIMEOUT_S", raising=False)
    settings = load_settings(None)
    assert settings.claude.timeout_s == 300
    assert settings.claude.binary == "claude"
    assert settings.claude.permission_mode == "default"
    assert "ANTHROPIC_*" in settings.claude.env_passthrough


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[claude]\ntimeout_s = "soon"\n', "settings.toml:2: claude.timeout_s: Input should be a valid number"),
        (
            '[[rooms]]\nid = "!a:x"\n[[rooms]]\nid = "!b:x"\ncolour = 3\n',
            "settings.toml:5: rooms.1.colour: Extra inputs",
        ),
        ('[claude]\npermission_mode = "yolo"\n', "settings.toml:2: claude.permission_mode: Input should be"),
        ("[matrix\n", "invalid TOML"),
        (
            '[daemon]\nlog_level = "loud"\n',
            "settings.toml:2: daemon.log_level: Input should be 'debug', 'info', 'warning' or 'error'",
        ),
        (
            '[[rooms]]\nid = "!a:x"\nsession_scope = "thread"\n',
            'rooms.0: Value error, session_scope = "thread" needs reply_mode = "thread"',
        ),
        (
            '[[rooms]]\nid = "!a:x"\nreply_mode = "thread"\nworktrees = true\n',
            'rooms.0: Value error, worktrees = true needs session_scope = "thread"',
        ),
        ('[[rooms]]\nid = "!a:x"\nmax_parallel = 0\n', "settings.toml:3: rooms.0.max_parallel: Input should be"),
        ('[[rooms]]\nid = "!a:x"\nworktree_idle_days = -1\n', "settings.toml:3: rooms.0.worktree_idle_days"),
        ('[daemon]\nadmins = ["admin"]\n', "settings.toml:2: daemon.admins.0: String should match pattern"),
        ('[daemon]\nadmins = ["@admin"]\n', "daemon.admins.0: String should match pattern"),
        ('[daemon]\nadmins = ["@ad min:x"]\n', "daemon.admins.0: String should match pattern"),
        ('[daemon]\nproject_roots = ["code"]\n', "project_roots: code must be an absolute path"),
        ('[room_defaults]\nid = "!a:x"\n', "room_defaults: Value error, id is set per room"),
        ('[room_defaults]\nworkdir = "/srv"\n', "room_defaults: Value error, workdir is set per room"),
        ('[room_defaults]\nname = "x"\n', "name is set per room"),
        ("[room_defaults]\ncolour = 3\n", "settings.toml:2: room_defaults.colour: Extra inputs"),
        ("[room_defaults]\ntimeout_s = -1\n", "room_defaults.timeout_s: Input should be greater than 0"),
    ],
)
def test_invalid_file_names_key_and_line(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert expected in str(info.value)


def test_password_in_a_readable_file_is_refused(tmp_path):
    text = '[matrix]\nuser_id = "@b:x"\npassword = "pw"\n'
    with pytest.raises(ConfigError, match=r"settings.toml:3: matrix.password is a secret"):
        load_settings(write(tmp_path, text, mode=0o644))
    assert load_settings(write(tmp_path, text, mode=0o600)).matrix.password.get_secret_value() == "pw"


def test_daemon_exits_2_with_one_line_on_a_bad_file(tmp_path):
    path = write(tmp_path, "[claude]\ntimeout_s = -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "aiagentchat", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "settings.toml:2: claude.timeout_s: Input should be greater than 0" in done.stderr


def test_example_settings_file_works_as_is_with_the_built_in_homeserver():
    example = Path(__file__).parent.parent / "settings.toml"
    settings = load_settings(example)
    assert check_safety(settings) == []
    assert settings.matrix.homeserver == ""
    assert settings.claude.permission_mode == "default"


def test_bypass_is_only_per_room_and_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="bypassPermissions .* may only be set per room"):
        check_safety(load_settings(write(tmp_path, '[claude]\npermission_mode = "bypassPermissions"\n')))
    room = '[[rooms]]\nid = "!a:x"\nallowed_users = ["@u:x"]\npermission_mode = "bypassPermissions"\n'
    warnings = check_safety(load_settings(write(tmp_path, room)))
    assert warnings == ["room !a:x runs the agent with bypassPermissions: no tool call is asked"]
    skip = '[[rooms]]\nid = "!a:x"\nextra_args = ["--dangerously-skip-permissions"]\n'
    with pytest.raises(ConfigError, match="--dangerously-skip-permissions is refused"):
        check_safety(load_settings(write(tmp_path, skip)))


def test_workdir_rules(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    two = f'[[rooms]]\nid = "!a:x"\nworkdir = "{shared}"\n[[rooms]]\nid = "!b:x"\nworkdir = "{shared}"\n'
    with pytest.raises(ConfigError, match="share the workdir"):
        check_safety(load_settings(write(tmp_path, two)))
    both = two.replace("\n[[rooms]]", "\nshared_workdir = true\n[[rooms]]") + "shared_workdir = true\n"
    assert check_safety(load_settings(write(tmp_path, both))) == [
        "room !a:x has no allowed_users: no prompt will run there",
        "room !b:x has no allowed_users: no prompt will run there",
    ]
    with pytest.raises(ConfigError, match="must be an absolute path"):
        check_safety(load_settings(write(tmp_path, '[[rooms]]\nid = "!a:x"\nworkdir = "rel"\n')))
    with pytest.raises(ConfigError, match="does not exist"):
        check_safety(load_settings(write(tmp_path, f'[[rooms]]\nid = "!a:x"\nworkdir = "{tmp_path}/nope"\n')))
    around = f'[paths]\ndata_dir = "{tmp_path}/data"\n[[rooms]]\nid = "!a:x"\nworkdir = "{tmp_path}"\n'
    with pytest.raises(ConfigError, match="contains the data directory"):
        check_safety(load_settings(write(tmp_path, around)))


def test_encryption_settings(tmp_path):
    settings = load_settings(write(tmp_path, GOOD))
    assert [(r.trust, r.key_wait_s) for r in settings.rooms] == [("cross_signed", 60.0), ("cross_signed", 60.0)]
    with pytest.raises(
        ConfigError, match=r"settings.toml:3: rooms.0.trust: Input should be 'all', 'tofu', 'cross_signed' or"
    ):
        load_settings(write(tmp_path, '[[rooms]]\nid = "!a:x"\ntrust = "everyone"\n'))
    with pytest.raises(ConfigError, match="matrix.pickle_key is a secret"):
        load_settings(write(tmp_path, '[matrix]\npickle_key = "k"\n'))


@pytest.mark.parametrize("pattern", ["AIAGENTCHAT_*", "*", "AIAGENTCHAT_MATRIX__PICKLE_KEY"])
def test_env_passthrough_may_not_hand_the_daemon_secrets_to_the_agent(tmp_path, pattern):
    text = GOOD.replace("timeout_s = 30\n", f'timeout_s = 30\nenv_passthrough = ["{pattern}"]\n')
    expected = f"room !b:localhost: env_passthrough '{pattern}' would hand the daemon's secret AIAGENTCHAT_MATRIX__"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_safety(load_settings(write(tmp_path, text)))


def test_worktrees_are_off_by_default_and_live_under_the_data_dir_per_room(tmp_path):
    text = '[paths]\ndata_dir = "%s"\n[[rooms]]\nid = "!a:x"\n[[rooms]]\nid = "!b:x"\n' % (tmp_path / "data")
    settings = load_settings(write(tmp_path, text))
    first, second = settings.rooms
    assert (first.worktrees, first.max_parallel, first.worktree_idle_days) == (False, 2, 14)
    assert settings.worktrees_for(first).parent.parent == tmp_path / "data" / "worktrees"
    assert settings.worktrees_for(first) != settings.worktrees_for(second)
    moved = first.model_copy(update={"workdir": tmp_path / "elsewhere"})  # `!project`
    assert settings.worktrees_for(moved).parent == settings.worktrees_for(first).parent
    assert settings.worktrees_for(moved) != settings.worktrees_for(first)


def test_readme_names_every_key_of_each_section_and_the_example_describes_rooms_from_the_chat():
    """README's settings table has a row per section naming each of its keys ([[rooms]] names its own and takes
    the [claude] ones; [room_defaults] names the keys it leaves out); settings.toml sets the [daemon] keys, each
    with a comment, and has a commented [room_defaults] table."""
    root = Path(__file__).parent.parent
    rows = dict(re.findall(r"^\| `(\[+\w+\]+)` \| (.*) \|$", (root / "README.md").read_text(), re.MULTILINE))
    sections = {name: field.annotation for name, field in Settings.model_fields.items() if name != "rooms"}
    for name, model in sections.items():
        keys = NOT_DEFAULTS if name == "room_defaults" else model.model_fields
        assert not [key for key in keys if f"`{key}`" not in rows[f"[{name}]"]], name
    own = [key for key in RoomSettings.model_fields if key not in ClaudeSettings.model_fields]
    assert not [key for key in own if f"`{key}`" not in rows["[[rooms]]"]]
    assert "any `[claude]` key" in rows["[[rooms]]"] and "any `[[rooms]]` key" in rows["[room_defaults]"]
    example = (root / "settings.toml").read_text()
    daemon = example.split("\n[daemon]\n")[1].split("\n[")[0]
    for key in DaemonSettings.model_fields:
        assert re.search(rf"^{key} = .*# \S", daemon, re.MULTILINE), key
    assert re.search(r"^# .*\n\[room_defaults\]\n# \w+ = ", example, re.MULTILINE)
