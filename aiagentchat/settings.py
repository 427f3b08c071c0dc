"""Typed, read-only settings: a TOML file plus `AIAGENTCHAT_<SECTION>__<KEY>` environment variables."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from aiagentchat.errors import ConfigError

PermissionMode = Literal["default", "acceptEdits", "plan", "bypassPermissions", "dontAsk"]
Trust = Literal["all", "tofu", "cross_signed", "verified"]
Sandbox = Literal["bwrap", "off"]
SettingSource = Literal["user", "project", "local"]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error"], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)
]

DEFAULT_ENV_PASSTHROUGH = ["PATH", "HOME", "LANG", "ANTHROPIC_*", "CLAUDE_CODE_*", "DISABLE_*"]
SECRET_KEYS = ("password", "access_token", "pickle_key")
USER_ID = r"^@[^:\s]+:[^\s]+$"  # a full Matrix user id: @name:server


def _expand_user(value: Any) -> Any:
    return os.path.expanduser(value) if isinstance(value, str) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MatrixSettings(_Strict):
    homeserver: str = ""  # empty: the built-in local homeserver
    user_id: str = ""
    password: SecretStr | None = None
    access_token: SecretStr | None = None
    pickle_key: SecretStr | None = None  # unset: data_dir/pickle_key, generated on the first run
    device_name: str = "aiagentchat"
    request_timeout_s: float = Field(default=30.0, gt=0)  # a homeserver that accepts and never answers


class PathSettings(_Strict):
    data_dir: Path = Path("data")


class ClaudeSettings(_Strict):
    binary: str = "claude"
    permission_mode: PermissionMode = "default"
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)
    model: str | None = None
    timeout_s: float = Field(default=300.0, gt=0)
    extra_args: list[str] = Field(default_factory=list)
    env_passthrough: list[str] = Field(default_factory=lambda: list(DEFAULT_ENV_PASSTHROUGH))
    idle_close_s: float = Field(default=600.0, gt=0)
    interrupt_grace_s: float = Field(default=5.0, gt=0)
    stall_notice_s: float = Field(default=120.0, gt=0)
    stall_interrupt: bool = False
    sandbox: Sandbox = "bwrap"  # off: the agent runs as the daemon's user, with its HOME, no wall
    setting_sources: list[SettingSource] = Field(default_factory=list)  # Claude Code settings files it reads
    mcp_config: Path | None = None  # the only MCP servers it starts (a JSON file, read-only in the sandbox)
    sandbox_readonly: list[Path] = Field(default_factory=list)  # more of the machine in the sandbox, read-only
    sandbox_writable: list[Path] = Field(default_factory=list)  # ... and read-write (e.g. cchat's config)


class OutputSettings(_Strict):
    flush_interval_s: float = Field(default=2.0, gt=0)
    status_after_s: float = Field(default=1.0, ge=0)  # a run's live status shows once it has lasted this long
    max_backoff_s: float = Field(default=60.0, gt=0)
    max_run_bytes: int = Field(default=200_000, ge=1_000)  # past it: head and tail in the room, the rest as a file
    tail_bytes: int = Field(default=8_000, ge=0)


class DaemonSettings(_Strict):
    # SIGTERM to exit, the built-in homeserver's stop included, fits the 10 s podman and Docker give by default
    shutdown_timeout_s: float = Field(default=5.0, gt=0)
    log_level: LogLevel = "info"
    # /healthz and /metrics: HOST:PORT ([::1]:PORT for IPv6, port 0 for any free one); "" serves neither
    http_listen: str = Field(default="127.0.0.1:9464", pattern=r"^$|^(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):\d{1,5}$")
    # a sync long-polls for 30 s: three times that without a good one means the loop is stuck or the homeserver gone
    health_sync_max_age_s: float = Field(default=90.0, gt=0)
    # an event waiting this long to be delivered means sending is stuck (back-off alone stays under max_backoff_s)
    health_outbox_max_age_s: float = Field(default=300.0, gt=0)
    # who may invite the bot into new rooms and run the room admin commands there; none: rooms only from the file
    admins: list[Annotated[str, Field(pattern=USER_ID)]] = Field(default_factory=list)
    # the directories `!project PATH` may choose a room's working directory in (each with what lies below it)
    project_roots: list[Annotated[Path, BeforeValidator(_expand_user)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _absolute_roots(self) -> DaemonSettings:
        for root in self.project_roots:
            if not root.is_absolute():
                raise ValueError(f"project_roots: {root} must be an absolute path (or start with ~)")
        return self


class RoomSettings(_Strict):
    """One served room. The `[claude]` keys may be overridden per room."""

    id: str
    name: str | None = None
    allowed_users: list[str] = Field(default_factory=list)
    allowed_bots: list[str] = Field(default_factory=list)
    max_hops: int = Field(default=3, ge=1)
    max_queued: int = Field(default=10, ge=0)
    min_power_level: int | None = None
    require_verified_device: bool = False
    trust: Trust = "cross_signed"  # encrypted rooms only: whose devices get room keys and may prompt
    key_wait_s: float = Field(default=60.0, gt=0)
    workdir: Path | None = None
    shared_workdir: bool = False
    allow_claude_config_writes: bool = False
    command_prefix: str = Field(default="!", min_length=1, max_length=3, pattern=r"^\S+$")
    aliases: dict[str, str] = Field(default_factory=dict)  # `!t` → "run the tests": the word without prefix
    allowed_models: list[str] = Field(default_factory=list)  # what `!model NAME` may choose
    budget_usd_per_day: float | None = Field(default=None, ge=0)  # per UTC day; then prompts are refused
    reactions: bool = True  # ⏳ / ✋ / ✅ / ❌ on each prompt
    max_upload_bytes: int = Field(default=20_000_000, ge=0)  # files users upload, and files `!get` sends
    unlisted_tools: Literal["ask", "deny"] = "ask"  # a tool neither allowed nor denied: ask the room, or deny
    approvers: list[str] = Field(default_factory=list)  # who may answer approval requests (default allowed_users)
    approval_timeout_s: float = Field(default=300.0, gt=0)  # then the request is denied and the room told
    live_status: bool = True  # one status message per run, edited in place, and the answer as one new event;
    # false: the run's text and tool lines stream as messages
    reply_mode: Literal["flat", "thread"] = "flat"  # thread: each prompt's output in a thread rooted at it
    session_scope: Literal["room", "thread"] = "room"  # thread: each thread is its own Claude conversation
    worktrees: bool = False  # with session_scope thread, in a git checkout: each thread in its own worktree
    max_parallel: int = Field(default=2, ge=1)  # with worktrees: how many threads' prompts run at once
    worktree_idle_days: float = Field(default=14.0, gt=0)  # `!status` lists worktrees of threads idle this long
    binary: str | None = None
    permission_mode: PermissionMode | None = None
    allowed_tools: list[str] | None = None
    disallowed_tools: list[str] | None = None
    model: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    extra_args: list[str] | None = None
    env_passthrough: list[str] | None = None
    stall_notice_s: float | None = Field(default=None, gt=0)
    stall_interrupt: bool | None = None
    sandbox: Sandbox | None = None
    setting_sources: list[SettingSource] | None = None
    mcp_config: Path | None = None
    sandbox_readonly: list[Path] | None = None
    sandbox_writable: list[Path] | None = None

    @model_validator(mode="after")
    def _threads_for_thread_sessions(self) -> RoomSettings:
        if self.session_scope == "thread" and self.reply_mode != "thread":
            raise ValueError('session_scope = "thread" needs reply_mode = "thread"')
        if self.worktrees and self.session_scope != "thread":
            raise ValueError('worktrees = true needs session_scope = "thread"')
        return self


NOT_DEFAULTS = ("id", "name", "workdir")  # per room: a room made from the chat has its own working directory


class RoomDefaults(RoomSettings):
    """`[room_defaults]`: what a room the bot is invited to from the chat starts with (any `[[rooms]]` key but
    those in NOT_DEFAULTS)."""

    id: str = ""

    @model_validator(mode="after")
    def _not_per_room(self) -> RoomDefaults:
        if given := [key for key in NOT_DEFAULTS if key in self.model_fields_set]:
            raise ValueError(f"{given[0]} is set per room, not in room_defaults")
        return self

    def room(self, room_id: str, chat: Mapping[str, Any]) -> RoomSettings:
        """The settings of a room made from the chat: these defaults, with what was set in the chat over them."""
        return RoomSettings(**(self.model_dump(exclude_unset=True) | dict(chat) | {"id": room_id}))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AIAGENTCHAT_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    matrix: MatrixSettings = Field(default_factory=MatrixSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    claude: ClaudeSettings = Field(default_factory=ClaudeSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    rooms: list[RoomSettings] = Field(default_factory=list)
    room_defaults: RoomDefaults = Field(default_factory=RoomDefaults)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, which arrives as init values.
        return (env_settings, init_settings)

    def room(self, room_id: str) -> RoomSettings | None:
        return next((r for r in self.rooms if r.id == room_id), None)

    def claude_for(self, room: RoomSettings) -> ClaudeSettings:
        """The room's effective agent settings: `[claude]` with the room's overrides applied."""
        overrides = {
            key: value for key in ClaudeSettings.model_fields if (value := getattr(room, key, None)) is not None
        }
        return self.claude.model_copy(update=overrides)

    @property
    def database(self) -> Path:
        return self.paths.data_dir / "aiagentchat.db"

    def workdir_for(self, room: RoomSettings) -> Path:
        if room.workdir is not None:
            return room.workdir
        return self.paths.data_dir / "rooms" / _digest(room.id)

    def home_for(self, room: RoomSettings) -> Path:
        """The room's own HOME for its sandboxed agent (its ~/.claude: sessions, settings)."""
        return self.paths.data_dir / "homes" / _digest(room.id)

    def worktrees_for(self, room: RoomSettings) -> Path:
        """Where the room's threads get their git worktrees (with `worktrees = true`): one folder per room and
        checkout, so that after `!project` a thread never finds its worktree of the former checkout."""
        checkout = str(self.workdir_for(room).resolve())
        return self.paths.data_dir / "worktrees" / _digest(room.id) / _digest(checkout)


