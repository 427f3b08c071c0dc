"""Rooms made from the chat: an admin (`daemon.admins`) invites the bot to a room that is not in the settings, and
the bot serves it with `[room_defaults]`, the inviter as its allowed user and a working directory of its own. The
room's keys set from the chat are kept in the database (`store.chat_rooms`); `settings.toml` rooms win over them.

In such a room an admin changes those keys with commands (`!allow`, `!deny`, `!tools`, `!project`, `!leave`), each
answered in the room, recorded in the database (`room_changes`) and logged (`room_changed`). The arguments are
chosen by whoever typed them: each is checked here, and a bad one is answered with what is wrong."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from aiagentchat.batcher import Notice
from aiagentchat.commands import Command
from aiagentchat.runner import RoomWorker
from aiagentchat.settings import USER_ID, ClaudeSettings, RoomSettings, Settings
from aiagentchat.store import Prompt, Store
from aiagentchat.storedrooms import Refused, project_dir

log = structlog.get_logger(__name__)

ADMIN_COMMANDS = {
    "allow @USER": "let USER prompt in this room",
    "deny @USER": "take USER's right to prompt here away",
    "tools": "the tools run without asking and those always refused; `tools allow|deny|remove TOOL…`, `tools reset`",
    "project PATH": "make PATH (under the daemon's project_roots) this room's working directory; a new conversation",
    "leave": "the bot leaves this room and forgets it; its working directory stays",
}
ADMIN_WORDS = frozenset(key.split()[0] for key in ADMIN_COMMANDS)
CHAT_KEYS = ("allowed_users", "allowed_tools", "disallowed_tools", "workdir")  # what the commands set, for !status
_USER = re.compile(USER_ID)
_TOOL = re.compile(r"[A-Za-z][\w.-]*(?:\([^()\n]*\))?")  # Read, mcp__srv__tool, Bash(git status:*)
_SEPARATOR = re.compile(r"[\s,]+")
MAX_TOOLS = 100


def user_id(argument: str) -> str:
    """The one full Matrix user id an `!allow` or `!deny` names."""
    if not _USER.match(argument) or len(argument) > 255:
        shown = argument[:80] or "nothing"
        raise Refused(f"`{shown}` is not a Matrix user id: give one full id like `@you:example.org`")
    return argument


def tool_names(argument: str) -> list[str]:
    """The tools `!tools allow|deny|remove` names, separated by spaces or commas; a rule's spaces stay inside its
    parentheses (`Bash(git status:*)`)."""
    tools, position = [], 0
    while position < len(argument):
        if separator := _SEPARATOR.match(argument, position):
            position = separator.end()
            continue
        match = _TOOL.match(argument, position)
        end = match.end() if match else position
        if match is None or (end < len(argument) and not _SEPARATOR.match(argument, end)):
            rest = argument[position:].split()[0][:60]
            raise Refused(
                f"`{rest}` is not a tool name: give names like `Read`, `Bash(git status:*)`, `mcp__srv__tool`"
            )
        tools.append(match.group())
        position = end
    if not tools:
        raise Refused("name at least one tool, e.g. `Read` or `Bash(git status:*)`")
    if len(tools) > MAX_TOOLS:
        raise Refused(f"at most {MAX_TOOLS} tools at once")
    return tools


def sources(settings: Settings, room: RoomSettings, chat: Mapping[str, Any] | None) -> list[str]:
    """Where each of the room's own settings comes from, one line each: settings.toml, room_defaults or chat."""
    if chat is None:
        return ["- **Settings:** from settings.toml"]
    defaults = settings.room_defaults.model_fields_set
    lines = ["- **Settings** (room made from the chat):"]
    for key in [*CHAT_KEYS, *sorted(k for k in defaults if k not in CHAT_KEYS)]:
        if key in chat:
            source = "chat"
        elif key in defaults:
            source = "room_defaults"
        elif key in ClaudeSettings.model_fields:
            source = "[claude]"
        else:
            source = "built-in default"
        lines.append(f"  - `{key}` = {_shown(key, settings, room)} ({source})")
    return lines


