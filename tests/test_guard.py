from pathlib import Path

import pytest

from aiagentchat.guard import MAX_LINKS, ToolGuard, command_words, names_of


@pytest.fixture
def guard(tmp_path: Path) -> ToolGuard:
    data = tmp_path / "data"
    work = data / "rooms" / "abc"
    work.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return ToolGuard(data, work)


def filled(guard: ToolGuard, tool_input: dict[str, str]) -> dict[str, str]:
    out = str(guard.data_dir.parent / "elsewhere")
    return {
        k: v.replace("{data}", str(guard.data_dir)).replace("{work}", str(guard.workdir)).replace("{out}", out)
        for k, v in tool_input.items()
    }


@pytest.mark.parametrize(
    ("tool", "tool_input", "reason"),
    [
        ("Read", {"file_path": "{data}/credentials.json"}, "inside aiagentchat's own data directory"),
        ("Read", {"file_path": "../../credentials.json"}, "inside aiagentchat's own data directory"),
        ("Grep", {"pattern": "x", "path": "{data}"}, "inside aiagentchat's own data directory"),
        ("Read", {"file_path": "{data}/rooms/other/secret.txt"}, "inside aiagentchat's own data directory"),
        ("Bash", {"command": "cat {data}/pickle_key"}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "cat ../../credentials.json"}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "cat ../../cred*"}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "cd .. && cd .. && cat credentials.json"}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "X={data}/pickle_key sh -c 'cat $X'"}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "tar -cf x.tar --directory={data} ."}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "cat x#y {data}/pickle_key"}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "cat {data}/pickle_key <<EOF\nit's\nEOF"}, "names aiagentchat's own data directory"),
        ("Write", {"file_path": ".claude/settings.json", "content": "{}"}, "writing Claude Code settings"),
        ("Edit", {"file_path": "{work}/.claude/hooks/x.sh", "old_string": "a", "new_string": "b"}, ".claude/"),
        ("Write", {"file_path": "sub/.claude/settings.json"}, "writing Claude Code settings or hooks (.claude/)"),
        ("Bash", {"command": "echo '{}' > .claude/settings.local.json"}, "commands naming Claude Code settings"),
        ("Write", {"file_path": ".mcp.json", "content": "{}"}, "writing MCP server configuration (.mcp.json)"),
        ("Write", {"file_path": "{work}/sub/.mcp.json"}, "writing MCP server configuration (.mcp.json)"),
        ("Bash", {"command": "echo '{}'>.mcp.json"}, "commands naming MCP server configuration"),
        ("Write", {"file_path": ".git/config"}, "writing git's configuration or hooks (.git)"),
        ("Write", {"file_path": ".git/hooks/pre-commit"}, "writing git's configuration or hooks (.git)"),
        ("MultiEdit", {"file_path": "vendor/lib/.git/config"}, "writing git's configuration or hooks (.git)"),
        ("Write", {"file_path": ".git", "content": "gitdir: mine"}, "writing git's configuration or hooks (.git)"),
        ("Bash", {"command": "cp evil.sh .git/hooks/pre-commit"}, "commands naming git's configuration"),
        ("Write", {"file_path": "HEAD", "content": "ref: refs/heads/main"}, "writing a file named HEAD (git takes"),
        ("Write", {"file_path": "sub/HEAD"}, "writing a file named HEAD"),
        ("Glob", {"pattern": "{data}/*.json"}, "inside aiagentchat's own data directory"),
        ("Write", {"file_path": "/tmp/x.txt"}, "/tmp/x.txt leads outside the working directory"),
        ("Write", {"file_path": "../../../x.txt"}, "leads outside the working directory"),
        ("NotebookEdit", {"notebook_path": "a/../../../../elsewhere/n.ipynb"}, "leads outside the working"),
        ("Write", {"file_path": "~/.bashrc"}, "~/.bashrc leads outside the working directory"),
    ],
)
def test_denied(guard, tool, tool_input, reason):
    assert reason in (guard.check(tool, filled(guard, tool_input)) or "")


@pytest.mark.parametrize(
    ("tool", "tool_input"),
    [
        ("Read", {"file_path": "{work}/notes.txt"}),
        ("Write", {"file_path": "src/app.py", "content": "open('credentials.json')"}),
        ("Write", {"file_path": "new/folder/file.txt"}),
        ("Edit", {"file_path": "{work}/credentials.json"}),
        ("Bash", {"command": "ls {work} && pytest -q"}),
        ("Bash", {"command": "cat credentials.json data/x.json"}),
        ("Bash", {"command": "grep -r TODO --exclude-dir=.git . && git status"}),
        ("Read", {"file_path": ".claude/settings.json"}),
        ("Read", {"file_path": ".git/config"}),
        ("Read", {"file_path": "/etc/hostname"}),
        ("Write", {"file_path": "docs/HEADER.md"}),
        ("Write", {"file_path": "a\x00b"}),
        ("Grep", {"pattern": "{data}"}),
        ("WebFetch", {"url": "https://example.org/data/x"}),
    ],
)
def test_allowed(guard, tool, tool_input):
    assert guard.check(tool, filled(guard, tool_input)) is None


