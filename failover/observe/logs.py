"""The daemons' log records: ``--log-format text|json`` and ``--log-level``.

Text is a line for people, as before. JSON is one object per line for a log pipeline: the
time, level, logger, message, the daemon (``host``: an agent's host id or ``coordinator``) and
every field a call passed with ``extra=`` (a role change's service, role and epoch; a history
event's kind and details), so a record can be filtered by its fields rather than by parsing
its text. `event_fields` builds those fields the same way everywhere.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from failover import defaults
from failover.errors import ConfigError

# What every LogRecord carries: anything else on a record came with `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}
EVENT = "event"  # the field naming what happened ("role_change", "failover", ...)


def check_log_format(value: str) -> str:
    """The ``--log-format`` given, checked; ConfigError naming the choices."""
    if value not in defaults.LOG_FORMATS:
        raise ConfigError(f"log format {value!r}: choose one of "
                          f"{', '.join(defaults.LOG_FORMATS)}")
    return value


def check_log_level(value: str) -> str:
    """The ``--log-level`` given (any case), upper-cased; ConfigError naming the choices."""
    level = str(value).strip().upper()
    if level not in defaults.LOG_LEVELS:
        raise ConfigError(f"log level {value!r}: choose one of "
                          f"{', '.join(defaults.LOG_LEVELS)}")
    return level


def event_fields(event: str, **fields: Any) -> dict[str, Any]:
    """The ``extra=`` of a structured record: `event` names what happened, `fields` its
    details (each becomes a key of the JSON object; none may shadow a LogRecord attribute)."""
    clash = _STANDARD.intersection(fields)
    if clash:  # logging raises KeyError for some of these only; refuse them all, early
        raise ValueError(f"log fields {sorted(clash)} would shadow LogRecord attributes")
    return {EVENT: event, **fields}


# The keys the JSON formatter writes itself: a field of the same name is renamed.
_OWN = frozenset({"ts", "level", "logger", "host", "msg", "exc", EVENT})


def safe_fields(fields: dict[str, Any], prefix: str = "detail_") -> dict[str, Any]:
    """`fields` (a history row's details, say) with every key that would clash with a
    LogRecord attribute or a key of the JSON object renamed to `prefix` + key."""
    return {(prefix + k if k in _STANDARD or k in _OWN else k): v for k, v in fields.items()}


def _field(value: Any) -> Any:
    """A JSON value for one field: JSON types as they are, anything else as its text, cut
    at `LOG_FIELD_CHARS_MAX` so one huge value cannot make a record unbounded."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        limit = defaults.LOG_FIELD_CHARS_MAX
        return value if len(value) <= limit else value[:limit] + "...(cut)"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_field(v) for v in list(items)[:256]]
    if isinstance(value, dict):
        return {str(k): _field(v) for k, v in list(value.items())[:256]}
    return _field(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``host``,
    ``msg``, the ``extra=`` fields, and ``exc`` with the traceback when there is one."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "host": self.host,
            "msg": _field(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = _field(value)
        if record.exc_info:
            out["exc"] = _field(self.formatException(record.exc_info))
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def text_formatter(host: str) -> logging.Formatter:
    """The text format: a line for people, the daemon's name after the time."""
    return logging.Formatter(f"%(asctime)s {host} %(levelname)s %(name)s: %(message)s")


def configure(host: str, log_format: str = defaults.LOG_FORMAT,
              level: str = defaults.LOG_LEVEL, stream: TextIO | None = None) -> None:
    """Sets up the root logger of a daemon: one handler on `stream` (stderr) in `log_format`
    at `level` (both checked: ConfigError), replacing any handler set before (an agent that
    re-executes itself sets it up again)."""
    check_log_format(log_format)
    level = check_log_level(level)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(host) if log_format == "json" else text_formatter(host))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
