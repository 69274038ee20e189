"""The one place that reads rate-limit headers: a response's status, headers and ``Date`` in,
one :class:`RateLimitInfo` out. Pure, no I/O; nothing else in the package parses these headers.

Headers read (names in any case; a field sent twice arrives joined with ``", "``):

- ``Retry-After`` (RFC 9110 §10.2.3): delta-seconds (a decimal such as ``1.5`` is read too),
  or an HTTP-date (IMF-fixdate, RFC 850, asctime; no zone means UTC, RFC 9110 §5.6.7)
  measured against the response's ``Date`` so a skewed local clock cannot make us early.
  A joined value (``120, 120``) is read; when its parts disagree the longest wait wins.
- ``RateLimit`` / ``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers-08 and later):
  named policies, ``RateLimit: "default";r=0;t=30`` and ``RateLimit-Policy: "default";q=100;w=60``.
  With several policies the most restrictive wins. The draft-07 dictionary form
  ``RateLimit: limit=10, remaining=0, reset=30`` is read too.
- ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (drafts up to 06; policy form ``5;w=5``).
- ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset``: the reset as delta-seconds, epoch
  seconds (GitHub) or epoch *milliseconds* (several public APIs), fractions allowed.

Only the first of the three quota families present and readable is used, in that order.
Every time is validated here: finite, ``0 <= seconds <= MAX_HORIZON_SECONDS``. A time past
the horizon is *rejected* (with its reason in :attr:`RateLimitInfo.rejected`), never clamped
into a date; a time already past is 0. Nothing here raises, whatever the header bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

#: A wait or reset further away than this is not believed: the header is rejected as
#: malformed (with a reason), never turned into a date. 7 days.
MAX_HORIZON_SECONDS = 7 * 24 * 3600

#: Reset numbers below this are delta-seconds: 10**9 s is ~31.7 years, longer than any real
#: wait, and no epoch second since 2001-09-09 is that small.
EPOCH_SECONDS_FROM = 10**9
#: Reset numbers from this on are epoch *milliseconds*: 10**12 ms is 2001-09-09, while
#: 10**12 epoch seconds would be the year 33,658.
EPOCH_MILLISECONDS_FROM = 10**12

#: Statuses that can be a rate limit (RFC 6585 §4: 429; RFC 9110 §15.6.4: 503; GitHub: 403).
RATE_LIMIT_STATUS_CODES = frozenset({429, 503, 403})

# RFC 9110 §5.5: optional whitespace is SP / HTAB only (not NBSP, not a newline).
_OWS = " \t"
# ASCII digits only: str.isdigit() and float() also accept superscripts and other scripts.
_NUMBER = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)
# Delay-seconds with thousands separators ("1,000"), which a joined value can look like too.
_THOUSANDS = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+", re.ASCII)
# A count (remaining, limit, quota): digits, at most 15 of them (an RFC 8941 Integer).
_COUNT = re.compile(r"[0-9]{1,15}", re.ASCII)
# The shapes of an HTTP-date (RFC 9110 §5.6.7), checked before the stdlib's lenient parser
# sees a value: IMF-fixdate and RFC 850 (also with a numeric or no zone), and asctime.
_HTTP_DATE = re.compile(
    r"[A-Za-z]{3,9}, [0-9]{1,2}[ -][A-Za-z]{3}[ -][0-9]{2,4} [0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(?: (?:[A-Za-z]{1,5}|[+-][0-9]{4}))?"
    r"|[A-Za-z]{3} [A-Za-z]{3} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}",
    re.ASCII,
)
# Digits beyond this many (leading zeros aside) can't be a time within the horizon, in any unit.
_MAX_DIGITS = 16
# How much of a bad value a rejection reason quotes.
_QUOTE_CHARS = 40


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
    #: ``"X-RateLimit-Reset: '1700000000000000' is 53,871 years away (beyond 7 days)"``.
    rejected: tuple[str, ...] = ()
    #: The status was one a rate limit is sent with (429, 503, 403). A reset sent without a
    #: remaining count is a wait only on such an answer.
    rate_limit_status: bool = False

    @property
    def quota_exhausted(self) -> bool:
        return self.remaining == 0

    def wait_seconds(self) -> float | None:
        """The wait the server asked for: ``retry_after``, else the reset when the quota is
        spent (or a reset sent with no remaining count on a rate-limited answer); ``None`` if none."""
        if self.retry_after is not None:
            return self.retry_after
        if self.reset_after is None:
            return None
        if self.remaining == 0 or (self.remaining is None and self.rate_limit_status):
            return self.reset_after
        return None


def lower_headers(headers: Any) -> dict[str, str]:
    """The headers as ``{lower-case name: value}``; the package's one header-lowering helper.

    Accepts a mapping or pairs, ``str`` or ``bytes`` (read as latin-1, as HTTP/1.1 field
    bytes are). Names that differ only in case are joined with ``", "`` as one field sent
    twice would be (RFC 9110 §5.3). Never raises: what cannot be read is left out.
    """
    try:
        pairs: Iterable[Any] = headers.items() if isinstance(headers, Mapping) else headers
        lowered: dict[str, str] = {}
        for pair in pairs:
            try:
                name, value = pair
                name, value = _text(name).strip(_OWS).lower(), _text(value)
            except Exception:  # noqa: BLE001 - an unreadable pair is skipped, never fatal
                continue
            lowered[name] = f"{lowered[name]}, {value}" if name in lowered else value
        return lowered
    except Exception:  # noqa: BLE001 - not iterable, or an iterator that fails midway
        return {}


def read_rate_limit_headers(
    status_code: int, headers: Mapping[str, str], *, now: datetime
) -> RateLimitInfo:
    """Read every rate-limit header of a response. Never raises for any header bytes."""
    try:
        return _read(status_code, lower_headers(headers), _aware(now))
    except Exception as error:  # noqa: BLE001 - the promise is "never raises"; say what went wrong
        return RateLimitInfo(rejected=(f"rate-limit headers unreadable: {type(error).__name__}",))


# -- The reading, one family of headers at a time ---------------------------------------------


class _Rejected(ValueError):
    """A present header that can't be used; the message is the reason, naming the header."""


