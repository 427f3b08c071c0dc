"""Handing a Claude Code conversation between a terminal and a room: where the CLI keeps a conversation
(`<home>/.claude/projects/<working directory, encoded>/<session id>.jsonl`), the newest one of a directory, and
copying one from one home to another without losing turns and never through a link that an agent planted in its
room's home. Used by `cchat adopt` and `cchat handback` and by the daemon's `!resume`; it imports nothing else of
aiagentchat."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import stat
import unicodedata
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
MAX_SLUG = 200  # the CLI cuts a longer folder name there and adds a hash of the whole path
_KEPT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class HandoverError(Exception):
    """Why a conversation cannot be handed over; the message is for a person."""


def project_slug(directory: str) -> str:
    """The name of the folder the CLI keeps a working directory's conversations in, as Claude Code 2.1.197 makes
    it: every UTF-16 code unit that is not an ASCII letter or digit becomes `-`; a name over 200 is cut there and
    `-` and the base-36 absolute value of the path's 32-bit string hash (Java's) are added."""
    units = _utf16_units(directory)
    slug = "".join(chr(unit) if chr(unit) in _KEPT else "-" for unit in units)
    if len(slug) <= MAX_SLUG:
        return slug
    return f"{slug[:MAX_SLUG]}-{_base36(abs(_string_hash(units)))}"


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-le", "surrogatepass")
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]


def _string_hash(units: list[int]) -> int:
    """JavaScript's `h = (h << 5) - h + charCode | 0` over the code units: a signed 32-bit integer."""
    value = 0
    for unit in units:
        value = (value * 31 + unit) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _base36(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = _BASE36[digit] + digits
        if number == 0:
            return digits


def session_id(text: str) -> str:
    """`text` as a conversation id (a UUID, in the CLI's lower case); HandoverError for anything else, so that it
    can only ever name a file in the transcripts' own folder."""
    if not isinstance(text, str) or SESSION_ID.fullmatch(text.strip()) is None:
        raise HandoverError(f"{str(text)[:60]!r} is not a conversation id (a UUID such as {uuid.UUID(int=0)})")
    return text.strip().lower()


def terminal_claude_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the CLI run in a terminal keeps its files: `CLAUDE_CONFIG_DIR`, else `~/.claude`."""
    if configured := env.get("CLAUDE_CONFIG_DIR"):
        return Path(unicodedata.normalize("NFC", configured))
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".claude"


def resume_command(workdir: Path, session: str) -> str:
    """The shell command that takes up conversation `session` in a terminal."""
    return f"cd {shlex.quote(str(workdir))} && claude --resume {session}"


@dataclass(frozen=True)
class Transcripts:
    """The conversations one home's CLI keeps for one working directory: the folder `root/below...`, where no
    folder below `root` may be a link (a room's agent can write anything in its home but its root)."""

    root: Path
    below: tuple[str, ...]

    @classmethod
    def in_home(cls, home: Path, workdir: Path) -> Transcripts:
        """In a home the daemon gives a room's agent (`HOME` inside its sandbox, at the same path)."""
        return cls(home, (".claude", "projects", project_slug(str(workdir))))

    @classmethod
    def in_claude_dir(cls, claude_dir: Path, workdir: Path) -> Transcripts:
        """In a terminal's `~/.claude` (or `CLAUDE_CONFIG_DIR`)."""
        return cls(claude_dir, ("projects", project_slug(str(workdir))))

    @property
    def folder(self) -> Path:
        return self.root.joinpath(*self.below)

    def path(self, session: str) -> Path:
        return self.folder / f"{session}.jsonl"

    def same_as(self, other: Transcripts) -> bool:
        return os.path.realpath(self.folder) == os.path.realpath(other.folder)

    @contextlib.contextmanager
    def _opened(self, create: bool = False) -> Iterator[int | None]:
        """A descriptor of the folder (None when it is not there), each folder below `root` opened without
        following a link and, with `create`, made (0700) when missing."""
        fd = self._open_folder(create)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _open_folder(self, create: bool) -> int | None:
        if create:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return None
        for depth, part in enumerate(self.below, start=1):
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                where = self.root.joinpath(*self.below[:depth])
                raise HandoverError(
                    f"{where} cannot be opened as a folder ({exc.strerror}; a link is refused)"
                ) from None
            finally:
                os.close(fd)
            fd = child
        return fd

    def has(self, session: str) -> bool:
        """Whether the conversation is here, as the CLI would take it up: a file that is not empty."""
        with self._opened() as fd:
            if fd is None:
                return False
            try:
                status = os.stat(f"{session}.jsonl", dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return stat.S_ISREG(status.st_mode) and status.st_size > 0

    def newest(self) -> str | None:
        """The conversation written last (by modification time): what the CLI's `--continue` would take up."""
        with self._opened() as fd:
            if fd is None:
                return None
            found: list[tuple[int, str]] = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    stem, dot, suffix = entry.name.rpartition(".")
                    if suffix != "jsonl" or not dot or SESSION_ID.fullmatch(stem) is None:
                        continue
                    status = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(status.st_mode) and status.st_size > 0:
                        found.append((status.st_mtime_ns, stem.lower()))
            return max(found)[1] if found else None

    def read(self, session: str) -> bytes | None:
        """The conversation's transcript; None when it is not here. Never through a link, never from a FIFO."""
        with self._opened() as fd:
            if fd is None:
                return None
            try:
                file = os.open(f"{session}.jsonl", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                why = "it is a link: refused" if exc.errno == errno.ELOOP else exc.strerror
                raise HandoverError(f"{self.path(session)} cannot be read ({why})") from None
            with os.fdopen(file, "rb") as handle:
                if not stat.S_ISREG(os.fstat(file).st_mode):
                    raise HandoverError(f"{self.path(session)} is not a file: refused")
                return handle.read()

    def write(self, session: str, data: bytes) -> None:
        """Put the transcript in place at once (a new file renamed over the old, or over a link, never through
        it), making the folders it needs."""
        with self._opened(create=True) as fd:
            assert fd is not None
            temporary = f".{session}.{uuid.uuid4().hex}.tmp"
            file = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
            try:
                with os.fdopen(file, "wb") as handle:
                    handle.write(data)
                os.rename(temporary, f"{session}.jsonl", src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=fd)
                raise


def hand_over(source: Transcripts, target: Transcripts, session: str) -> bool:
    """Copy conversation `session` from `source` to `target`, which must not lose a turn by it: a copy there
    is replaced only by one that holds it whole and goes on from it (the CLI only appends to a transcript).
    Whether anything was copied (not when `target` already has the same, or is the same folder)."""
    data = source.read(session)
    if not data:
        raise HandoverError(f"there is no conversation {session} in {source.folder}")
    if source.same_as(target):
        return False
    present = target.read(session)
    if present == data:
        return False
    if present is not None and not data.startswith(present):
        raise HandoverError(
            f"{target.path(session)} went on where {source.path(session)} did not (each has turns the other has "
            "not): a conversation goes on in one place at a time; move one of the two away to choose"
        )
    target.write(session, data)
    return True
