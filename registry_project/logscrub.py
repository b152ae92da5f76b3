"""Keeps API keys out of every log line: query strings, bearer values and key-shaped strings are masked.

uvicorn logs each websocket handshake at INFO with its full path and query string, so a client
that authenticates with ``?token=<key>`` would leave its key in the log; an HTTP access log (when
enabled) does the same. Rather than filter one logger, ``configure`` (Django's LOGGING_CONFIG)
installs a log-record factory that scrubs every record created in the process, whichever logger
and handler it goes to: the uvicorn server, the Celery worker and beat and management commands all
run ``django.setup()``, so each of them gets it.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

MASK = "[scrubbed]"

# The query string after a path (/x/y?a=b, or a full URL): dropped whole, since any parameter
# name can be percent-encoded (?%74oken=...) past a name-based filter.
_QUERY = re.compile(r"(/[^\s?#\"'<>]*)\?[^\s\"'#<>]+")
# A token parameter outside a path (a raw query_string).
_TOKEN_PARAM = re.compile(r"(?i)(\btoken=)[^&\s\"'<>]+")
# Authorization header values, as a websocket library may log them at DEBUG.
_AUTH_VALUE = re.compile(r"(?i)(\b(?:bearer|token)\s+)[A-Za-z0-9._~+/=-]{16,}")
# The Sec-WebSocket-Protocol convention "token.<key>".
_SUBPROTOCOL = re.compile(r"(?i)(\btoken\.)[A-Za-z0-9._~-]{8,}")
# Keys made by ApiToken.generate_key ("cr_" + 43 url-safe characters), wherever they appear.
_KEY = re.compile(r"\bcr_[A-Za-z0-9_-]{16,}")

_PATTERNS = (
    (_QUERY, r"\1?" + MASK),
    (_TOKEN_PARAM, r"\1" + MASK),
    (_AUTH_VALUE, r"\1" + MASK),
    (_SUBPROTOCOL, r"\1" + MASK),
    (_KEY, "cr_" + MASK),
)


# Every pattern above needs one of these; most log lines have none and cost one search.
_TRIGGER = re.compile(r"\?|cr_|(?i:token|bearer)")


def scrub(text: str) -> str:
    """``text`` with query strings and anything that looks like an API key masked."""
    if not _TRIGGER.search(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub_value(value: Any) -> Any:
    return scrub(value) if isinstance(value, str) else value


def scrub_record(record: logging.LogRecord) -> None:
    """Scrub ``record`` in place, keeping its msg/args shape where that is already enough.

    Formatters such as uvicorn's access formatter read ``record.args`` as a tuple, so string
    arguments are scrubbed one by one; only when the rendered message still holds a secret (one
    hidden in a non-string argument) is the record collapsed to its scrubbed message.
    """
    if isinstance(record.msg, str):
        record.msg = scrub(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(_scrub_value(a) for a in record.args)
    elif isinstance(record.args, Mapping):
        record.args = {k: _scrub_value(v) for k, v in record.args.items()}
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a badly formatted record is logging's to report, not ours
        message = None
    if message is not None and scrub(message) != message:
        record.msg, record.args = scrub(message), None
    if record.exc_info and not record.exc_text:
        # The Formatter would render this later, unscrubbed; render it now (it caches exc_text).
        record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))


def _scrubbing_factory(base: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        scrub_record(record)
        return record

    factory.scrubs = True  # type: ignore[attr-defined]
    return factory


def install() -> None:
    """Make every log record of this process scrubbed at creation (idempotent)."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "scrubs", False):
        logging.setLogRecordFactory(_scrubbing_factory(current))


def configure(config: dict[str, Any]) -> None:
    """Django's LOGGING_CONFIG: ``dictConfig`` plus the scrubbing record factory.

    LOG_LEVEL, when set in the environment, also sets uvicorn's loggers (which uvicorn's own
    ``--log-level`` configured before Django was loaded), so one variable governs every line.
    """
    logging.config.dictConfig(config)
    install()
    level = os.environ.get("LOG_LEVEL")
    if level:
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(level.upper())