@dataclass(frozen=True)
class _Quota:
    remaining: int | None = None
    limit: int | None = None
    reset_after: float | None = None
    window: float | None = None
    interval: float | None = None
    source: str | None = None


class _Context:
    """One reading: ``now``, the server's ``Date`` (read once, when a date needs it) and the
    reasons collected for headers that were not used."""

    def __init__(self, lowered: dict[str, str], now: datetime) -> None:
        self.lowered = lowered
        self.now = now
        self.rejected: list[str] = []
        self._server_now: datetime | None = None
        self._date_read = False

    def reject(self, reason: str) -> None:
        if reason not in self.rejected:
            self.rejected.append(reason)

    def reference(self) -> datetime:
        """The moment "now" for an absolute time: the response's ``Date``, else the local clock."""
        if not self._date_read:
            self._date_read = True
            raw = self.lowered.get("date")
            if raw is not None:
                self._server_now = _http_date(raw)
                if self._server_now is None:
                    self.reject(f"Date: {_quote(raw)} is not an HTTP-date; measured against the local clock")
        return self._server_now or self.now


#: The headers read here; a value longer than _MAX_VALUE_CHARS is not read at all.
_READ = {
    name.lower(): name
    for name in (
        "Retry-After",
        "RateLimit",
        "RateLimit-Policy",
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    )
}
_MAX_VALUE_CHARS = 4096


