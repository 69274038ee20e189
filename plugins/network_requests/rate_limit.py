"""What an HTTP response means and how long to wait: pure decisions, no I/O.

Everything here takes the current time as an argument (``now``) and the randomness
as a callable (``rand``), so every rule is testable without a clock or a sleep.
The operator in :mod:`network_requests.operators` turns these decisions into
Airflow effects (reschedule, retry, fail).

Header sources, in the order they are consulted for a rate-limited response:

1. ``Retry-After`` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.
2. A reset header, only when the remaining quota is 0 (or not sent at all):
   ``RateLimit-Reset`` (IETF draft-ietf-httpapi-ratelimit-headers, delta-seconds),
   the structured ``RateLimit: "policy";r=0;t=30`` field of the later drafts, and
   ``X-RateLimit-Reset`` (epoch seconds as GitHub sends it; small values are read
   as delta-seconds, as some APIs send them).
3. A backoff built on the task's ``retry_delay``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

# Anything longer than this is not a plausible wait; clamping keeps datetime
# arithmetic from overflowing on absurd headers. The operator's own cap
# (max_rate_limit_wait, default 1 hour) turns such a wait into a clear failure.
MAX_HEADER_WAIT_SECONDS = 10 * 365 * 24 * 3600

# X-RateLimit-Reset values below this are delta-seconds, above it epoch seconds.
# 10**9 seconds is ~31.7 years: no API asks for a wait that long, and no epoch
# timestamp since 2001-09-09 is that small.
EPOCH_THRESHOLD_SECONDS = 10**9

# RFC 9110 §10.2.3: delay-seconds = 1*DIGIT. ASCII digits only: str.isdigit()
# and int() would also accept superscripts and other scripts' digits.
_DELTA_SECONDS = re.compile(r"[0-9]+", re.ASCII)
# Optional whitespace around a field value (RFC 9110 §5.5: OWS is SP / HTAB).
_OWS = " \t"

# RFC 9110 §15.5.9 (408), §15.6 (5xx): worth another try of the same request.
TRANSIENT_STATUS_CODES = frozenset({408})


class MalformedHeaderError(ValueError):
    """A rate-limit header was present but could not be read."""


class Outcome(enum.Enum):
    """What a response means for the task."""

    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class WaitSource(str, enum.Enum):
    """Where a rate-limit wait came from (logged and reported in metrics)."""

    RETRY_AFTER = "Retry-After"
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
                base = MAX_HEADER_WAIT_SECONDS
        base = min(base, MAX_HEADER_WAIT_SECONDS)
        fraction = rand()
        fraction = 0.0 if math.isnan(fraction) else min(max(fraction, 0.0), 1.0)
        jitter = self.jitter if math.isfinite(self.jitter) else 0.0
        value = base + base * max(jitter, 0.0) * fraction
        if math.isnan(value):
            value = base
        if self.max_delay is not None:
            value = min(value, self.max_delay.total_seconds())
        return min(max(value, self.retry_delay.total_seconds(), 0.0), float(MAX_HEADER_WAIT_SECONDS))


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(key).lower(): str(value) for key, value in headers.items()}


def parse_delta_seconds(value: str) -> int:
    """Read ``delay-seconds`` (``"0"``, ``"\\t42 "``); raise :class:`MalformedHeaderError` otherwise."""
    stripped = value.strip(_OWS)
    if not _DELTA_SECONDS.fullmatch(stripped):
        raise MalformedHeaderError(f"not a number of seconds: {value!r}")
    # Leading zeros and huge values are valid digits; clamp before converting to a wait.
    if len(stripped.lstrip("0")) > 12:
        return MAX_HEADER_WAIT_SECONDS
    return min(int(stripped), MAX_HEADER_WAIT_SECONDS)


def parse_http_date(value: str) -> datetime:
    """Read an HTTP-date (IMF-fixdate, RFC 850, asctime) as an aware datetime.

    A date with no zone is read as UTC, as RFC 9110 §5.6.7 says every HTTP-date is.
    """
    try:
        parsed = parsedate_to_datetime(value.strip(_OWS))
    except (TypeError, ValueError, IndexError, OverflowError) as error:
        raise MalformedHeaderError(f"not delta-seconds or an HTTP-date: {value!r}") from error
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def parse_retry_after(value: str, now: datetime, server_date: datetime | None = None) -> float:
    """Seconds to wait for a ``Retry-After`` value; a date in the past means 0.

    An HTTP-date is measured against the server's own ``Date`` header when given,
    so a skewed local clock cannot make us early.
    """
    stripped = value.strip(_OWS)
    if _DELTA_SECONDS.fullmatch(stripped):
        return float(parse_delta_seconds(stripped))
    if not stripped or stripped[0] in "+-" or stripped[0].isdigit():
        # "-1", "+1", "1.0": numbers, but not delta-seconds. Don't let the date
        # parser guess at them.
        raise MalformedHeaderError(f"not delta-seconds or an HTTP-date: {value!r}")
    moment = parse_http_date(stripped)
    reference = server_date if server_date is not None else now
    return _clamp((moment - reference).total_seconds())


def _clamp(seconds: float) -> float:
    if math.isnan(seconds):
        return 0.0
    return min(max(seconds, 0.0), float(MAX_HEADER_WAIT_SECONDS))


def _parse_structured_ratelimit(value: str) -> tuple[int | None, int | None]:
    """Read ``r`` (remaining) and ``t`` (reset seconds) from a draft-08+ ``RateLimit`` field."""
    remaining = reset = None
    for item in value.split(","):
        for parameter in item.split(";")[1:]:
            name, _, raw = parameter.strip(_OWS).partition("=")
            name = name.strip(_OWS).lower()
            if name in ("r", "t"):
                number = parse_delta_seconds(raw)
                if name == "r":
                    remaining = number if remaining is None else min(remaining, number)
                else:
                    reset = number if reset is None else max(reset, number)
    return remaining, reset


def _quota_exhausted(raw_remaining: str | None) -> bool:
    """A reset header counts only when the remaining quota is 0, or not stated at all."""
    if raw_remaining is None:
        return True
    try:
        return parse_delta_seconds(raw_remaining.split(",")[0]) == 0
    except MalformedHeaderError:
        return False


def reset_header_wait(headers: Mapping[str, str], now: datetime) -> tuple[float, WaitSource] | None:
    """The wait a reset header asks for when the quota is spent; ``None`` if it asks none.

    Raises :class:`MalformedHeaderError` when a reset header is present but unreadable.
    """
    found, problems = _reset_header_wait(headers, now)
    if found is None and problems:
        raise MalformedHeaderError("; ".join(problems))
    return found


def _reset_header_wait(
    headers: Mapping[str, str], now: datetime
) -> tuple[tuple[float, WaitSource] | None, list[str]]:
    """The first usable reset header, and what was wrong with the unusable ones before it."""
    lowered = _lower_keys(headers)
    problems: list[str] = []
    # Each source on its own: a malformed one must not hide a valid one after it.
    for read in (_structured_reset, _ratelimit_reset, _x_ratelimit_reset):
        try:
            found = read(lowered, now)
        except MalformedHeaderError as error:
            problems.append(str(error))
            continue
        if found is not None:
            return found, problems
    return None, problems


def _structured_reset(lowered: dict[str, str], now: datetime) -> tuple[float, WaitSource] | None:
    if "ratelimit" not in lowered:
        return None
    remaining, reset = _parse_structured_ratelimit(lowered["ratelimit"])
    if reset is not None and (remaining is None or remaining == 0):
        return float(reset), WaitSource.RATELIMIT_RESET
    return None


def _ratelimit_reset(lowered: dict[str, str], now: datetime) -> tuple[float, WaitSource] | None:
    if "ratelimit-reset" in lowered and _quota_exhausted(lowered.get("ratelimit-remaining")):
        return float(parse_delta_seconds(lowered["ratelimit-reset"])), WaitSource.RATELIMIT_RESET
    return None


def _x_ratelimit_reset(lowered: dict[str, str], now: datetime) -> tuple[float, WaitSource] | None:
    if "x-ratelimit-reset" not in lowered or not _quota_exhausted(lowered.get("x-ratelimit-remaining")):
        return None
    raw = lowered["x-ratelimit-reset"].strip(_OWS)
    # Some APIs send fractional epoch seconds ("1700000000.5"); accept those here.
    if not re.fullmatch(r"[0-9]{1,15}(\.[0-9]+)?", raw, re.ASCII):
        raise MalformedHeaderError(f"X-RateLimit-Reset is not a number: {raw!r}")
    number = float(raw)
    if number < EPOCH_THRESHOLD_SECONDS:
        return _clamp(number), WaitSource.X_RATELIMIT_RESET
    return _clamp(number - now.timestamp()), WaitSource.X_RATELIMIT_RESET


def server_date_of(headers: Mapping[str, str]) -> datetime | None:
    """The response's ``Date`` header as a datetime, or ``None`` when absent or unreadable."""
    raw = _lower_keys(headers).get("date")
    if raw is None:
        return None
    try:
        return parse_http_date(raw)
    except MalformedHeaderError:
        return None


