"""The shared rate-limit gate: one schedule of send times per connection, pure and serialisable.

When one task learns that the API is blocked until T (a ``Retry-After``, or a reset header
while the remaining quota is 0, which lets us stop *before* the 429), every other task of
the same connection waits for T without sending. While the API is throttled, the gate hands
out send times one by one, so tasks that wake at T don't all send at once and get refused
again:

- **pacing**: when the server states its average rate (``RateLimit-Policy: 5;w=5`` is 5
  requests per 5 s), the slots after the quota is spent are spaced ``w / q`` seconds apart;
  evenly spaced sends stay within a token bucket and within any fixed window;
- **windows**: when the server only states a quota and when it resets (GitHub's
  ``X-RateLimit-Limit/Remaining/Reset``), up to ``limit`` tasks get the reset time itself,
  and each of the rest looks again once the window it fits in can have opened (the window's
  length is known from below: from its first report to its reset), so it comes back once.

Each task holds a *ticket* (its task-instance key). A task that comes back at its time
sends only if the gate has not been closed further meanwhile; otherwise it is given a new
time. Every function here takes ``now`` (epoch seconds) and returns a new state: the
storage and locking live in :mod:`network_requests.gate_store`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from network_requests.rate_limit import (
    EPOCH_THRESHOLD_SECONDS,
    MAX_HEADER_WAIT_SECONDS,
    MalformedHeaderError,
    parse_delta_seconds,
)

#: A state untouched for this long after its last time has passed is forgotten.
STATE_TTL_SECONDS = 300.0
#: Tickets left by tasks that never came back (killed, cleared) are dropped after this.
TICKET_TTL_SECONDS = 3600.0
#: Upper bound on tickets kept, so a runaway backlog cannot grow the stored state forever.
MAX_TICKETS = 5000
#: When neither pacing nor a window is known, a woken task re-checks after this long.
RECHECK_SECONDS = 1.0
#: On first contact one request goes ahead to learn the API's limits; if its task dies
#: without reporting, the others stop waiting for it after this long.
PROBE_TIMEOUT_SECONDS = 10.0
#: A request let through is counted as out (unseen by the server's count) until its
#: response is observed, or for this long if its task never reports.
IN_FLIGHT_TTL_SECONDS = 120.0


@dataclass(frozen=True)
class Quota:
    """What one response said about the quota; ``None`` for anything it did not say."""

    limit: int | None = None
    remaining: int | None = None
    reset_at: float | None = None  # epoch seconds
    interval: float | None = None  # seconds per request on average (from RateLimit-Policy)


@dataclass(frozen=True)
class GateState:
    """The gate of one connection. Times are epoch seconds."""

    #: No request may be sent before this: the latest time a server asked us to wait until.
    blocked_until: float = 0.0
    #: Requests the server said are left, less those handed out since.
    remaining: int | None = None
    #: When the quota refills (window end, or next token).
    reset_at: float | None = None
    limit: int | None = None
    #: Seconds between requests while throttled, when the server told us its rate.
    interval: float | None = None
    #: Next free send time when pacing.
    next_slot: float = 0.0
    #: Send times handed out in the window opening at ``reset_at`` (window mode).
    next_window_taken: int = 0
    #: ticket -> send time handed to that task.
    tickets: dict[str, float] = field(default_factory=dict)
    updated_at: float = 0.0
    #: The API (scheme://host:port) this state is about: a Connection pointed elsewhere starts afresh.
    origin: str = ""
    #: When a response last told the gate anything (0: never, so nothing is known yet).
    observed_at: float = 0.0
    #: While a first request is out learning the limits, the others wait until this.
    probe_until: float = 0.0
    #: When a response first reported the window that ends at ``reset_at``.
    window_first_seen: float = 0.0
    #: A lower bound on the window's length (``reset_at - window_first_seen``, the largest
    #: seen): the window after the next one opens no sooner than ``reset_at`` + this.
    window_seconds: float = 0.0
    #: ticket -> when the gate let that task send; until its response is observed.
    in_flight: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        # A shallow dict: asdict() deep-copies every ticket, which adds up at thousands.
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | None) -> GateState:
        """Read a stored state; anything unreadable is a fresh gate (never an error)."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            tickets = {str(k): _finite(v) for k, v in dict(data.get("tickets") or {}).items()}
            in_flight = {str(k): _finite(v) for k, v in dict(data.get("in_flight") or {}).items()}
            return cls(
                blocked_until=_finite(data.get("blocked_until") or 0.0),
                remaining=_optional_int(data.get("remaining")),
                reset_at=_optional_float(data.get("reset_at")),
                limit=_optional_int(data.get("limit")),
                interval=_optional_float(data.get("interval")),
                next_slot=_finite(data.get("next_slot") or 0.0),
                next_window_taken=int(data.get("next_window_taken") or 0),
                tickets=tickets,
                updated_at=_finite(data.get("updated_at") or 0.0),
                origin=str(data.get("origin") or ""),
                observed_at=_finite(data.get("observed_at") or 0.0),
                probe_until=_finite(data.get("probe_until") or 0.0),
                window_first_seen=_finite(data.get("window_first_seen") or 0.0),
                window_seconds=_finite(data.get("window_seconds") or 0.0),
                in_flight=in_flight,
            )
        except (TypeError, ValueError, AttributeError, OverflowError):
            return cls()

    @property
    def horizon(self) -> float:
        """The latest time the state still says anything about."""
        times = [self.updated_at, self.blocked_until, self.next_slot, self.reset_at or 0.0, *self.tickets.values()]
        return max(times)