def _read(status_code: Any, lowered: dict[str, str], now: datetime) -> RateLimitInfo:
    context = _Context(lowered, now)
    for name, display in _READ.items():
        if len(lowered.get(name, "")) > _MAX_VALUE_CHARS:
            context.reject(f"{display}: a {len(lowered.pop(name)):,}-character value is not read")
    retry_after = None
    if "retry-after" in lowered:
        try:
            retry_after = _retry_after(lowered["retry-after"], context)
        except _Rejected as reason:
            context.reject(str(reason))
    quota = _Quota()
    for family in (_structured_quota, _draft_quota, _x_quota):
        try:
            found = family(context)
        except _Rejected as reason:
            context.reject(str(reason))
            continue
        if found is not None:
            quota = found
            break
    if quota.interval is None:
        # RateLimit-Policy, in any draft's form, goes with any quota family, or none.
        quota = _with_policy(quota, context)
    return RateLimitInfo(
        retry_after=retry_after,
        reset_after=quota.reset_after,
        remaining=quota.remaining,
        limit=quota.limit,
        window=quota.window,
        interval=quota.interval,
        source="Retry-After" if retry_after is not None else quota.source if quota.reset_after is not None else None,
        rejected=tuple(context.rejected),
        rate_limit_status=isinstance(status_code, int) and status_code in RATE_LIMIT_STATUS_CODES,
    )


def _retry_after(raw: str, context: _Context) -> float:
    """``Retry-After`` in seconds; a joined value (``"120, 120"``) gives its longest wait.

    ``"1,000"`` is either the joined values 1 and 0 or a thousand seconds written with a
    thousands separator; it is read as the longer of the two, so that no reading sends early.
    """
    seconds = []
    if _THOUSANDS.fullmatch(raw.strip(_OWS)):
        seconds.append(_delta("Retry-After", raw.strip(_OWS).replace(",", ""), raw))
    for part in _joined_parts(raw):
        if _NUMBER.fullmatch(part):
            seconds.append(_delta("Retry-After", part, raw))
            continue
        # "-1", "+1", "1e3", "²" are numbers of a kind but not delay-seconds, and go nowhere
        # near a date parser.
        moment = _http_date(part)
        if moment is None:
            raise _Rejected(f"Retry-After: {_quote(raw)} is not delay-seconds or an HTTP-date")
        seconds.append(_until("Retry-After", raw, (moment - context.reference()).total_seconds()))
    return max(seconds)


def _joined_parts(raw: str) -> list[str]:
    """The values of a field that may have been sent more than once (RFC 9110 §5.3). An
    IMF-fixdate or RFC 850 date has a comma of its own, right after its day name."""
    pieces = raw.split(",")
    parts = []
    while pieces:
        piece = pieces.pop(0).strip(_OWS)
        if pieces and piece.isascii() and piece.isalpha():
            piece = f"{piece}, {pieces.pop(0).strip(_OWS)}"
        parts.append(piece)
    return parts


def _structured_quota(context: _Context) -> _Quota | None:
    """``RateLimit`` with ``RateLimit-Policy`` (draft 08+), or the draft-07 dictionary form."""
    raw = context.lowered.get("ratelimit")
    if raw is None:
        return None
    members = [_member(text) for text in _split(raw, ",") if text.strip(_OWS)]
    if not members:
        raise _Rejected(f"RateLimit: {_quote(raw)} names no policy")
    if any("=" in head for head, _ in members):
        return _draft_07_dictionary(raw, members)
    current = []
    for name, parameters in members:
        remaining = None if "r" not in parameters else _count("RateLimit", parameters["r"], raw)
        reset_after = None if "t" not in parameters else _delta("RateLimit", parameters["t"], raw)
        current.append((name, remaining, reset_after))
    if all(remaining is None and reset is None for _, remaining, reset in current):
        raise _Rejected(f"RateLimit: {_quote(raw)} states no remaining count (r) or reset (t)")
    # The most restrictive policy: the fewest requests left; among as few, the latest reset.
    stated = [entry for entry in current if entry[1] is not None]
    if stated:
        name, remaining, reset_after = min(stated, key=lambda e: (e[1], -1.0 if e[2] is None else -e[2]))
    else:
        name, remaining = None, None
        resets = [entry[2] for entry in current if entry[2] is not None]
        reset_after = max(resets) if resets else None
    policies = _policies(context)
    chosen = policies.get(name) if name is not None else None
    if chosen is None and len(policies) == 1:
        chosen = next(iter(policies.values()))
    limit, window = chosen if chosen is not None else (None, None)
    return _Quota(
        remaining=remaining,
        limit=limit,
        reset_after=reset_after,
        window=window,
        interval=_slowest_interval(policies),
        source="RateLimit",
    )


