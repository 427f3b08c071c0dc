"""systemd's notify protocol (sd_notify(3)), which `Type=notify` and `WatchdogSec=` in deploy/aiagentchat.service
rely on: one datagram per state change on `$NOTIFY_SOCKET`. A few lines instead of a dependency; without the
variable (not under systemd) every call does nothing."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        # a leading "@" names a socket in the abstract namespace, whose real name starts with a NUL byte
        self.address = "\0" + address[1:] if address and address.startswith("@") else address or None
        self.watchdog_s = watchdog_s
        self._failing = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Notifier:
        """The notifier systemd asks for: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when the watchdog is meant for this
        process (`WATCHDOG_PID`, when set, names it)."""
        usec = env.get("WATCHDOG_USEC", "")
        ours = env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        watchdog_s = int(usec) / 1_000_000 if usec.isdigit() and int(usec) > 0 and ours else None
        return cls(env.get("NOTIFY_SOCKET"), watchdog_s)

    def send(self, state: str) -> None:
        """Send one state (`READY=1`, `WATCHDOG=1`, `STOPPING=1`); never blocks, never raises: systemd missing
        a message must not stop the daemon. A failure is logged once until a send works again."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(state.encode(), self.address)
        except OSError as exc:
            if not self._failing:
                log.warning("systemd_notify_failed", state=state, error=f"{type(exc).__name__}: {exc}")
            self._failing = True
            return
        self._failing = False

    async def run(self, ready: asyncio.Event, healthy: Callable[[], bool]) -> None:
        """`READY=1` once the daemon is ready, then, with a watchdog, `WATCHDOG=1` every half of its period while
        `healthy()`: a hung event loop or sync loop gets the daemon restarted."""
        await ready.wait()
        self.send("READY=1")
        if self.watchdog_s is None:
            return
        while True:
            if healthy():
                self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)
