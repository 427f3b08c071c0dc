"""Rooms made from the chat as the daemon's database keeps them, read beside a running daemon without writing
(`cchat` finds them by name, `doctor` checks them), and the rule that judges the working directory `!project` gives
such a room: the daemon applies it when the command is given and again at each start. Light on imports, for cchat."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aiagentchat.settings import RoomSettings, Settings
from aiagentchat.store import read_only


class Refused(Exception):
    """An admin command's argument that cannot be taken; the message says why, for the room."""


def project_dir(argument: str, roots: list[Path], data_dir: Path) -> Path:
    """The directory `!project PATH` names, resolved (every symbolic link followed, `..` taken), when it lies in
    one of `roots`, else Refused with the reason."""
    if not roots:
        raise Refused("`project` is off here: the daemon's settings name no `project_roots`")
    shown = ", ".join(f"`{root}`" for root in roots)
    raw = Path(os.path.expanduser(argument))
    if not raw.is_absolute():
        raise Refused(f"`{argument[:200]}` is not an absolute path: give `/path` or `~/path` under {shown}")
    try:
        real = raw.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a link loop, a NUL byte
        raise Refused(f"`{argument[:200]}` does not exist") from None
    if not real.is_dir():
        raise Refused(f"`{argument[:200]}` is not a directory")
    if not any(real.is_relative_to(root.resolve()) for root in roots):
        leads = f" (it leads to `{real}`)" if real != Path(os.path.normpath(raw)) else ""
        raise Refused(f"`{argument[:200]}`{leads} is outside the project roots: {shown}")
    data = data_dir.resolve()
    if real.is_relative_to(data) or data.is_relative_to(real):
        raise Refused(f"`{real}` overlaps the daemon's data directory; the agent must not reach its files")
    return real


def checked_chat(settings: Settings, chat: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A stored room's chat-set keys, its working directory judged again by today's project_roots: one they no
    longer allow is dropped (the room goes back to its own directory under the data dir), and the reason given."""
    workdir = chat.get("workdir")
    if workdir is None:
        return chat, None
    try:
        project_dir(str(workdir), settings.daemon.project_roots, settings.paths.data_dir)
    except Refused as refused:
        return {key: value for key, value in chat.items() if key != "workdir"}, str(refused)
    return chat, None


@dataclass(frozen=True)
class StoredRoom:
    """A room made from the chat, as the daemon serves it after its next start."""

    room_id: str
    room: RoomSettings | None  # None: its stored keys do not make valid settings, and the daemon does not serve it
    workdir: str | None = None  # the working directory `!project` chose, as stored
    problem: str = ""  # why it is not served, or why that working directory is not used


def stored_rooms(settings: Settings) -> list[StoredRoom]:
    """The rooms made from the chat that the daemon's database keeps, oldest first, but those settings.toml
    configures (the file wins); none without a database or one older than such rooms. Read-only: safe while the
    daemon runs. sqlite3.Error when the database cannot be read."""
    database = settings.database
    if not database.exists():
        return []
    with read_only(database) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chat_rooms'").fetchone() is None:
            return []
        rows = db.execute("SELECT room_id, settings FROM chat_rooms ORDER BY created_ms, room_id").fetchall()
    configured = {room.id for room in settings.rooms}
    return [_stored(settings, room_id, text) for room_id, text in rows if room_id not in configured]


def _stored(settings: Settings, room_id: str, text: str) -> StoredRoom:
    try:
        chat = json.loads(text)
    except ValueError:
        chat = None
    if not isinstance(chat, dict):
        return StoredRoom(room_id, None, problem="its keys in the database are not a JSON object")
    workdir = chat.get("workdir")
    served, refused = checked_chat(settings, chat)
    try:
        room = settings.room_defaults.room(room_id, served)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "its keys"
        return StoredRoom(room_id, None, problem=f"{where}: {error['msg']}")
    return StoredRoom(room_id, room, str(workdir) if workdir is not None else None, refused or "")
