"""structlog set-up: JSON lines in production, readable in a terminal, and a
processor that masks card numbers, tracks, PIN blocks and keys in every event."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_PAN = re.compile(r"(?<![0-9])([0-9]{6})([0-9]{2,9})([0-9]{4})(?![0-9])")
_SECRET_KEYS = {"pin_block", "pin", "track2", "track3", "key", "tmk", "mak", "pik", "tdk", "fields"}
_PAN_KEYS = {"card", "card_number", "pan", "bank_card"}


def mask_pan(value: str) -> str:
    """Keep the first 6 and last 4 digits of anything that looks like a card number."""
    return _PAN.sub(lambda m: m.group(1) + "*" * len(m.group(2)) + m.group(3), value)


def _mask(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if key == "exception" and isinstance(value, str):
            event[key] = mask_pan(value)
        elif key in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str) and (key in _PAN_KEYS or len(value) >= 12):
            event[key] = mask_pan(value)
    return event


# Fields never logged, whatever the level: track data, PIN data, keys, MACs, IC data.
_REDACTED_FIELDS = {"35", "36", "45", "52", "55", "62", "64", "128"}
# Fields that may hold a card number: masked to first 6 and last 4.
_PAN_FIELDS = {"2", "48"}


def masked_fields(fields: dict[str, str]) -> dict[str, str]:
    """An ISO message as it may appear in a log line."""
    out = {}
    for key, value in fields.items():
        if key in _REDACTED_FIELDS:
            out[key] = f"[{len(value)} redacted]"
        elif key in _PAN_FIELDS:
            out[key] = mask_pan(value)
        else:
            out[key] = value
    return out


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# Set by configure(); lets hot paths skip building debug-only data.
debug_enabled = False


def configure(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    global debug_enabled
    stream = stream or sys.stderr
    if level not in LEVELS:
        raise ValueError(f"log level is one of {', '.join(LEVELS)}")
    debug_enabled = level == "debug"
    if json is None:
        json = not stream.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # before masking: tracebacks are masked too
            _mask,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        # One write per line (print would write the newline apart): the lines of several
        # processes on one stream (serve --workers) never run into each other.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(LEVELS[level], logging.INFO), stream=stream,
                        format="%(levelname)s %(name)s %(message)s", force=True)
