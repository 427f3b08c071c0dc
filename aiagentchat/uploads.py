"""Files between the room and the agent's working directory: uploads saved under `uploads/` (sanitised names,
never overwriting, never through a symlink), and files sent back with `!get` (only from inside the working
directory), and uploaded images shown to the agent as image content."""

from __future__ import annotations

import base64
import mimetypes
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

UPLOADS_DIR = "uploads"
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}  # what the model API takes as images
MAX_IMAGE_BYTES = 5_000_000  # the model API's limit for one image
MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r"[^\w.\- ()+,@=]")


class FileRefused(Exception):
    """Why a file cannot be saved or sent; the message is for the room."""


def check_size(size: int, max_bytes: int, what: str = "the file") -> None:
    if size > max_bytes:
        raise FileRefused(f"{what} is {size:,} bytes; the limit is {max_bytes:,}")


def safe_name(name: str) -> str:
    """A plain file name made from what a client says a file is called: no directories, no control or shell
    characters, no leading dot, not empty."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).strip(" .")
    stem, dot, suffix = cleaned.rpartition(".")
    if dot and len(cleaned) > MAX_NAME_CHARS:
        cleaned = stem[: MAX_NAME_CHARS - len(suffix) - 1] + "." + suffix[:20]
    return cleaned[:MAX_NAME_CHARS] or "upload"


def save_upload(workdir: Path, name: str, data: bytes) -> str:
    """Write `data` to `uploads/<safe name>` in the working directory, adding `-1`, `-2`... before the suffix
    instead of overwriting; the path relative to the working directory."""
    directory = workdir / UPLOADS_DIR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        base = safe_name(name)
        stem, dot, suffix = base.rpartition(".")
        if not stem:
            stem, dot, suffix = base, "", ""
        for number in range(1000):
            candidate = base if number == 0 else f"{stem}-{number}{dot}{suffix}"
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            except FileExistsError:
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return f"{UPLOADS_DIR}/{candidate}"
    finally:
        os.close(dir_fd)
    raise FileRefused(f"too many files called {base} in {UPLOADS_DIR}/")


def copy_for_sending(workdir: Path, requested: str, max_bytes: int, scratch: Path) -> tuple[Path, str]:
    """A private copy of the working directory's file `requested`, for the outbox to upload (and delete), and
    the file's name. Refuses anything that resolves outside the working directory, symlinks included."""
    root = workdir.resolve()
    target = (root / requested).resolve()
    if not target.is_relative_to(root):
        raise FileRefused(f"`{requested}` is outside the working directory")
    if not target.is_file():
        raise FileRefused(f"`{requested}` is not a file in the working directory")
    source_fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # never waits on a swapped-in FIFO
    with os.fdopen(source_fd, "rb") as source:
        status = os.fstat(source_fd)
        if not stat.S_ISREG(status.st_mode):
            raise FileRefused(f"`{requested}` is not a file in the working directory")
        check_size(status.st_size, max_bytes, f"`{requested}`")
        scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        copy = scratch / uuid.uuid4().hex
        with copy.open("xb") as destination:
            shutil.copyfileobj(source, destination)
    return copy, target.name


def image_type(path: str, size: int) -> str | None:
    """The media type the agent can be shown the file as (by its name), or None if it cannot be."""
    mimetype = mimetypes.guess_type(path)[0]
    return mimetype if mimetype in IMAGE_TYPES and size <= MAX_IMAGE_BYTES else None


def image_block(workdir: Path, path: str) -> dict[str, Any] | None:
    """An image content block of an uploaded image for the agent's next message; None if it is gone, has
    grown too big, or is no longer a regular file inside the working directory."""
    target = workdir / path
    try:
        if target.is_symlink() or not target.is_file() or (mimetype := image_type(path, target.stat().st_size)) is None:
            return None
        data = target.read_bytes()
    except OSError:
        return None
    source = {"type": "base64", "media_type": mimetype, "data": base64.b64encode(data).decode("ascii")}
    return {"type": "image", "source": source}


def uploads_note(saved: list[dict[str, Any]]) -> str:
    """What the agent is told, with the next prompt, of the files uploaded since the last one."""
    listing = "\n".join(
        f"- {upload['path']} ({upload['bytes']:,} bytes{', shown below' if upload.get('image') else ''})"
        for upload in saved
    )
    return f"Files the user uploaded into the working directory for this prompt:\n{listing}"