def _digest(room_id: str) -> str:
    return hashlib.sha256(room_id.encode()).hexdigest()[:24]


def check_safety(settings: Settings) -> list[str]:
    """Refuse unsafe combinations (ConfigError); return warnings to log loudly at start-up."""
    if settings.claude.permission_mode == "bypassPermissions":
        raise ConfigError(
            "claude.permission_mode: bypassPermissions lets the agent run anything without asking; "
            "it may only be set per room ([[rooms]] permission_mode)"
        )
    # what rooms made from the chat start with is checked like a configured room
    template = settings.room_defaults.room("room_defaults", {})
    checked = [*settings.rooms, template]
    for room in checked:
        extra = settings.claude_for(room).extra_args
        if "--dangerously-skip-permissions" in extra or "--allow-dangerously-skip-permissions" in extra:
            raise ConfigError(
                f"room {room.id}: --dangerously-skip-permissions is refused in extra_args; "
                'set permission_mode = "bypassPermissions" on the room instead'
            )
    _refuse_secret_passthrough("claude", settings.claude.env_passthrough)
    for room in checked:
        _refuse_secret_passthrough(f"room {room.id}", settings.claude_for(room).env_passthrough)
    data_dir = settings.paths.data_dir
    for root in settings.daemon.project_roots:
        if not root.is_dir():
            raise ConfigError(f"daemon.project_roots: {root} is not a directory")
        if data_dir.is_relative_to(root.resolve()) or root.resolve().is_relative_to(data_dir):
            raise ConfigError(
                f"daemon.project_roots: {root} and the data directory {data_dir} overlap; "
                "the agent must not reach the daemon's own files"
            )
    owners: dict[Path, RoomSettings] = {}
    for room in settings.rooms:
        if room.workdir is not None:
            if not room.workdir.is_absolute():
                raise ConfigError(f"room {room.id}: workdir {room.workdir} must be an absolute path")
            if not room.workdir.is_dir():
                raise ConfigError(f"room {room.id}: workdir {room.workdir} does not exist")
        workdir = settings.workdir_for(room).resolve()
        if data_dir.is_relative_to(workdir):
            raise ConfigError(
                f"room {room.id}: workdir {workdir} contains the data directory {data_dir}; "
                "the agent must not reach the daemon's own files"
            )
        other = owners.setdefault(workdir, room)
        if other is not room and not (room.shared_workdir and other.shared_workdir):
            raise ConfigError(
                f"rooms {other.id} and {room.id} share the workdir {workdir}; "
                "set shared_workdir = true on both if that is intended"
            )
    for room in checked:
        mcp_config = settings.claude_for(room).mcp_config
        if mcp_config is not None and not (mcp_config.is_absolute() and mcp_config.is_file()):
            raise ConfigError(f"room {room.id}: mcp_config {mcp_config} must be the absolute path of a file")
        claude = settings.claude_for(room)
        for path in [*claude.sandbox_readonly, *claude.sandbox_writable]:
            if not (path.is_absolute() and path.exists()):
                raise ConfigError(f"room {room.id}: sandbox path {path} must be an absolute path that exists")
            if path.resolve().is_relative_to(data_dir) or data_dir.is_relative_to(path.resolve()):
                raise ConfigError(
                    f"room {room.id}: sandbox path {path} would show the agent aiagentchat's data directory {data_dir}"
                )
    warnings = []
    for room in checked:
        if settings.claude_for(room).permission_mode == "bypassPermissions":
            warnings.append(f"room {room.id} runs the agent with bypassPermissions: no tool call is asked")
        if room is not template and not room.allowed_users and not room.allowed_bots:
            warnings.append(f"room {room.id} has no allowed_users: no prompt will run there")
    return warnings