def has_rate_limit_headers(headers: Mapping[str, str]) -> bool:
    """Does a response carry a ``Retry-After`` or an exhausted quota header?"""
    lowered = _lower_keys(headers)
    if "retry-after" in lowered:
        return True
    for key in ("x-ratelimit-remaining", "ratelimit-remaining"):
        if key in lowered and _quota_exhausted(lowered[key]):
            return True
    if "ratelimit" in lowered:
        try:
            remaining, _ = _parse_structured_ratelimit(lowered["ratelimit"])
        except MalformedHeaderError:
            return False
        return remaining == 0
    return False


def classify(status_code: int, headers: Mapping[str, str]) -> Outcome:
    """What a status means.

    - 2xx: success.
    - 429, 503 with ``Retry-After``, and 403 with a ``Retry-After`` or a spent quota
      (GitHub answers its rate limits with 403): rate limited.
    - other 5xx, 408: transient, worth a retry.
    - everything else (other 4xx, unfollowed 3xx, 1xx): permanent.
    """
    if 200 <= status_code < 300:
        return Outcome.SUCCESS
    lowered = _lower_keys(headers)
    if status_code == 429:
        return Outcome.RATE_LIMITED
    if status_code == 503 and "retry-after" in lowered:
        return Outcome.RATE_LIMITED
    if status_code == 403 and has_rate_limit_headers(headers):
        return Outcome.RATE_LIMITED
    if status_code >= 500 or status_code in TRANSIENT_STATUS_CODES:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def decide_rate_limit_wait(
    headers: Mapping[str, str],
    *,
    now: datetime,
    backoff: Backoff,
    consecutive_waits: int,
    rand: Callable[[], float],
) -> RateLimitWait:
    """How long to wait after a rate-limited response.

    Never raises for bad header values: a malformed header falls through to the
    next source, and ``fallback_reason`` says why.
    """
    lowered = _lower_keys(headers)
    problems: list[str] = []

    if "retry-after" in lowered:
        try:
            seconds = parse_retry_after(lowered["retry-after"], now, server_date_of(headers))
            return _wait(seconds, WaitSource.RETRY_AFTER, now, None)
        except MalformedHeaderError as error:
            problems.append(f"Retry-After ignored: {error}")

    found, reset_problems = _reset_header_wait(headers, now)
    problems.extend(f"reset header ignored: {problem}" for problem in reset_problems)
    if found is not None:
        return _wait(found[0], found[1], now, "; ".join(problems) or None)

    seconds = backoff.seconds(consecutive_waits, rand)
    return _wait(seconds, WaitSource.BACKOFF, now, "; ".join(problems) or None)


def _wait(seconds: float, source: WaitSource, now: datetime, reason: str | None) -> RateLimitWait:
    seconds = _clamp(seconds)
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
