import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import structlog

from aiagentchat import logs

TOKEN = "syt_YWxpY2U_abcdefghijklmnop_0a1b2c"


@contextlib.contextmanager
def configured(level: str, stream: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """logs.configure(level) writing to `stream` (default a buffer, not a terminal: JSON), undone afterwards."""
    root, own, nio = logging.getLogger(), logging.getLogger(logs.OWN_LOGGER), logging.getLogger("nio")
    saved = structlog.get_config(), root.handlers[:], root.level, own.level, nio.level
    nio.setLevel(logging.NOTSET)  # as in the daemon's process (cchat quiets nio in its own, and in its tests)
    stream = stream if stream is not None else io.StringIO()
    logs.configure(level, stream)
    try:
        yield stream
    finally:
        structlog.configure(**saved[0])
        root.handlers[:] = saved[1]
        root.setLevel(saved[2])
        own.setLevel(saved[3])
        nio.setLevel(saved[4])
        logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_library_record_is_one_json_line_with_the_token_redacted():
    with configured("info") as stream:
        logging.getLogger("nio.client").warning("GET /sync?access_token=%s&since=s1 failed: %s", TOKEN, 502)
        logging.getLogger("aiohttp.client").warning("headers {'Authorization': 'Bearer opaque-token-1'}")
        logging.getLogger("nio.responses").warning("login response {'access_token': 'opaque-token-2'}")
    nio, aiohttp, response = lines(stream)
    assert nio["event"] == "GET /sync?[redacted]&since=s1 failed: 502"
    assert (nio["level"], nio["logger"]) == ("warning", "nio.client") and nio["timestamp"].endswith("Z")
    assert aiohttp["event"] == "headers {'Authorization': 'Bearer [redacted]'}"
    assert response["event"] == "login response {'access_token': '[redacted]'}"


def test_a_library_traceback_stays_inside_its_json_line_and_is_redacted():
    with configured("info") as stream:
        try:
            raise ConnectionError(f"reset while sending {TOKEN}")
        except ConnectionError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
    (entry,) = lines(stream)
    assert entry["event"] == "Task exception was never retrieved"
    assert (entry["level"], entry["logger"]) == ("error", "asyncio")
    assert "ConnectionError: reset while sending [redacted]" in entry["exception"]
    assert TOKEN not in stream.getvalue()


def test_the_daemons_own_events_share_the_format_and_the_redaction():
    log = structlog.get_logger("aiagentchat.bot")
    with configured("info") as stream:
        structlog.contextvars.bind_contextvars(room_id="!r:x")
        try:
            log.info("logged_in", user_id="@bot:x", access_token=TOKEN, detail=f"token {TOKEN}")
        finally:
            structlog.contextvars.unbind_contextvars("room_id")
    (entry,) = lines(stream)
    assert entry == {
        "event": "logged_in",
        "user_id": "@bot:x",
        "access_token": "[redacted]",
        "detail": "token [redacted]",
        "room_id": "!r:x",
        "level": "info",
        "logger": "aiagentchat.bot",
        "timestamp": entry["timestamp"],
    }


def test_the_level_filters_debug_and_libraries_speak_from_warning_unless_debug():
    own, nio = structlog.get_logger("aiagentchat.runner"), logging.getLogger("nio.rooms")

    def say_everything() -> None:
        own.debug("own_debug")
        own.info("own_info")
        nio.debug("nio_debug")
        nio.info("nio_info")
        nio.warning("nio_warning")

    with configured("info") as stream:
        say_everything()
    assert [entry["event"] for entry in lines(stream)] == ["own_info", "nio_warning"]
    with configured("warning") as stream:
        say_everything()
    assert [entry["event"] for entry in lines(stream)] == ["nio_warning"]
    with configured("debug") as stream:
        say_everything()  # `own` was used before: a cached logger follows the new level
    everything = ["own_debug", "own_info", "nio_debug", "nio_info", "nio_warning"]
    assert [entry["event"] for entry in lines(stream)] == everything


def test_python_warnings_become_json_lines():
    with configured("info") as stream, warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old API", DeprecationWarning, stacklevel=1)
    (entry,) = lines(stream)
    assert (entry["logger"], entry["level"]) == ("py.warnings", "warning")
    assert "DeprecationWarning: an old API" in entry["event"]


def test_a_terminal_gets_readable_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with configured("info", Terminal()) as terminal:
        logging.getLogger("nio.client").warning("sync failed with %s", TOKEN)
    text = terminal.getvalue()
    assert "sync failed with [redacted]" in text and "nio.client" in text
    assert not text.startswith("{")
