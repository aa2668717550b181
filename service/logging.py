"""Structured JSON logging that drops anything that could carry a token, a code or patient data."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

# Keys whose values never reach a log line, whatever their content.
_SECRET_KEYS = re.compile(
    r"token|secret|code|verifier|state|nonce|password|authorization|cookie|patient|subject|prompt|caption|"
    r"alt_text|story|name|birth|note|text",
    re.IGNORECASE,
)
# Values that look like bearer tokens/JWTs or query strings are cut out of free-text messages too.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_QUERY = re.compile(r"\?[^\s\"']*")
_ALLOWED_KEYS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "logger",
        "request_id",
        "job_id",
        "job_ids",
        "status",
        "method",
        "route",
        "duration_ms",
        "resource_type",
        "action",
        "outcome",
        "worker_id",
        "count",
        "bucket",
        "device",
        "dtype",
        "model",
        "ehr",
        "step",
        "total",
        "attempts",
        "reason",
        "error_type",
        "batch_size",
        "port",
        "url_path",
        "exc_info",
        "seq",
    }
)


def bind_path_fields(path_params: Mapping[str, Any]) -> None:
    """Bind the job a request is about (its route's ``job_id``), so every line of that request names it."""
    job_id = path_params.get("job_id")
    if isinstance(job_id, str) and job_id:
        structlog.contextvars.bind_contextvars(job_id=job_id[:64])


def bind_ehr(ehr: str | None) -> None:
    """Bind the EHR of the session a request runs under (a registered name, never patient data)."""
    if ehr:
        structlog.contextvars.bind_contextvars(ehr=ehr)


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret-looking keys and scrub JWTs and query strings from the remaining string values."""
    for key in list(event_dict):
        if key in _ALLOWED_KEYS:
            value = event_dict[key]
            if isinstance(value, str):
                event_dict[key] = _QUERY.sub("?…", _JWT.sub("[jwt]", value))
            continue
        if _SECRET_KEYS.search(key):
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(level: str = "INFO", *, stream: Any = None) -> None:
    """JSON lines on stderr (or the given stream); third-party loggers go through the same redaction."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(), foreign_pre_chain=shared
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs full URLs (with query strings) at INFO; uvicorn's access log does too.
    # aiosqlite logs SQL parameters (CSRF tokens, ciphertexts) at DEBUG; authlib logs tokens at DEBUG.
    for noisy in ("httpx", "httpcore", "uvicorn.access", "aiosqlite", "authlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