def test_a_data_dir_named_data_is_a_path_not_a_substring(tmp_path):
    guard = ToolGuard(Path("/data"), tmp_path)
    assert guard.check("Bash", {"command": "cat tests/data/x.json"}) is None
    assert guard.check("Read", {"file_path": "tests/data/x.json"}) is None
    named = "the command names aiagentchat's own data directory"
    assert guard.check("Bash", {"command": "cat /data/pickle_key"}) == named
    assert guard.check("Bash", {"command": "ls /data"}) is not None


def test_a_link_in_the_workdir_that_leads_out_is_refused_for_writes_whatever_its_name(guard):
    out = guard.data_dir.parent / "elsewhere"
    (guard.workdir / "out").symlink_to(out)
    (guard.workdir / "file").symlink_to(out / "target.txt")
    assert guard.check("Write", {"file_path": "out/x.txt"}) == "out/x.txt leads outside the working directory"
    assert guard.check("Write", {"file_path": f"{guard.workdir}/out/x.txt"}) is not None
    assert guard.check("Edit", {"file_path": "file"}) == "file leads outside the working directory"
    assert guard.check("Read", {"file_path": "out/x.txt"}) is None  # reading outside is not the guard's to stop


def test_a_link_into_the_data_dir_is_refused_for_every_tool(guard):
    (guard.workdir / "link").symlink_to(guard.data_dir)
    inside = "link/pickle_key is inside aiagentchat's own data directory"
    assert guard.check("Read", {"file_path": "link/pickle_key"}) == inside
    named = "the command names aiagentchat's own data directory"
    assert guard.check("Bash", {"command": "cat link/pickle_key"}) == named


def test_a_claude_link_is_refused_even_where_claude_config_writes_are_allowed(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    home_claude = tmp_path / "home" / ".claude"
    home_claude.mkdir(parents=True)
    (work / ".claude").symlink_to(home_claude)
    guard = ToolGuard(tmp_path / "data", work, allow_claude_config_writes=True)
    assert guard.check("Write", {"file_path": ".claude/settings.json"}) == (
        ".claude/settings.json leads outside the working directory"
    )


def test_configuration_reached_through_links_inside_the_workdir_is_refused(guard):
    work = guard.workdir
    (work / "conf").mkdir()
    (work / ".claude").symlink_to("conf")  # the CLI reads conf/ as .claude/
    assert guard.check("Write", {"file_path": "conf/settings.json"}) == (
        "writing Claude Code settings or hooks (.claude/) is not allowed"
    )
    assert guard.check("Bash", {"command": "cp hooks.json conf/settings.json"}) == (
        "commands naming Claude Code settings or hooks (.claude/) are not allowed"
    )
    (work / "alias").symlink_to(".claude")
    assert guard.check("Write", {"file_path": "alias/settings.json"}) is not None
    (work / "b").mkdir()
    (work / "b" / ".claude").symlink_to("../plain")  # only the name in the middle says .claude
    (work / "a").symlink_to("b/.claude")
    assert guard.check("Write", {"file_path": "a/settings.json"}) == (
        "writing Claude Code settings or hooks (.claude/) is not allowed"
    )
    (work / "hooks").mkdir()
    (work / ".git").symlink_to("hooks")
    assert guard.check("Write", {"file_path": "hooks/pre-commit"}) == (
        "writing git's configuration or hooks (.git) is not allowed"
    )
    (work / "servers.json").write_text("{}")
    (work / ".mcp.json").symlink_to("servers.json")
    assert guard.check("Edit", {"file_path": "servers.json"}) == (
        "writing MCP server configuration (.mcp.json) is not allowed"
    )


def test_claude_config_writes_can_be_allowed_in_the_workdir_only(tmp_path):
    guard = ToolGuard(tmp_path / "data", tmp_path / "work", allow_claude_config_writes=True)
    assert guard.check("Write", {"file_path": ".claude/settings.json"}) is None
    assert guard.check("Bash", {"command": "echo x > .claude/settings.local.json"}) is None
    assert guard.check("Write", {"file_path": "~/.claude/settings.json"}) is not None
    assert guard.check("Write", {"file_path": ".mcp.json"}) is not None


def test_names_follow_links_one_at_a_time(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "one").symlink_to("real")
    (tmp_path / "two").symlink_to(tmp_path / "one")
    names = [tmp_path / "two/y", tmp_path / "one/y", tmp_path / "real/y"]
    assert names_of(tmp_path / "two" / "x" / ".." / "y") == names
    (tmp_path / "loop").symlink_to("loop")
    assert len(names_of(tmp_path / "loop" / "x")) == MAX_LINKS + 1  # given up, as the kernel does (ELOOP)


def test_command_words_split_operators_and_values():
    assert command_words("a>b;c&&d --f=e X=f (g)") == ["a", "b", "c", "d", "--f=e", "e", "X=f", "f", "g"]
