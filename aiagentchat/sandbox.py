"""The wall around a room's agent: the bubblewrap (`bwrap`) command that runs the Claude Code CLI with the
system read-only, the room's working directory and its own home read-write, a private /tmp and its own PID
namespace. Nothing else of the machine is there: not the data directory, other rooms, the daemon's home or
its processes. The network is kept (the model API)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from aiagentchat.settings import ClaudeSettings, ConfigError, RoomSettings, Settings

# bound read-only when present (--ro-bind-try): programs, libraries, configuration
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
CREDENTIALS = Path(".claude") / ".credentials.json"  # the CLI's own login (`claude /login`), under a home
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Wall:
    """What one room's sandbox holds besides the system."""

    bwrap: str
    workdir: Path
    home: Path  # the room's own HOME: its ~/.claude (sessions, settings), read-write
    readonly: tuple[Path, ...]  # bound read-only at their own paths: the room's MCP config, the DNS resolver's,
    # `sandbox_readonly`
    writable: tuple[Path, ...]  # bound read-write at their own paths: `sandbox_writable`
    credentials: Path | None  # the daemon's CLI login, bound read-only into the room's home

    def argv(self, command: list[str]) -> list[str]:
        """bwrap running `command`, whose first word is the CLI's real path (`installation`)."""
        args = [self.bwrap, "--die-with-parent", "--unshare-pid", "--proc", "/proc", "--dev", "/dev"]
        for path in SYSTEM_PATHS:
            args += ["--ro-bind-try", path, path]
        args += ["--tmpfs", "/tmp"]  # before the binds: a room's directories may live under /tmp
        for path in (installed_under(Path(command[0])), *self.readonly):
            args += ["--ro-bind", str(path), str(path)]
        for path in self.writable:
            args += ["--bind", str(path), str(path)]
        args += ["--bind", str(self.home), str(self.home)]
        if self.credentials is not None:
            args += ["--ro-bind", str(self.credentials), str(self.home / CREDENTIALS)]
        args += ["--bind", str(self.workdir), str(self.workdir), "--chdir", str(self.workdir)]
        return [*args, "--", *command]


def installation(binary: str) -> Path:
    """The CLI's real path, found like the shell finds it (FileNotFoundError when it is not there)."""
    found = shutil.which(binary)
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", binary)
    return Path(found).resolve()


def installed_under(binary: Path) -> Path:
    """The directory to bind for the CLI: its outermost node_modules (npm installs it with its platform
    package), else the directory of the binary itself."""
    parts = binary.parts
    if "node_modules" in parts:
        return Path(*parts[: parts.index("node_modules") + 1])
    return binary.parent


def wall_for(claude: ClaudeSettings, workdir: Path, home: Path, daemon_home: Path) -> Wall:
    """The wall of a room with these effective settings (`sandbox = "bwrap"`)."""
    readonly = list(claude.sandbox_readonly)
    if claude.mcp_config is not None:
        readonly.append(claude.mcp_config)
    resolver = Path("/etc/resolv.conf").resolve()  # e.g. systemd-resolved's, under /run
    if not resolver.is_relative_to("/etc") and resolver.exists():
        readonly.append(resolver)
    credentials = daemon_home / CREDENTIALS
    return Wall(
        bwrap=shutil.which("bwrap") or "bwrap",
        workdir=workdir,
        home=home,
        readonly=tuple(readonly),
        writable=tuple(claude.sandbox_writable),
        credentials=credentials if credentials.is_file() else None,
    )


def prepare_home(wall: Wall) -> None:
    """Make the room's home (0700) with the ~/.claude the CLI writes to (and the credentials bind needs)."""
    wall.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    (wall.home / ".claude").mkdir(exist_ok=True, mode=0o700)


def check_bwrap(settings: Settings) -> None:
    """At start-up: when a room is to be walled in (one in the settings, the built-in homeserver's room "local",
    or one an admin may make from the chat with the room defaults), bwrap must be able to run here (ConfigError
    if not)."""
    rooms = list(settings.rooms)
    if not settings.matrix.homeserver:
        rooms.append(RoomSettings(id="!local:localhost"))
    if settings.daemon.admins:
        rooms.append(settings.room_defaults.room("!made-from-chat:x", {}))
    if any(settings.claude_for(room).sandbox == "bwrap" for room in rooms):
        probe_bwrap()


def probe_bwrap() -> None:
    """Whether bwrap runs here and can make what a wall needs: its namespaces, a fresh /proc and /dev (as
    `Wall.argv` does); ConfigError if not."""
    fix = 'install bubblewrap (apt-get install bubblewrap) or set sandbox = "off" in [claude] or per room'
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ConfigError(f"the agent sandbox needs bwrap, which is not on PATH; {fix}")
    try:
        probe = subprocess.run(
            [bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--proc", "/proc", "--dev", "/dev", "true"],
            check=False,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"the agent sandbox cannot run: {bwrap} failed ({exc}); {fix}") from exc
    if probe.returncode != 0:
        why = " ".join(probe.stderr.split()) or f"exit code {probe.returncode}"
        if "mount proc" in why:  # podman masks parts of /proc, and the kernel then refuses a fresh one
            fix = "in a podman container, run it with --security-opt 'unmask=/proc/*' (README: Container); or " + fix
        raise ConfigError(f"the agent sandbox cannot run: {why}; {fix} (user namespaces may be disabled here)")
