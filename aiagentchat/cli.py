"""`aiagentchat` / `python -m aiagentchat`: start the daemon. Exit codes: 2 bad settings, 3 Matrix login refused."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import structlog
import typer

from aiagentchat import logs
from aiagentchat.bot import Bot, LoginFailed
from aiagentchat.settings import ConfigError, Settings, load_settings
from aiagentchat.store import Store

EXIT_CONFIG = 2
EXIT_LOGIN = 3
DEFAULT_CONFIG = Path("settings.toml")

app = typer.Typer(add_completion=False, help="Drive Claude Code from Matrix rooms.")
log = structlog.get_logger(__name__)


async def serve(settings: Settings) -> None:
    store = await Store.open(settings.paths.data_dir / "aiagentchat.db")
    bot = Bot(settings, store)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bot.stop)
    try:
        await bot.run()
    finally:
        await store.close()


@app.command()
def run(
    config: Annotated[
        Optional[Path],  # noqa: UP007 - typer needs Optional here
        typer.Option("--config", envvar="AIAGENTCHAT_CONFIG", help="Settings file (default ./settings.toml)."),
    ] = None,
) -> None:
    """Run the daemon until SIGTERM or Ctrl-C."""
    logs.configure()
    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"aiagentchat: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG) from None
    try:
        asyncio.run(serve(settings))
    except* LoginFailed as group:
        log.error("login_failed", reason=str(group.exceptions[0]))
        raise typer.Exit(EXIT_LOGIN) from None
    log.info("stopped")


def main() -> None:
    app()
