"""Per-client rate limits (token buckets in memory) on sign-ins and job-creating POSTs; 429 with Retry-After.

The cap on a session's or user's unfinished jobs (service.workflows.job_caps) is answered here as well:
429 with code `too_many_jobs`, as a page or JSON.

One bucket per client address and group, per process: each replica limits on its own, which bounds what
one client can make a replica do. Behind a proxy the address is the one uvicorn takes from
X-Forwarded-For for the proxies it trusts (FORWARDED_ALLOW_IPS).
"""

from __future__ import annotations

import html
import ipaddress
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog
from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.settings import Settings
from service.web.errors import API_PREFIX, AppError, ErrorCode, error_json

log = structlog.get_logger("carecanvas.rate_limit")

# Buckets kept at most; the least recently used goes first (an idle bucket is full again anyway).
MAX_CLIENTS = 10_000
_SIGN_IN_PATHS = frozenset({"/launch", "/portal/launch", "/compliance/login"})
_JOB_POST = re.compile(r"^(?:/api/v1)?/(?:illustrations|portraits|documents/[^/]+/regenerate)/?$")


class RateGroup(StrEnum):
    """What a limited request does: start a sign-in, or create image jobs."""

    SIGN_IN = "sign_in"
    JOB_POST = "job_post"


def rate_group(method: str, path: str) -> RateGroup | None:
    if method == "GET" and path in _SIGN_IN_PATHS:
        return RateGroup.SIGN_IN
    if method == "POST" and _JOB_POST.match(path):
        return RateGroup.JOB_POST
    return None


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class TokenBuckets:
    """`burst` requests at once, then `per_minute` a minute, per key."""

    per_minute: float
    burst: int
    max_keys: int = MAX_CLIENTS
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def take(self, key: str) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until the next token."""
        now = self.clock()
        rate = self.per_minute / 60.0
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


def client_key(host: str | None) -> str:
    """The bucket of a client address: IPv4 as is, IPv6 by its /64 (one site or device holds a whole /64)."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def limits_from(settings: Settings) -> dict[RateGroup, TokenBuckets]:
    """The configured limits; a rate of 0 switches that group's limit off."""
    configured = {
        RateGroup.SIGN_IN: (settings.launch_rate_per_minute, settings.launch_burst),
        RateGroup.JOB_POST: (settings.job_post_rate_per_minute, settings.job_post_burst),
    }
    return {
        group: TokenBuckets(per_minute=rate, burst=burst)
        for group, (rate, burst) in configured.items()
        if rate > 0
    }


_MESSAGES = {
    RateGroup.SIGN_IN: "CareCanvas got too many sign-ins from your computer in a short time.",
    RateGroup.JOB_POST: "CareCanvas got too many picture requests from your computer in a short time.",
}


def too_many_requests(group: RateGroup, retry_after: int) -> AppError:
    unit = "second" if retry_after == 1 else "seconds"
    message = f"{_MESSAGES[group]} Please wait {retry_after} {unit}, then try again. Nothing was changed."
    return AppError(429, "Too many requests", message, code=ErrorCode.RATE_LIMITED)


def refusal(request: Request, error: AppError, retry_after: int | None) -> Response:
    """The API's JSON error or the error page, with Retry-After when there is a time to give."""
    if request.url.path.startswith(API_PREFIX):
        response = error_json(request, error)
    else:
        services = getattr(request.app.state, "services", None)
        if services is None:
            page = f"<h1>{html.escape(error.title)}</h1><p>{html.escape(error.message)}</p>"
            response = HTMLResponse(page, status_code=429)
        else:
            context = {"title": error.title, "message": error.message, "status": 429, "code": error.code}
            response = services.templates.TemplateResponse(request, "error.html", context, status_code=429)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


async def too_many_jobs(request: Request, error: Exception) -> Response:
    """The exception handler for TooManyJobsError; nothing was queued (the transaction is rolled back as the
    request's database session closes)."""
    refused = AppError(429, "Too many pictures waiting", str(error), code=ErrorCode.TOO_MANY_JOBS)
    response = refusal(request, refused, retry_after=None)
    return response


class RateLimitMiddleware:
    """Refuses a limited request before any work (no body read, no database, no EHR call)."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.limits = limits_from(settings)
        self._logged_at: dict[RateGroup, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            group = rate_group(scope["method"], scope["path"])
            limit = self.limits.get(group) if group is not None else None
            if group is not None and limit is not None:
                client = scope.get("client")
                wait = limit.take(client_key(client[0] if client else None))
                if wait > 0:
                    self._log(group)
                    retry_after = max(1, math.ceil(wait))
                    request = Request(scope, receive)
                    await refusal(request, too_many_requests(group, retry_after), retry_after)(
                        scope, receive, send
                    )
                    return
        await self.app(scope, receive, send)

    def _log(self, group: RateGroup) -> None:
        # At most one line a minute per group: a flood must not become a flood of log lines.
        now = time.monotonic()
        if now - self._logged_at.get(group, -math.inf) >= 60:
            self._logged_at[group] = now
            log.warning("rate limit reached", group=group.value)
