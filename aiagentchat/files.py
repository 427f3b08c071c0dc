"""Private files: secrets and state only the daemon's user may read, never reached through a planted link."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from aiagentchat.settings import ConfigError


def write_private(path: Path, data: str) -> None:
    """Write a file only its owner can read; a link planted at `path` is replaced, never followed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_private(path: Path) -> str:
    """Read a secret file, refusing one that others can read (or a link planted in its place)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, encoding="utf-8") as handle:
        if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & 0o077:
            raise ConfigError(f"{path} holds a secret but others can read it; run: chmod 600 {path}")
        return handle.read()