def _draft_07_dictionary(raw: str, members: list[tuple[str, dict[str, str]]]) -> _Quota:
    fields: dict[str, str] = {}
    for head, _ in members:
        key, _, value = head.partition("=")
        fields.setdefault(key.strip(_OWS).lower(), value.strip(_OWS))
    if not fields.keys() & {"remaining", "reset"}:
        raise _Rejected(f"RateLimit: {_quote(raw)} states no remaining count or reset")
    return _Quota(
        remaining=None if "remaining" not in fields else _count("RateLimit", fields["remaining"], raw),
        limit=None if "limit" not in fields else _count("RateLimit", fields["limit"], raw),
        reset_after=None if "reset" not in fields else _delta("RateLimit", fields["reset"], raw),
        source="RateLimit",
    )


def _draft_quota(context: _Context) -> _Quota | None:
    """``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (drafts up to 06)."""
    return _separate_fields(context, "ratelimit-", "RateLimit-")


def _x_quota(context: _Context) -> _Quota | None:
    """``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset``, as GitHub and many others send them."""
    return _separate_fields(context, "x-ratelimit-", "X-RateLimit-")


def _separate_fields(context: _Context, prefix: str, label: str) -> _Quota | None:
    """One family of three fields, each read on its own: a malformed remaining count must not
    hide a valid reset. A field sent twice, or a draft list (``10, 10;w=1, 50;w=60``): the
    first number of each member counts; the fewest remaining and the latest reset win."""
    lowered = context.lowered
    if prefix + "remaining" not in lowered and prefix + "reset" not in lowered:
        return None

    def each(field: str, read: Callable[[str, str, str], Any], pick: Callable[[Any], Any]) -> Any:
        raw = lowered.get(prefix + field)
        if raw is None:
            return None
        try:
            header = label + field.title()
            return pick([read(header, _member(text)[0], raw) for text in _members(header, raw)])
        except _Rejected as reason:
            context.reject(str(reason))
            return None

    remaining = each("remaining", _count, min)
    reset_after = each("reset", lambda header, text, raw: _reset(header, text, raw, context), max)
    if remaining is None and reset_after is None:
        return None  # both unreadable, and said so: another family may do better
    return _Quota(remaining=remaining, limit=each("limit", _count, min), reset_after=reset_after, source=label + "Reset")


def _with_policy(quota: _Quota, context: _Context) -> _Quota:
    """Add ``RateLimit-Policy`` (any draft's form) to a quota read from other fields."""
    policies = _policies(context)
    measured = [(q, w) for q, w in policies.values() if q and w is not None]
    if not measured:
        return quota
    slowest_quota, slowest_window = max(measured, key=lambda qw: qw[1] / qw[0])
    return _Quota(
        remaining=quota.remaining,
        limit=quota.limit if quota.limit is not None else slowest_quota,
        reset_after=quota.reset_after,
        window=slowest_window,
        interval=_slowest_interval(policies),
        source=quota.source,
    )


def _policies(context: _Context) -> dict[str, tuple[int | None, float | None]]:
    """``RateLimit-Policy`` as ``{name: (quota, window)}``: ``"default";q=100;w=60`` (draft 08+)
    or ``100;w=60`` (older drafts: the item is the quota; named by position)."""
    raw = context.lowered.get("ratelimit-policy")
    if raw is None:
        return {}
    policies: dict[str, tuple[int | None, float | None]] = {}
    for text in _split(raw, ","):
        if not text.strip(_OWS):
            continue
        head, parameters = _member(text)
        try:
            if _COUNT.fullmatch(head):
                name, quota = f"#{len(policies)}", int(head)
            else:
                name = head
                quota = None if "q" not in parameters else _count("RateLimit-Policy", parameters["q"], raw)
            window = None if "w" not in parameters else _delta("RateLimit-Policy", parameters["w"], raw)
        except _Rejected as reason:
            context.reject(str(reason))
            continue
        policies.setdefault(name, (quota, window))
    return policies


def _slowest_interval(policies: dict[str, tuple[int | None, float | None]]) -> float | None:
    """Seconds per request of the slowest policy (``w / q``); a quota of 0 sets no pace.
    Bounded already: ``w`` is within the horizon and ``q`` at least 1."""
    intervals = [w / q for q, w in policies.values() if q and w is not None]
    return max(intervals) if intervals else None


