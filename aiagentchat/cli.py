"""`aiagentchat` / `python -m aiagentchat`: start the daemon; `aiagentchat verify`: verify the bot's device or a
person; `aiagentchat keys`: the bot's cross-signing keys; `aiagentchat trust`: accept a person's new identity;
`aiagentchat doctor`: check the set-up; `aiagentchat console`: the operator's screen.
Exit codes: 2 bad settings (or the bot's device in use by another process), 3 Matrix login refused, 4 the
built-in homeserver failed to start, 5 the access token was revoked while running, 6 the database failed
(it cannot be read or written); `verify` exits 1 when the device was not verified, `keys` and `trust` 1 when
they could not do what was asked; `doctor` exits 1 when a check fails."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import structlog
import typer

from aiagentchat import logs
from aiagentchat.bot import Bot
from aiagentchat.control import socket_path
from aiagentchat.doctor import missing_claude_login, report
from aiagentchat.health import Health, serving
from aiagentchat.identity import IdentityError, fingerprint
from aiagentchat.keys import accept_identity, export_keys, import_keys, reset_keys
from aiagentchat.localserver import HomeserverError, LocalHomeserver
from aiagentchat.private import check_private_dir, keep_private
from aiagentchat.sandbox import check_bwrap
from aiagentchat.secret_storage import SecretStorageError
from aiagentchat.settings import ConfigError, Settings, check_safety, load_settings
from aiagentchat.store import Store
from aiagentchat.systemd import Notifier
from aiagentchat.transport import LoginFailed, TokenRevoked, credentials_path
from aiagentchat.verify import Target, verify

EXIT_CONFIG = 2
EXIT_LOGIN = 3
EXIT_HOMESERVER = 4
EXIT_TOKEN_REVOKED = 5
EXIT_DATABASE = 6
DEFAULT_CONFIG = Path("settings.toml")

EXIT_FAILED = 1
T = TypeVar("T")
app = typer.Typer(add_completion=False, help="Drive Claude Code from Matrix rooms: with no command, run the daemon.")
keys_app = typer.Typer(add_completion=False, help="The bot's cross-signing identity (what Element checks).")
app.add_typer(keys_app, name="keys")
ConfigOption = Annotated[
    Optional[Path],  # noqa: UP007 - typer needs Optional here
    typer.Option("--config", envvar="AIAGENTCHAT_CONFIG", help="Settings file (default ./settings.toml)."),
]
log = structlog.get_logger(__name__)


async def serve(settings: Settings) -> None:
    if missing := missing_claude_login(os.environ):
        log.warning("no_claude_login", detail=missing)
    store = await Store.open(settings.database)
    try:
        bot = Bot(settings, store)
        health = Health(settings.daemon, lambda: bot.last_sync, bot.waiting_since, store.check_writable)
        notifier = Notifier.from_environment(os.environ)

        def stop() -> None:
            notifier.send("STOPPING=1")
            bot.stop()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        async with serving(health, bot.metrics), bot.control.serving(socket_path(settings.paths.data_dir)):
            notifying = asyncio.create_task(notifier.run(bot.ready, bot.sync_loop_alive))
            try:
                await bot.run()
            finally:
                notifying.cancel()
                await asyncio.gather(notifying, return_exceptions=True)
    finally:
        await store.close()


@app.callback(invoke_without_command=True)
def run(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Run the daemon until SIGTERM or Ctrl-C (with no command)."""
    keep_private()  # before any file is made, for the daemon and `verify` alike
    logs.configure()  # until the settings are read: with_settings applies their log_level
    ctx.obj = config
    if ctx.invoked_subcommand is None:
        with_settings(config, serve)
        log.info("stopped")


@app.command("verify")
def verify_command(
    ctx: typer.Context,
    user: Annotated[Optional[str], typer.Argument(help="The user whose device to verify.")] = None,  # noqa: UP007
    device: Annotated[Optional[str], typer.Argument(help="That user's device id.")] = None,  # noqa: UP007
    key: Annotated[
        Optional[str],  # noqa: UP007
        typer.Option("--key", help="DEVICE's key as the device shows it (Element: session key): compare, no emoji."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up after S seconds.")] = 300.0,
    config: ConfigOption = None,
) -> None:
    """SAS emoji verification of the bot's device with USER's DEVICE, or, without DEVICE, with whichever device
    of USER accepts the request first; without USER, with the device of an allowed user who starts it from their
    client. With --key, a comparison of DEVICE's key instead. A verified device that its owner cross-signed makes the owner verified: the bot signs their
    identity. Runs while the daemon is stopped."""
    if (device is not None and user is None) or (key is not None and device is None):
        print("aiagentchat verify: DEVICE needs USER, and --key needs both", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG)
    code = 1

    async def verifying(settings: Settings) -> None:
        nonlocal code
        code = await verify(settings, Target(user, device, key), timeout)

    with_settings(config or ctx.obj, verifying)
    raise typer.Exit(code)


@keys_app.command("export")
def keys_export(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Where to write the keys (0600), encrypted.")],
    config: ConfigOption = None,
) -> None:
    """Write the bot's cross-signing keys to FILE, encrypted under a new recovery key shown here once; with
    both, `keys import` on a rebuilt host keeps the bot's identity."""
    keys, recovery_key = _identity_step(lambda: export_keys(_settings(config or ctx.obj), file))
    print(f"Wrote the cross-signing keys of {keys.user_id} (master key {fingerprint(keys.master_key)}) to {file}.")
    print(f"Recovery key (keep it apart from the file; it is not stored anywhere):\n  {recovery_key}")


@keys_app.command("import")
def keys_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A file written by `aiagentchat keys export`.")],
    recovery_key: Annotated[
        str,
        typer.Option(
            "--recovery-key",
            envvar="AIAGENTCHAT_RECOVERY_KEY",
            prompt=True,
            hide_input=True,
            help="The recovery key `keys export` showed.",
        ),
    ],
    config: ConfigOption = None,
) -> None:
    """Keep the keys in FILE as the bot's identity; the daemon signs its device with them when it next starts."""
    keys = _identity_step(lambda: import_keys(_settings(config or ctx.obj), file, recovery_key))
    print(f"Imported the cross-signing keys of {keys.user_id} (master key {fingerprint(keys.master_key)}).")


@keys_app.command("reset")
def keys_reset(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Replace the bot's identity with a new one (needs AIAGENTCHAT_MATRIX__PASSWORD; run while the daemon is
    stopped). People who verified the bot must verify it again."""
    made = []

    async def resetting(settings: Settings) -> None:
        made.append(await reset_keys(settings))

    _identity_step(lambda: with_settings(config or ctx.obj, resetting))
    print(f"✅ New identity for {made[0].user_id}: master key {fingerprint(made[0].master_key)}.")


@app.command("trust")
def trust_command(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The person whose new identity to accept, e.g. @alice:example.org.")],
    config: ConfigOption = None,
) -> None:
    """Accept USER's new cross-signing identity after the daemon refused them because it changed (it works while
    the daemon runs)."""
    print(accept_identity(_settings(config or ctx.obj), user))


@app.command("console")
def console_command(ctx: typer.Context, config: ConfigOption = None) -> None:
    """The operator's console: every room of the running daemon, live, with its running prompt, queue, waiting
    approval and log; keys to stop, drop, allow, deny, always and start a new conversation. It talks to the
    daemon's control socket (data_dir/control.sock) and can attach and detach at any time."""
    from aiagentchat.console import Console  # Textual only for this command: the daemon's start stays light

    Console(socket_path(_settings(config or ctx.obj).paths.data_dir)).run()


