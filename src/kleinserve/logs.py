"""Structured logging: text or JSON lines, each carrying the request, job and API key it concerns.

``configure_logging(fmt, level)`` installs one handler on the root logger (stderr) with either a
human-readable text format or one JSON object per line::

    {"time": "2026-12-02T01:02:03.456Z", "level": "info", "logger": "kleinserve.access",
     "message": "POST /v1/images/generations 200 0.412s", "request_id": "...", "key_id": "...",
     "job_id": "...", "method": "POST", "route": "/v1/images/generations", "status": 200, ...}

Where the ids come from: a :class:`LogContext` is held in a context variable. The HTTP layer opens
one per request (``api/access_log.py``); code further in *fills* it (the auth dependency sets the key
id, the job service the job id), and the worker opens one per job it runs. The context holds a
mutable object rather than plain values on purpose: FastAPI runs sync code in worker threads with a
*copy* of the context, and a copied reference to the same object still reaches the access log line
written when the response ends.

What never reaches a log line: a key's secret (only its id is logged), request headers, signed URL
query strings (``redact_query``), and prompts, unless the operator passes ``--log-prompts``
(``prompt_fields``). Extra structured fields are passed with ``extra={...}`` and appear as
top-level JSON keys (text format: ``key=value`` after the message).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_CONTEXT_FIELDS = ("request_id", "job_id", "key_id")
_SECRET_NAME = re.compile(r"sig|signature|token|secret|key|password|credential", re.IGNORECASE)
_log_prompts = False


@dataclass
class LogContext:
    """The ids a log line is about; filled in as a request or a job goes along."""

    request_id: str | None = None
    job_id: str | None = None
    key_id: str | None = None


_current: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar("kleinserve_log_context", default=None)


def current() -> LogContext:
    """The context of the running request or job (a detached empty one outside of both)."""
    return _current.get() or LogContext()


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[LogContext]:
    """Open a fresh :class:`LogContext` for the duration of the ``with`` block."""
    context = LogContext(**ids)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def redact_query(query: str) -> str:
    """``query`` with the values of secret-looking parameters (signatures, keys, tokens) replaced."""
    if not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, "REDACTED" if _SECRET_NAME.search(k) else v) for k, v in pairs], safe="/:")


def prompt_fields(prompt: str) -> dict[str, str]:
    """``{"prompt": prompt}`` when the operator allowed prompts in logs, else nothing."""
    return {"prompt": prompt} if _log_prompts else {}


class ContextFilter(logging.Filter):
    """Copies the current :class:`LogContext` ids onto each record (unless the caller set them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        for name in _CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, getattr(context, name) if context else None)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _CONTEXT_FIELDS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, ids, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request=.. job=.. key=..]: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s%(fields)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(
            f"{name.removesuffix('_id')}={value}"
            for name in _CONTEXT_FIELDS
            if (value := getattr(record, name, None)) is not None
        )
        record.ids = f" [{ids}]" if ids else ""
        extras = _extras(record)
        extras.pop("ids", None)
        extras.pop("fields", None)
        record.fields = "".join(f" {k}={v}" for k, v in extras.items())
        return super().format(record)


LIBRARY_LOGGERS = ("torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "torchao", "peft")


def adopt_library_loggers() -> None:
    """Route the ML libraries' loggers through the root handler (our format), dropping their own.

    torch, diffusers and transformers give their top logger a stderr handler of their own and turn
    propagation off when they are imported, which happens after :func:`configure_logging` (the
    engine is imported lazily). Called again once the models are loaded; lines those libraries
    wrote while being imported stay in their own format.
    """
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def configure_logging(fmt: LogFormat = "text", level: str = "info", *, log_prompts: bool = False) -> None:
    """Send every log record (kleinserve's, uvicorn's, libraries') to stderr in format ``fmt``."""
    global _log_prompts
    _log_prompts = log_prompts
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's loggers go through the root handler; its own access log is replaced by ours.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    adopt_library_loggers()
