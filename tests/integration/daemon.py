"""The aiagentchat daemon as a real subprocess, its JSON log lines collected for tests to wait on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CLAUDE_BIN = Path(os.environ.get("AIAGENTCHAT_CLAUDE_BIN", REPO / "node_modules" / ".bin" / "claude"))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)


def write_settings(path: Path, sections: dict[str, dict[str, Any]], rooms: list[dict[str, Any]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    for room in rooms:
        lines.append("[[rooms]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in room.items()]
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.launch()
        await self.wait_for_log("ready", timeout=60)

    async def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        self.logs.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiagentchat",
            "--config",
            str(self.config),
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read(self.proc.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            try:
                entry = json.loads(text)
            except ValueError:
                entry = {"event": "raw", "text": text}
            async with self._changed:
                self.logs.append(entry if isinstance(entry, dict) else {"event": "raw", "text": text})
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The log entries of `event` with these field values, in order."""
        return [
            entry
            for entry in self.logs
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items())
        ]

    async def wait_for_log(self, event: str, timeout: float = 30, count: int = 1, **fields: Any) -> dict[str, Any]:
        """The `count`-th log entry of `event` with these field values, once it is there."""

        def match() -> dict[str, Any] | None:
            found = self.logged(event, **fields)
            return found[count - 1] if len(found) >= count else None

        try:
            async with asyncio.timeout(timeout), self._changed:
                while (found := match()) is None:
                    if self.proc is not None and self.proc.returncode is not None and self._reader.done():
                        break
                    await self._changed.wait()
        except TimeoutError:
            found = None
        if found is None:
            tail = "\n".join(self.raw[-30:])
            raise AssertionError(f"daemon never logged {event} {fields} within {timeout} s; log tail:\n{tail}")
        return found

    async def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit by itself; its exit code."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code
