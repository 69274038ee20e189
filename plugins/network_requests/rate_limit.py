"""What an HTTP response means and how long to wait: pure decisions, no I/O.

Everything here takes the current time as an argument (``now``) and the randomness
as a callable (``rand``), so every rule is testable without a clock or a sleep.
The operator in :mod:`network_requests.operators` turns these decisions into
Airflow effects (reschedule, retry, fail).

No header is parsed here: :func:`network_requests.rate_limit_headers.read_rate_limit_headers`
reads them all into a :class:`~network_requests.rate_limit_headers.RateLimitInfo`, and the wait
for a rate-limited answer is, in this order:

1. the wait the server asked for (:meth:`RateLimitInfo.wait_seconds`: ``Retry-After``, else the
   reset of a spent quota from ``RateLimit``, ``RateLimit-Reset`` or ``X-RateLimit-Reset``);
2. a backoff built on the task's ``retry_delay``, with the reason any header was not used.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from network_requests.rate_limit_headers import (
    MAX_HORIZON_SECONDS,
    RateLimitInfo,
    lower_headers,
    read_rate_limit_headers,
)

# RFC 9110 §15.5.9 (408), §15.6 (5xx): worth another try of the same request.
TRANSIENT_STATUS_CODES = frozenset({408})
#: draft-ietf-httpapi-idempotency-key-header §2.7: a request whose Idempotency-Key names a
#: request the server is still processing is answered 409 Conflict. (A key reused with another
#: payload is 422: a mistake no wait mends, so that stays permanent.)
STILL_PROCESSING_STATUS = 409

#: ``classify`` uses only the remaining count, which no clock changes; any moment will do.
_ANY_MOMENT = datetime(2000, 1, 1, tzinfo=timezone.utc)


class Outcome(enum.Enum):
    """What a response means for the task."""

    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"
    #: The server is still processing an earlier send of this request (a 409 to a request that
    #: carried an Idempotency-Key): wait as for a rate limit, spending no try, and send it again
    #: with the same key. It says nothing of the API's quota, so the shared gate holds no one else.
    IN_PROGRESS = "in_progress"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class WaitSource(str, enum.Enum):
    """Where a rate-limit wait came from (logged and reported in metrics)."""

    RETRY_AFTER = "Retry-After"
    #: The structured ``RateLimit`` field (draft-ietf-httpapi-ratelimit-headers).
    RATELIMIT = "RateLimit"
    RATELIMIT_RESET = "RateLimit-Reset"
    X_RATELIMIT_RESET = "X-RateLimit-Reset"
    BACKOFF = "backoff"
    INITIAL_DELAY = "initial_delay"
    SHARED_GATE = "shared gate"


@dataclass(frozen=True)
class RateLimitWait:
    """How long to wait before the next request, and why."""

    seconds: float
    source: WaitSource
    not_before: datetime
    #: Why a header was not used (malformed value), for the log; ``None`` if all was well.
    fallback_reason: str | None = None


@dataclass(frozen=True)
class Backoff:
    """The task's own retry settings, reused for rate limits without a usable header.

    Mirrors Airflow's retry backoff: ``retry_delay * multiplier ** n``, capped by
    ``max_delay``; jitter only ever adds, so the wait is never below ``retry_delay``.
    Like every wait, it is at most ``MAX_HORIZON_SECONDS`` (7 days).
    """

    retry_delay: timedelta
    multiplier: float = 0.0
    max_delay: timedelta | None = None
    jitter: float = 0.1

    def seconds(self, consecutive_waits: int, rand: Callable[[], float]) -> float:
        """The backoff for the wait that follows ``consecutive_waits`` earlier waits."""
        base = max(self.retry_delay.total_seconds(), 0.0)
        if self.multiplier and self.multiplier != 1.0 and self.multiplier > 0:
            try:
                base *= self.multiplier ** max(consecutive_waits, 0)
            except OverflowError:
                base = MAX_HORIZON_SECONDS
        base = min(base, MAX_HORIZON_SECONDS)
        fraction = rand()
        fraction = 0.0 if math.isnan(fraction) else min(max(fraction, 0.0), 1.0)
        jitter = self.jitter if math.isfinite(self.jitter) else 0.0
        value = base + base * max(jitter, 0.0) * fraction
        if math.isnan(value):
            value = base
        if self.max_delay is not None:
            value = min(value, self.max_delay.total_seconds())
        return min(max(value, self.retry_delay.total_seconds(), 0.0), float(MAX_HORIZON_SECONDS))


def classify(status_code: int, headers: Mapping[str, str], *, sent_idempotency_key: bool = False) -> Outcome:
    """What a status means (``sent_idempotency_key``: the request carried an Idempotency-Key).

    - 2xx: success.
    - 429, 503 with ``Retry-After``, and 403 with a ``Retry-After`` or a spent quota
      (GitHub answers its rate limits with 403): rate limited.
    - 409 to a request that carried an Idempotency-Key: in progress (an earlier send of it, cut
      by a killed worker say, is still being processed; the same send will get its answer).
    - other 5xx, 408: transient, worth a retry.
    - everything else (other 4xx, a 409 without a key, unfollowed 3xx, 1xx): permanent.
    """
    if 200 <= status_code < 300:
        return Outcome.SUCCESS
    if status_code == 429:
        return Outcome.RATE_LIMITED
    if status_code == STILL_PROCESSING_STATUS and sent_idempotency_key:
        return Outcome.IN_PROGRESS
    if status_code in (503, 403):
        # Retry-After's presence says "rate limited" even when its value can't be read: the
        # wait decision then falls back to a backoff and says why.
        if "retry-after" in lower_headers(headers):
            return Outcome.RATE_LIMITED
        if status_code == 403 and read_rate_limit_headers(status_code, headers, now=_ANY_MOMENT).quota_exhausted:
            return Outcome.RATE_LIMITED
    if status_code >= 500 or status_code in TRANSIENT_STATUS_CODES:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


#: RateLimitInfo.source -> WaitSource.
_WAIT_SOURCES = {
    "Retry-After": WaitSource.RETRY_AFTER,
    "RateLimit": WaitSource.RATELIMIT,
    "RateLimit-Reset": WaitSource.RATELIMIT_RESET,
    "X-RateLimit-Reset": WaitSource.X_RATELIMIT_RESET,
}


def decide_rate_limit_wait(
    info: RateLimitInfo,
    *,
    now: datetime,
    backoff: Backoff,
    consecutive_waits: int,
    rand: Callable[[], float],
) -> RateLimitWait:
    """How long to wait after a rate-limited (or in-progress) response, from what its headers said (``info``).

    The server's wait when it asked for one, else the backoff; ``fallback_reason`` lists the
    headers that were present but not used. Raises only ``TypeError`` for an ``info`` that is
    not the reader's result (raw headers: read them with ``read_rate_limit_headers`` first).
    """
    if not isinstance(info, RateLimitInfo):
        raise TypeError(f"decide_rate_limit_wait takes read_rate_limit_headers(status_code, headers, now=...)'s "
                        f"RateLimitInfo, not {type(info).__name__}")
    reason = "; ".join(info.rejected) or None
    asked = info.wait_seconds()
    if asked is not None:
        return _wait(asked, _WAIT_SOURCES.get(info.source or "", WaitSource.RETRY_AFTER), now, reason)
    return _wait(backoff.seconds(consecutive_waits, rand), WaitSource.BACKOFF, now, reason)


def _wait(seconds: float, source: WaitSource, now: datetime, reason: str | None) -> RateLimitWait:
    seconds = 0.0 if math.isnan(seconds) else min(max(seconds, 0.0), float(MAX_HORIZON_SECONDS))
    return RateLimitWait(
        seconds=seconds,
        source=source,
        not_before=now + timedelta(seconds=seconds),
        fallback_reason=reason,
    )


def wait_limit_violation(
    wait: RateLimitWait,
    *,
    waited_so_far: timedelta,
    max_single_wait: timedelta | None,
    total_timeout: timedelta | None,
) -> str | None:
    """Why a wait must not be started (a message for the user), or ``None`` when it may.

    The total is checked against the wait about to start, so the task fails now
    instead of waiting only to fail afterwards.
    """
    asked = timedelta(seconds=wait.seconds)
    if max_single_wait is not None and asked > max_single_wait:
        return (
            f"the server asked to wait {_human(asked)} ({wait.source.value}), "
            f"longer than max_rate_limit_wait={_human(max_single_wait)}"
        )
    if total_timeout is not None and waited_so_far + asked > total_timeout:
        return (
            f"waiting {_human(asked)} more ({wait.source.value}) after {_human(waited_so_far)} "
            f"already spent waiting on rate limits would exceed rate_limit_timeout={_human(total_timeout)}"
        )
    return None


def _human(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"