@dataclass(frozen=True)
class Admission:
    """The gate's answer to a task that wants to send."""

    #: Epoch seconds at which the task may send; ``<= now`` means send now.
    send_at: float
    #: Why it must wait (for the log), or ``None`` when it may send now.
    reason: str | None
    #: The state to store.
    state: GateState

    def wait_seconds(self, now: float) -> float:
        return max(self.send_at - now, 0.0)


def for_origin(state: GateState, origin: str) -> GateState:
    """The state if it is about ``origin``, else a fresh one: what another API said does not apply."""
    return state if state.origin == origin else GateState(origin=origin)


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _optional_float(value: object) -> float | None:
    return None if value is None else _finite(value)


def _finite(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _first_int(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return parse_delta_seconds(raw.split(",")[0])
    except MalformedHeaderError:
        return None


def _policy_interval(raw: str | None) -> float | None:
    """Seconds per request from ``RateLimit-Policy`` (``5;w=5`` or ``"default";q=5;w=5``).

    With several policies the slowest one wins.
    """
    if not raw:
        return None
    slowest: float | None = None
    for item in raw.split(","):
        parts = [part.strip() for part in item.split(";")]
        quota = window = None
        head = parts[0].strip('"')
        if re.fullmatch(r"[0-9]{1,12}", head, re.ASCII):
            quota = int(head)
        for parameter in parts[1:]:
            name, _, value = parameter.partition("=")
            name = name.strip().lower()
            if not re.fullmatch(r"[0-9]{1,12}", value.strip(), re.ASCII):
                continue
            if name == "q":
                quota = int(value)
            elif name == "w":
                window = int(value)
        if quota and window:
            interval = min(window / quota, float(MAX_HEADER_WAIT_SECONDS))
            slowest = interval if slowest is None else max(slowest, interval)
    return slowest


def read_quota(headers: Mapping[str, str], now: float) -> Quota:
    """What a response says about the quota, from ``RateLimit-*`` or ``X-RateLimit-*`` headers."""
    lowered = _lower(headers)
    interval = _policy_interval(lowered.get("ratelimit-policy"))
    if "ratelimit-remaining" in lowered or "ratelimit-reset" in lowered:
        reset = _first_int(lowered.get("ratelimit-reset"))
        return Quota(
            limit=_first_int(lowered.get("ratelimit-limit")),
            remaining=_first_int(lowered.get("ratelimit-remaining")),
            reset_at=None if reset is None else now + reset,
            interval=interval,
        )
    if "x-ratelimit-remaining" in lowered or "x-ratelimit-reset" in lowered:
        raw_reset = lowered.get("x-ratelimit-reset", "").strip()
        reset_at = None
        if re.fullmatch(r"[0-9]{1,15}(\.[0-9]+)?", raw_reset, re.ASCII):
            value = float(raw_reset)
            reset_at = now + value if value < EPOCH_THRESHOLD_SECONDS else value
        return Quota(
            limit=_first_int(lowered.get("x-ratelimit-limit")),
            remaining=_first_int(lowered.get("x-ratelimit-remaining")),
            reset_at=reset_at,
            interval=interval,
        )
    return Quota(interval=interval)


def _latest(times: dict[str, float], *, after: float) -> dict[str, float]:
    """The entries later than ``after``, at most MAX_TICKETS of them (the latest)."""
    kept = {k: v for k, v in times.items() if v > after}
    if len(kept) > MAX_TICKETS:
        kept = dict(sorted(kept.items(), key=lambda item: item[1])[-MAX_TICKETS:])
    return kept


def _expire(state: GateState, now: float) -> GateState:
    """Forget what no longer matters: stale tickets, and the whole state once long past."""
    if state.updated_at and now > state.horizon + STATE_TTL_SECONDS:
        return GateState(interval=state.interval, origin=state.origin)
    state = replace(
        state,
        tickets=_latest(state.tickets, after=now - TICKET_TTL_SECONDS),
        in_flight=_latest(state.in_flight, after=now - IN_FLIGHT_TTL_SECONDS),
    )
    if state.reset_at is not None and now >= state.reset_at:
        # The window the state described is over. With a known rate, keep pacing until a
        # response says otherwise (a token bucket refills one token at a time). Without
        # one, assume a fixed window: the full quota is back, less the send times already
        # handed out for it.
        if state.interval:
            fresh_remaining = state.remaining
        elif state.limit is None:
            fresh_remaining = None
        else:
            fresh_remaining = max(state.limit - state.next_window_taken, 0)
        state = replace(state, reset_at=None, remaining=fresh_remaining, next_window_taken=0)
    return state


def observe(
    state: GateState,
    headers: Mapping[str, str],
    *,
    now: float,
    rate_limited_until: float | None = None,
    ticket: str | None = None,
) -> GateState:
    """Update the gate from a response; ``rate_limited_until`` is the wait a refused response asked.

    ``ticket`` is the task whose response this is. ``blocked_until`` only ever moves later:
    two tasks reporting at once can't shorten a block.
    """
    state = _expire(state, now)
    quota = read_quota(headers, now)
    in_flight = dict(state.in_flight)
    sent_at = in_flight.pop(ticket, None) if ticket is not None else None
    # Requests let through after this one was are not in the server's count yet (and when
    # we don't know when this one went, none of those out are): they will spend quota too.
    unseen = sum(1 for let_through in in_flight.values() if sent_at is None or let_through > sent_at)
    blocked_until = state.blocked_until
    same_window = (
        quota.reset_at is not None and state.reset_at is not None and abs(quota.reset_at - state.reset_at) <= 1.0
    )
    if quota.remaining is None:
        remaining = state.remaining
    else:
        # The server's count does not know the send times we have already handed out
        # for this window: those tasks will spend quota too.
        window_end = quota.reset_at if quota.reset_at is not None else float("inf")
        promised = sum(1 for send_at in state.tickets.values() if send_at < window_end)
        remaining = max(quota.remaining - promised - unseen, 0)
        if same_window and state.remaining is not None:
            # Within one window the quota only shrinks.
            remaining = min(state.remaining, remaining)
    reset_at = quota.reset_at if quota.reset_at is not None else state.reset_at
    if rate_limited_until is not None:
        blocked_until = max(blocked_until, min(rate_limited_until, now + MAX_HEADER_WAIT_SECONDS))
    if quota.remaining == 0 and reset_at is not None and reset_at > now:
        # The server says the quota is spent: stop before it has to say 429. (Our own,
        # lower count only holds back new tasks in admit(); it must not block the tasks
        # this window's quota was promised to.)
        blocked_until = max(blocked_until, reset_at)
    next_window_taken = state.next_window_taken
    if quota.reset_at is not None and state.reset_at is not None and not same_window:
        next_window_taken = 0
    window_first_seen, window_seconds = state.window_first_seen, state.window_seconds
    if quota.reset_at is not None:
        if not (same_window and window_first_seen):
            window_first_seen = now
        # The window began no later than its first report: its length is at least this.
        window_seconds = min(max(window_seconds, quota.reset_at - window_first_seen), float(MAX_HEADER_WAIT_SECONDS))
    return replace(
        state,
        blocked_until=blocked_until,
        remaining=remaining,
        reset_at=reset_at,
        limit=quota.limit if quota.limit is not None else state.limit,
        interval=quota.interval if quota.interval is not None else state.interval,
        next_window_taken=next_window_taken,
        updated_at=now,
        observed_at=now,
        probe_until=0.0,
        window_first_seen=window_first_seen,
        window_seconds=window_seconds,
        in_flight=in_flight,
    )


def admit(
    state: GateState, ticket: str, *, now: float, in_process_up_to: float = 0.0, min_wait: float = 0.0
) -> Admission:
    """May the task holding ``ticket`` send now? If not, when?

    A task is given one send time and keeps it: coming back at that time it sends, unless
    the gate was closed past it meanwhile (a 429 elsewhere), in which case it queues again.

    ``in_process_up_to`` and ``min_wait`` say when the task can really be back: it waits up
    to ``in_process_up_to`` seconds where it is, and a longer wait takes at least
    ``min_wait`` (a deferral's or a reschedule's minimum delay). Its send time is set to
    that, and the times after it are spaced from it, so tasks held back by a minimum delay
    don't come back in a bunch.
    """

    def back_at(moment: float) -> float:
        if moment <= now or moment - now <= in_process_up_to:
            return moment
        return max(moment, now + min_wait)

    state = _expire(state, now)
    held = state.tickets.get(ticket)
    if held is not None:
        if held <= now and state.blocked_until <= now:
            return _send_now(_release(state, ticket, now), ticket, now)
        if state.blocked_until <= held:
            return Admission(send_at=held, reason="waiting for its turn at the shared gate", state=state)
        # The gate closed past our time: queue again from blocked_until.
        state = _release(state, ticket, now)

    start = max(now, state.blocked_until)
    if state.remaining is None and not state.observed_at and start <= now:
        # Nothing known about this API yet: one request goes first and brings back its
        # limits, instead of everyone starting at once into a 429 the others can't see.
        if state.probe_until > now:
            return _recheck(state, ticket, back_at(min(state.probe_until, now + RECHECK_SECONDS)), now)
        state = replace(state, probe_until=now + PROBE_TIMEOUT_SECONDS, updated_at=now)
        return _send_now(state, ticket, now)
    if state.remaining is None or state.remaining > 0:
        remaining = None if state.remaining is None else state.remaining - 1
        send_at = back_at(start)
        # The next paced slot comes one interval after this send.
        pacing_floor = max(state.next_slot, send_at + (state.interval or 0.0))
        state = replace(state, remaining=remaining, next_slot=pacing_floor, updated_at=now)
        return _at(state, ticket, send_at, now, "the API is blocked (shared gate)")

    if state.interval:
        slot = back_at(max(start, state.next_slot))
        state = replace(state, next_slot=slot + state.interval, updated_at=now)
        return _at(state, ticket, slot, now, "pacing to the API's rate (shared gate)")

    if state.reset_at is not None and state.limit:
        slot = back_at(max(start, state.reset_at))
        taken = state.next_window_taken
        state = replace(state, next_window_taken=taken + 1, updated_at=now)
        if taken < state.limit:
            return _at(state, ticket, slot, now, "quota spent, waiting for the window to reset (shared gate)")
        # The next window's quota is handed out too: look again once the window this task
        # would fit in (``taken // limit`` windows later) can have opened. The windows'
        # length is known only from below, so the look may come early (and the task waits
        # again), never late by more than RECHECK_SECONDS; it sends nothing by itself.
        windows_later = taken // state.limit
        return _recheck(state, ticket, back_at(slot + windows_later * state.window_seconds + RECHECK_SECONDS), now)

    if state.limit and any(send_at <= now for send_at in state.tickets.values()):
        # A window's quota was handed out and its holders have not reported yet: wait
        # for what the server tells them instead of sending on top of them.
        return _recheck(state, ticket, back_at(now + RECHECK_SECONDS), now)
    # Quota reported spent but no reset time or rate: only the block is known; past it,
    # let the server say what comes next.
    return _at(state, ticket, back_at(start), now, "the API is blocked (shared gate)")


def _send_now(state: GateState, ticket: str, now: float) -> Admission:
    """Let the task send now; its request is out until its response is observed."""
    return Admission(send_at=now, reason=None, state=replace(state, in_flight={**state.in_flight, ticket: now}))


def _at(state: GateState, ticket: str, send_at: float, now: float, reason: str) -> Admission:
    if send_at <= now:
        return _send_now(state, ticket, now)
    tickets = {**state.tickets, ticket: send_at}
    return Admission(send_at=send_at, reason=reason, state=replace(state, tickets=tickets))


def _recheck(state: GateState, ticket: str, when: float, now: float) -> Admission:
    # No ticket: the task comes back and asks again, without a send time promised.
    tickets = {k: v for k, v in state.tickets.items() if k != ticket}
    return Admission(
        send_at=when,
        reason="quota spent; checking the shared gate again",
        state=replace(state, tickets=tickets, updated_at=now),
    )


def _release(state: GateState, ticket: str, now: float) -> GateState:
    tickets = {k: v for k, v in state.tickets.items() if k != ticket}
    return replace(state, tickets=tickets, updated_at=now)


def release_probe(state: GateState, ticket: str | None = None) -> GateState:
    """A request got no answer (refused, timed out): it is no longer out, and if it was the
    first-contact probe, the next task may try."""
    in_flight = {k: v for k, v in state.in_flight.items() if k != ticket}
    return replace(state, probe_until=0.0, in_flight=in_flight)


def is_open(state: GateState, now: float) -> bool:
    """Would a task with no ticket be let through right now? (For the UI and logs.)"""
    return admit(state, "__probe__", now=now).send_at <= now