@app.command("doctor")
def doctor_command(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Check what the daemon needs: the settings, the homeserver and the bot's login, every room (joined, allowed
    users, encryption and trust, working directory), bubblewrap, the Claude Code CLI and its handshake, model
    credentials, the rate limit and cross-signing. One line each (✅, ⚠️ or ❌ with the fix); exit code 1 when
    something is ❌. Read-only: safe while the daemon runs."""
    logging.getLogger("nio").setLevel(logging.ERROR)  # its warnings about refused requests: doctor's lines say it
    code = asyncio.run(report(_config_path(config or ctx.obj), os.environ, lambda line: print(line, flush=True)))
    raise typer.Exit(code)


def _config_path(config: Path | None) -> Path | None:
    """The settings file: --config (or AIAGENTCHAT_CONFIG), else ./settings.toml when there is one."""
    return config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)


def _settings(config: Path | None) -> Settings:
    path = _config_path(config)
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"aiagentchat: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG) from None


def _identity_step(step: Callable[[], T]) -> T:
    try:
        return step()
    except (IdentityError, SecretStorageError, ConfigError) as exc:
        print(f"aiagentchat: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED) from None


def with_settings(config: Path | None, main: Callable[[Settings], Awaitable[None]]) -> None:
    """Load the settings and run `main` with them (inside the built-in homeserver when none is configured);
    a problem becomes its exit code."""
    path = _config_path(config)
    try:
        settings = load_settings(path)
        warnings = check_safety(settings)
        check_bwrap(settings)
        check_private_dir(settings.paths.data_dir, settings.database)
        # no homeserver configured: run the built-in one (it refuses a configured account without a homeserver)
        local = None if settings.matrix.homeserver else LocalHomeserver.for_settings(settings, config=path)
    except ConfigError as exc:
        print(f"aiagentchat: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG) from None
    logs.configure(settings.daemon.log_level)
    for warning in warnings:
        log.warning("unsafe_setting", detail=warning)
    if unwalled := [room.id for room in settings.rooms if settings.claude_for(room).sandbox == "off"]:
        log.warning(
            "sandbox_off",
            rooms=unwalled,
            detail="these rooms' agents run unsandboxed, as the daemon's user with its HOME: they can read the "
            "daemon's data directory, other rooms and the daemon's environment",
        )
    if password_still_set(settings):
        log.warning(
            "password_still_set",
            detail=f"matrix.password (AIAGENTCHAT_MATRIX__PASSWORD) is needed only for the first login and "
            f"{credentials_path(settings)} now holds the login: remove the password from the environment and "
            "the settings",
        )
    try:
        asyncio.run(main(settings) if local is None else local.run(settings, main))
    except* LoginFailed as group:
        log.error("login_failed", reason=str(group.exceptions[0]))
        raise typer.Exit(EXIT_LOGIN) from None
    except* TokenRevoked as group:
        log.error("token_revoked", reason=str(group.exceptions[0]))
        raise typer.Exit(EXIT_TOKEN_REVOKED) from None
    except* ConfigError as group:
        print(f"aiagentchat: {group.exceptions[0]}", file=sys.stderr)
        raise typer.Exit(EXIT_CONFIG) from None
    except* sqlite3.DatabaseError as group:
        log.error("database_failed", reason=f"{type(group.exceptions[0]).__name__}: {group.exceptions[0]}")
        raise typer.Exit(EXIT_DATABASE) from None
    except* HomeserverError as group:
        print(f"aiagentchat: the built-in homeserver failed: {group.exceptions[0]}", file=sys.stderr)
        raise typer.Exit(EXIT_HOMESERVER) from None


def password_still_set(settings: Settings) -> bool:
    """Whether the password is still given although the saved login made it unnecessary."""
    password = settings.matrix.password
    return password is not None and password.get_secret_value() != "" and credentials_path(settings).exists()


def main() -> None:
    app()