def _shown(key: str, settings: Settings, room: RoomSettings) -> str:
    if key == "workdir":
        return f"`{settings.workdir_for(room)}`"
    claude = settings.claude_for(room)  # a `[claude]` key: the room's value, or `[claude]`'s
    value = getattr(claude, key) if key in type(claude).model_fields else getattr(room, key)
    if isinstance(value, list):
        return ", ".join(f"`{item}`" for item in value) or "none"
    return f"`{value}`"


class Host(Protocol):
    """What the admin commands ask of the daemon (the Bot)."""

    def chat_settings(self, room_id: str) -> dict[str, Any] | None:
        """The room's keys set from the chat; None when the room is configured in settings.toml."""

    async def change(self, room_id: str, chat: dict[str, Any]) -> None:
        """Serve the room with these chat-set keys from now on (the database already holds them)."""

    def workdirs(self) -> dict[Path, str]:
        """The working directories of the rooms served, resolved → room id."""

    def leave(self, room_id: str) -> None:
        """Deliver what the room still has to send, then leave it (it is forgotten already)."""


@dataclass(frozen=True)
class _Asked:
    room_id: str
    room: RoomSettings
    worker: RoomWorker
    sender: str
    argument: str
    chat: dict[str, Any]


class RoomAdmin:
    """Answers the admin commands of rooms made from the chat."""

    def __init__(self, settings: Settings, store: Store, host: Host) -> None:
        self._settings = settings
        self._store = store
        self._host = host

    def is_admin(self, user: str) -> bool:
        return user in self._settings.daemon.admins

    def commands_for(self, room_id: str, user: str) -> Mapping[str, str]:
        """The admin commands `!help` lists to `user` in the room: all of them to an admin in a room made from the
        chat, none anywhere else."""
        if self._host.chat_settings(room_id) is None or not self.is_admin(user):
            return {}
        return ADMIN_COMMANDS

    async def run(self, room_id: str, room: RoomSettings, worker: RoomWorker, asked: Prompt, command: Command) -> None:
        """Answer `!allow`, `!deny`, `!tools`, `!project` or `!leave`, in reply to the command."""
        log.info("command", room_id=room_id, command=command.word, sender=asked.sender)
        prefix = room.command_prefix
        chat = self._host.chat_settings(room_id)
        if chat is None:
            answer = (
                f"⛔ This room is configured in settings.toml: change it there. `{prefix}{command.word}` works in "
                "rooms an admin invited the bot to."
            )
        elif not self.is_admin(asked.sender):
            answer = f"⛔ `{prefix}{command.word}` is for the daemon's admins (`daemon.admins`); you are not one."
        else:
            handler = getattr(self, f"_{command.word}")
            try:
                answer = await handler(_Asked(room_id, room, worker, asked.sender, command.argument, dict(chat)))
            except Refused as refused:
                log.info("room_change_refused", room_id=room_id, command=command.word, reason=str(refused))
                answer = f"⛔ {refused}."
        reply = Notice(asked.event_id, answer, {"command": asked.event_id}, thread=asked.thread or None)
        await worker.batcher.put(reply)

    async def _record(self, asked: _Asked, chat: dict[str, Any], command: str, detail: str) -> None:
        await self._store.set_chat_room(asked.room_id, chat, asked.sender, command, detail)
        log.info("room_changed", room_id=asked.room_id, by=asked.sender, command=command, detail=detail)
        await self._host.change(asked.room_id, chat)

    async def _allow(self, asked: _Asked) -> str:
        user = user_id(asked.argument)
        users = list(asked.room.allowed_users)
        if user in users:
            return f"{user} may prompt here already."
        asked.chat["allowed_users"] = [*users, user]
        await self._record(asked, asked.chat, "allow", user)
        return f"✅ {user} may now prompt in this room."

    async def _deny(self, asked: _Asked) -> str:
        user = user_id(asked.argument)
        users = list(asked.room.allowed_users)
        if user not in users:
            return f"{user} may not prompt here already."
        asked.chat["allowed_users"] = [u for u in users if u != user]
        await self._record(asked, asked.chat, "deny", user)
        return f"🚫 {user} may no longer prompt in this room."

    async def _tools(self, asked: _Asked) -> str:
        claude = self._settings.claude_for(asked.room)
        allowed, denied = list(claude.allowed_tools), list(claude.disallowed_tools)
        action, _, rest = asked.argument.partition(" ")
        action = action.lower()
        if not action:
            return _tools_text(allowed, denied, asked.room.command_prefix)
        if action == "reset":
            if rest.strip():
                raise Refused("`tools reset` takes no tool names")
            asked.chat.pop("allowed_tools", None)
            asked.chat.pop("disallowed_tools", None)
        elif action in ("allow", "deny", "remove"):
            names = tool_names(rest)
            allowed = [tool for tool in allowed if tool not in names]
            denied = [tool for tool in denied if tool not in names]
            if action == "allow":
                allowed += names
            elif action == "deny":
                denied += names
            asked.chat["allowed_tools"], asked.chat["disallowed_tools"] = allowed, denied
        else:
            raise Refused(
                f"`tools {action[:40]}` is not known: use `tools`, `tools allow|deny|remove TOOL…` or `tools reset`"
            )
        await self._record(asked, asked.chat, "tools", asked.argument)
        claude = self._settings.claude_for(self._settings.room_defaults.room(asked.room_id, asked.chat))
        shown = _tools_text(claude.allowed_tools, claude.disallowed_tools, asked.room.command_prefix)
        return f"🔧 Changed; the next prompt's agent starts with them.\n\n{shown}"

    async def _project(self, asked: _Asked) -> str:
        current = self._settings.workdir_for(asked.room)
        roots = self._settings.daemon.project_roots
        if not asked.argument:
            where = ", ".join(f"`{root}`" for root in roots) or "none (`project` is off)"
            return f"📁 Working directory: `{current}`. Project roots: {where}."
        path = project_dir(asked.argument, roots, self._settings.paths.data_dir)
        other = self._host.workdirs().get(path)
        if other is not None and other != asked.room_id:
            raise Refused(f"`{path}` is already the working directory of room {other}")
        if path == current.resolve():
            return f"📁 `{path}` is this room's working directory already."
        if asked.worker.running() or asked.worker.queued():
            raise Refused("prompts are running or queued: change the working directory once they have ended")
        asked.chat["workdir"] = str(path)
        await self._record(asked, asked.chat, "project", str(path))
        return f"📁 Working directory: `{path}`. The next prompt starts a new conversation there."

    async def _leave(self, asked: _Asked) -> str:
        if asked.argument:
            raise Refused("`leave` takes no argument")
        worker = asked.worker
        if worker.running() or worker.queued():
            raise Refused("prompts are running or queued here: stop them first (`stop`, or 🛑 on each)")
        if not await self._store.forget_chat_room(asked.room_id, asked.sender):
            raise Refused("this room is not one made from the chat")
        log.info("room_changed", room_id=asked.room_id, by=asked.sender, command="leave", detail="")
        self._host.leave(asked.room_id)
        workdir = self._settings.workdir_for(asked.room)
        return f"👋 Leaving this room and forgetting it. Its working directory `{workdir}` stays."


def _tools_text(allowed: list[str], denied: list[str], prefix: str) -> str:
    def listed(tools: list[str]) -> str:
        return ", ".join(f"`{tool}`" for tool in tools) or "none"

    return (
        f"- **Run without asking:** {listed(allowed)}\n- **Always refused:** {listed(denied)}\n\n"
        f"Change with `{prefix}tools allow TOOL…`, `{prefix}tools deny TOOL…`, `{prefix}tools remove TOOL…` "
        f"or `{prefix}tools reset` (back to the defaults)."
    )
