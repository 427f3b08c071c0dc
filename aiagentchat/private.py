"""Files only their owner may read (saved logins, keys), written and read without following planted links; a
daemon process whose files, memory and environment are its owner's only."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from aiagentchat.errors import ConfigError

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def keep_private() -> None:
    """For the rest of the process: whatever it creates is its owner's only (umask 077), and on Linux it is not
    dumpable, so no other process of the same user reads its memory or /proc/<pid>/environ."""
    os.umask(0o077)
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def check_private_dir(data_dir: Path, database: Path) -> None:
    """Make the data dir (0700) if it is missing; ConfigError when it or the database is open to group or
    others, naming the chmod that fixes it."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for what, path, fix in (("the data dir", data_dir, "700"), ("the database", database, "600")):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            raise ConfigError(f"{what} {path} is open to group or others (mode {mode:04o}); run: chmod {fix} {path}")


def write_private(path: Path, data: str) -> None:
    """Write a file only its owner can read; a link planted at `path` is replaced, never followed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_private(path: Path) -> str:
    """Read a secret file; ConfigError for one that others can read or a link planted in its place.
    FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; refusing to read a secret through it") from None
        if isinstance(exc, FileNotFoundError):
            raise
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd, encoding="utf-8") as handle:
        if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & 0o077:
            raise ConfigError(f"{path} holds a secret but others can read it; run: chmod 600 {path}")
        return handle.read()


@dataclass(frozen=True)
class Credentials:
    """A saved Matrix login: the same device on every start."""

    homeserver: str
    user_id: str
    device_id: str
    access_token: str

    @classmethod
    def load(cls, path: Path) -> Credentials | None:
        """The saved login, or None if there is none; ConfigError for an unsafe or damaged file."""
        try:
            data = json.loads(read_private(path))
            return cls(**{key: str(data[key]) for key in ("homeserver", "user_id", "device_id", "access_token")})
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a saved login ({type(exc).__name__}: {exc}); remove it") from None

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self)))
