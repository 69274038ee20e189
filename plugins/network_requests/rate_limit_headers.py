"""The one place that reads rate-limit headers: a response's status, headers and ``Date`` in,
one :class:`RateLimitInfo` out. Pure, no I/O; nothing else in the package parses these headers.

INTERFACE SKELETON (to be implemented): the dataclass and the function signature are the
contract the gate, the wait decision, ``RetryAfterPolicy`` and ``GitHubApiOperator`` code against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

#: A wait or reset further away than this is not believed: the header is rejected as
#: malformed (with a reason), never turned into a date. 7 days.
MAX_HORIZON_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class RateLimitInfo:
    """What one response said about rate limits. Every time is *seconds from now* (the
    caller's ``now``), already validated: finite, ``0 <= x <= MAX_HORIZON_SECONDS``.
    ``None`` means the response did not say (0 is a real answer, not "absent")."""

    #: ``Retry-After`` (delta-seconds, a decimal, or an HTTP-date measured against ``Date``).
    retry_after: float | None = None
    #: When the current quota window resets / the next request is allowed by quota headers.
    reset_after: float | None = None
    #: Requests left in the window (the most restrictive policy when several are sent).
    remaining: int | None = None
    #: The window's quota (the most restrictive policy).
    limit: int | None = None
    #: The policy window length in seconds (``w`` of ``RateLimit-Policy``), if stated.
    window: float | None = None
    #: Average seconds per request the server allows (``w / q``, the slowest policy wins).
    interval: float | None = None
    #: Header that gave ``retry_after`` or the reset (``"Retry-After"``, ``"RateLimit"``,
    #: ``"RateLimit-Reset"``, ``"X-RateLimit-Reset"``), for logs and metrics.
    source: str | None = None
    #: Why a present header was not used, one line each (for the log), e.g.
    #: ``"X-RateLimit-Reset: 1.7e12 ms is 58,887 years away (beyond 7 days)"``.
    rejected: tuple[str, ...] = ()

    @property
    def quota_exhausted(self) -> bool:
        return self.remaining == 0

    def wait_seconds(self) -> float | None:
        """The wait the server asked for: ``retry_after``, else the reset when the quota is
        spent (or a reset sent with no remaining count on a rate-limited answer); ``None`` if none."""
        raise NotImplementedError


def read_rate_limit_headers(
    status_code: int, headers: Mapping[str, str], *, now: datetime
) -> RateLimitInfo:
    """Read every rate-limit header of a response. Never raises for any header bytes."""
    raise NotImplementedError
