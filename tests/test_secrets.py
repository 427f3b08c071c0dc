"""The daemon keeps its secrets: what it creates is its owner's only, a data dir or database open to others stops
it, no other process of the same user reads its memory or environment, and a password left set is pointed out.
What changes the whole process (umask, dumpable flag) runs in a subprocess, never in the tests' own."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from aiagentchat.cli import password_still_set
from aiagentchat.private import check_private_dir
from aiagentchat.settings import ConfigError, Settings

NOBODY = 65534

MAKE_A_DATA_DIR = """
import asyncio, sys
from pathlib import Path
from aiagentchat.private import check_private_dir, keep_private
from aiagentchat.store import Store

keep_private()
data = Path(sys.argv[1])
check_private_dir(data, data / "aiagentchat.db")

async def main():
    store = await Store.open(data / "aiagentchat.db")
    await store.close()

asyncio.run(main())
(data / "rooms" / "r").mkdir(parents=True)
(data / "rooms" / "r" / "notes.txt").write_text("x")
"""


def group_or_other_bits(root: Path) -> dict[str, str]:
    """Every path under `root` (itself included) whose mode lets group or others in."""
    paths = [root, *root.rglob("*")]
    return {str(p): oct(stat.S_IMODE(p.lstat().st_mode)) for p in paths if stat.S_IMODE(p.lstat().st_mode) & 0o077}


def test_what_the_daemon_creates_is_its_owners_only(tmp_path):
    top = tmp_path / "missing"  # parents are made too, each 0700
    data = top / "data"
    subprocess.run([sys.executable, "-c", MAKE_A_DATA_DIR, str(data)], check=True)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "aiagentchat.db").stat().st_mode) == 0o600
    assert group_or_other_bits(top) == {}
    assert (data / "rooms" / "r" / "notes.txt").exists()


def test_a_data_dir_or_database_open_to_others_is_refused_naming_the_fix(tmp_path):
    data = tmp_path / "data"
    database = data / "aiagentchat.db"
    data.mkdir()
    data.chmod(0o755)
    with pytest.raises(ConfigError) as caught:
        check_private_dir(data, database)
    assert str(caught.value) == f"the data dir {data} is open to group or others (mode 0755); run: chmod 700 {data}"

    data.chmod(0o700)
    check_private_dir(data, database)  # no database yet: the first run makes it
    database.write_text("")
    database.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        check_private_dir(data, database)
    assert str(caught.value) == (
        f"the database {database} is open to group or others (mode 0644); run: chmod 600 {database}"
    )
    database.chmod(0o620)
    with pytest.raises(ConfigError, match="mode 0620"):
        check_private_dir(data, database)
    database.chmod(0o600)
    check_private_dir(data, database)


def test_the_daemon_refuses_to_start_with_an_open_data_dir_exit_2_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    config = tmp_path / "settings.toml"
    config.write_text(
        f'[matrix]\nhomeserver = "http://127.0.0.1:9"\nuser_id = "@bot:example.org"\n[paths]\ndata_dir = "{data}"\n'
    )
    ran = subprocess.run(
        [sys.executable, "-m", "aiagentchat", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 2
    assert ran.stderr == (
        f"aiagentchat: the data dir {data} is open to group or others (mode 0755); run: chmod 700 {data}\n"
    )
    assert stat.S_IMODE(data.stat().st_mode) == 0o755 and list(data.iterdir()) == []


UNDUMPABLE = """
import os, sys, ctypes
from aiagentchat.private import keep_private

if os.getuid() == 0:  # as root, be another user, so that reading /proc/<pid>/environ is not a root privilege
    os.setgid(int(sys.argv[1]))
    os.setuid(int(sys.argv[1]))
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # changing uid left it undumpable: start from a dumpable process
print("dumpable", flush=True)
sys.stdin.readline()
keep_private()
print("private", flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_DUMPABLE) is Linux's")
def test_no_process_of_the_same_user_reads_the_environment_once_private(tmp_path):
    user = NOBODY if os.getuid() == 0 else os.getuid()
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_")}  # nobody can't write it
    proc = subprocess.Popen(
        [sys.executable, "-c", UNDUMPABLE, str(user)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env | {"SECRET_MARK": "s3cret"}, cwd="/",
    )  # fmt: skip
    try:

        def read_environ() -> subprocess.CompletedProcess[str]:
            as_user = {"user": user, "group": user} if os.getuid() == 0 else {}
            return subprocess.run(["cat", f"/proc/{proc.pid}/environ"], capture_output=True, text=True, **as_user)

        assert proc.stdout.readline() == "dumpable\n"
        before = read_environ()
        assert before.returncode == 0 and "SECRET_MARK=s3cret" in before.stdout  # the same user could read it
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "private\n"
        after = read_environ()
        assert after.returncode != 0 and "Permission denied" in after.stderr and "s3cret" not in after.stdout
    finally:
        proc.kill()
        proc.wait()


def test_a_password_still_set_after_the_first_login_is_pointed_out(tmp_path):
    with_password = Settings(matrix={"user_id": "@bot:x", "password": "pw"}, paths={"data_dir": tmp_path})
    without = Settings(matrix={"user_id": "@bot:x"}, paths={"data_dir": tmp_path})
    assert not password_still_set(with_password)  # no saved login yet: the first login needs it
    (tmp_path / "credentials.json").write_text("{}")
    assert password_still_set(with_password)
    assert not password_still_set(without)
