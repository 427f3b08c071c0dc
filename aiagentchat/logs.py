"""structlog set-up: readable on a terminal, JSON lines otherwise, secrets never printed. The daemon's own events
and the records of stdlib-logging libraries (nio, aiohttp, asyncio, warnings) go out through one handler, in
one format, through the same redaction."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

SECRET_FIELD = re.compile(r"(token|password|secret|pickle|api_key|authorization)", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"syt_[A-Za-z0-9_=-]{8,}|sk-ant-[A-Za-z0-9_-]{8,}|access_token=[^&\s\"']+"
    r"|(?<=[\"']access_token[\"']: [\"'])[^\"']+|(?<=Bearer )[^\s\"',]+"
)
REDACTED = "[redacted]"
OWN_LOGGER = "aiagentchat"

# What structlog's events and foreign records both get before rendering.
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def redact(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Hide values under secret-looking keys and anything shaped like a token, wherever it appears."""
    for key, value in list(event_dict.items()):
        if SECRET_FIELD.search(key) and value is not None:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = SECRET_VALUE.sub(REDACTED, value)
    return event_dict


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Log the daemon's events at `level` and up. Libraries log warnings and up, everything at `debug` (nio
    alone writes several lines per sync at info). Calling it again changes the level and the stream."""
    stream = stream if stream is not None else sys.stderr
    renderer: Any = structlog.dev.ConsoleRenderer() if stream.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(renderer))
    number = logging.getLevelNamesMapping()[level.upper()]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(number if number == logging.DEBUG else max(number, logging.WARNING))
    logging.getLogger(OWN_LOGGER).setLevel(number)
    logging.captureWarnings(True)


def formatter(renderer: Any = None) -> logging.Formatter:
    """Records (the daemon's events and the libraries' alike) as the log shows them, redacted; JSON by default
    (the control socket streams them so)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer if renderer is not None else structlog.processors.JSONRenderer(),
        ],
    )
