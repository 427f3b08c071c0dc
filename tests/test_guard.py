from pathlib import Path

import pytest

from aiagentchat.guard import ToolGuard


@pytest.fixture
def guard(tmp_path: Path) -> ToolGuard:
    data = tmp_path / "data"
    work = data / "rooms" / "abc"
    work.mkdir(parents=True)
    return ToolGuard(data, work)


@pytest.mark.parametrize(
    ("tool", "tool_input", "reason"),
    [
        ("Read", {"file_path": "{data}/credentials.json"}, "inside aiagentchat's own data directory"),
        ("Read", {"file_path": "../../credentials.json"}, "inside aiagentchat's own data directory"),
        ("Grep", {"pattern": "x", "path": "{data}"}, "inside aiagentchat's own data directory"),
        ("Read", {"file_path": "{data}/rooms/other/secret.txt"}, "inside aiagentchat's own data directory"),
        ("Bash", {"command": "cat {data}/pickle_key"}, "names aiagentchat's own data directory"),
        ("Bash", {"command": "cat ../../credentials.json"}, "names one of aiagentchat's own files"),
        ("Write", {"file_path": ".claude/settings.json", "content": "{}"}, ".claude/"),
        ("Edit", {"file_path": "{work}/.claude/hooks/x.sh", "old_string": "a", "new_string": "b"}, ".claude/"),
        ("Bash", {"command": "echo '{}' > .claude/settings.local.json"}, ".claude/"),
    ],
)
def test_denied(guard, tool, tool_input, reason):
    values = {k: v.replace("{data}", str(guard.data_dir)).replace("{work}", str(guard.workdir))
              for k, v in tool_input.items()}
    assert reason in guard.check(tool, values)


@pytest.mark.parametrize(
    ("tool", "tool_input"),
    [
        ("Read", {"file_path": "{work}/notes.txt"}),
        ("Write", {"file_path": "src/app.py", "content": "open('credentials.json')"}),
        ("Bash", {"command": "ls {work} && pytest -q"}),
        ("Read", {"file_path": ".claude/settings.json"}),
        ("Read", {"file_path": "/etc/hostname"}),
        ("WebFetch", {"url": "https://example.org"}),
    ],
)
def test_allowed(guard, tool, tool_input):
    values = {k: v.replace("{work}", str(guard.workdir)) for k, v in tool_input.items()}
    assert guard.check(tool, values) is None


def test_claude_config_writes_can_be_allowed(tmp_path):
    guard = ToolGuard(tmp_path / "data", tmp_path / "work", allow_claude_config_writes=True)
    assert guard.check("Write", {"file_path": ".claude/settings.json"}) is None
