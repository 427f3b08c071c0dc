"""structlog set-up: readable on a terminal, JSON lines otherwise, secrets never printed."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

SECRET_FIELD = re.compile(r"(token|password|secret|pickle|api_key|authorization)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"(syt_[A-Za-z0-9_=-]{8,}|sk-ant-[A-Za-z0-9_-]{8,}|access_token=[^&\s\"']+)")
REDACTED = "[redacted]"


def redact(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Hide values under secret-looking keys and anything shaped like a token, wherever it appears."""
    for key, value in list(event_dict.items()):
        if SECRET_FIELD.search(key) and value is not None:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = SECRET_VALUE.sub(REDACTED, value)
    return event_dict


def configure(level: str = "INFO") -> None:
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