# -- Values -------------------------------------------------------------------------------------


def _delta(header: str, text: str, whole: str) -> float:
    """Delta-seconds (``"30"``, ``"1.5"``), within the horizon."""
    match = _NUMBER.fullmatch(text.strip(_OWS))
    if not match:
        raise _Rejected(f"{header}: {_quote(whole)} is not a number of seconds")
    return _until(header, whole, _float(match))


def _reset(header: str, text: str, whole: str, context: _Context) -> float:
    """A reset: delta-seconds, epoch seconds or epoch milliseconds, by its size. An epoch is
    measured against the response's ``Date``: the server's clock set it."""
    match = _NUMBER.fullmatch(text.strip(_OWS))
    if not match:
        raise _Rejected(f"{header}: {_quote(whole)} is not a number")
    number = _float(match)
    if number < EPOCH_SECONDS_FROM:
        return _until(header, whole, number)
    epoch = number / 1000 if number >= EPOCH_MILLISECONDS_FROM else number
    return _until(header, whole, epoch - context.reference().timestamp())


def _float(match: re.Match[str]) -> float:
    whole, fraction = match.group(1).lstrip("0"), match.group(2) or ""
    if len(whole) > _MAX_DIGITS:
        return math.inf  # beyond any horizon in any unit; no need to convert 5,000 digits
    return float(f"{whole or '0'}.{fraction[:9] or '0'}")


def _until(header: str, raw: str, seconds: float) -> float:
    """Seconds from now, validated: a time already past is 0, one beyond the horizon is rejected."""
    if math.isnan(seconds):
        raise _Rejected(f"{header}: {_quote(raw)} is not a time")
    if seconds > MAX_HORIZON_SECONDS:
        raise _Rejected(f"{header}: {_quote(raw)} is {_far(seconds)} away (beyond {_far(MAX_HORIZON_SECONDS)})")
    return max(seconds, 0.0)


def _count(header: str, text: str, whole: str) -> int:
    value = text.strip(_OWS)
    if not _COUNT.fullmatch(value):
        raise _Rejected(f"{header}: {_quote(whole)} is not a count")
    return int(value)


def _http_date(text: str) -> datetime | None:
    """An HTTP-date as an aware datetime (no zone, or ``-0000``, means UTC); ``None`` if not one."""
    value = text.strip(_OWS)
    if not _HTTP_DATE.fullmatch(value):
        return None
    try:
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        parsed.timestamp()  # a zone offset can push a year-1 or year-9999 date out of range
    except Exception:  # noqa: BLE001 - the stdlib parser raises several types for bad input
        return None
    return parsed


# -- Structured-field syntax, tolerantly (RFC 8941 lists of items with parameters) ---------------


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double-quoted strings."""
    parts, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _members(header: str, raw: str) -> list[str]:
    members = [text for text in _split(raw, ",") if text.strip(_OWS)]
    if not members:
        raise _Rejected(f"{header}: {_quote(raw)} is empty")
    return members


def _member(text: str) -> tuple[str, dict[str, str]]:
    """One list member: its bare item (quotes removed) and its ``;key=value`` parameters."""
    head, *parameters = _split(text, ";")
    head = head.strip(_OWS)
    if len(head) >= 2 and head[0] == head[-1] == '"':
        head = head[1:-1]
    found: dict[str, str] = {}
    for parameter in parameters:
        key, _, value = parameter.strip(_OWS).partition("=")
        found.setdefault(key.strip(_OWS).lower(), value.strip(_OWS))
    return head, found


# -- Small helpers -------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1")
    return str(value)


def _aware(now: datetime) -> datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)


def _quote(value: str) -> str:
    return repr(value if len(value) <= _QUOTE_CHARS else value[:_QUOTE_CHARS] + "...")


def _far(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "endlessly far"
    days = seconds / 86400
    if days >= 365:
        return f"{days / 365.25:,.0f} years"
    return f"{days:,.0f} days" if days >= 2 else f"{seconds:,.0f} seconds"