def _refuse_secret_passthrough(where: str, patterns: list[str]) -> None:
    """The daemon's own secrets may come from the environment; no env_passthrough pattern may hand them on."""
    for name in (f"AIAGENTCHAT_MATRIX__{key.upper()}" for key in SECRET_KEYS):
        if pattern := next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None):
            raise ConfigError(
                f"{where}: env_passthrough {pattern!r} would hand the daemon's secret {name} to the agent"
            )


def load_settings(path: Path | None) -> Settings:
    """Read the file (if any) and the environment; raise ConfigError with one clear message."""
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read settings: {exc.strerror}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        _refuse_secrets_in_open_file(path, data, text)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, text)) from exc
    return settings.model_copy(
        update={"paths": settings.paths.model_copy(update={"data_dir": settings.paths.data_dir.resolve()})}
    )


def _refuse_secrets_in_open_file(path: Path, data: dict[str, Any], text: str) -> None:
    matrix = data.get("matrix")
    if not isinstance(matrix, dict):
        return
    present = [key for key in SECRET_KEYS if key in matrix]
    if present and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        key = present[0]
        line = _line_of(text, ("matrix", key))
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(
            f"{where}: matrix.{key} is a secret; put it in AIAGENTCHAT_MATRIX__{key.upper()} "
            f"or make the file private (chmod 600 {path})"
        )


def _describe(exc: ValidationError, path: Path | None, text: str) -> str:
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc)
    line = _line_of(text, loc) if text else None
    where = f"{path}:{line}: " if line else (f"{path}: " if path else "")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}{key}: {error['msg']}{more}"


_TABLE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line where the key at `loc` (e.g. ("rooms", 0, "timeout_s")) is written, if found."""
    table: tuple[Any, ...] = ()
    counts: dict[str, int] = {}
    table_line: dict[tuple[Any, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if match := _TABLE.match(line):
            name = match.group(2)
            if match.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
                table = (*name.split("."), counts[name])
            else:
                table = tuple(name.split("."))
            table_line[table] = number
            continue
        if (match := _KEY.match(line)) and (*table, match.group(1)) == loc[: len(table) + 1]:
            return number
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in table_line:
            return table_line[loc[:depth]]
    return None
