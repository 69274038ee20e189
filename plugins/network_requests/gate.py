"""The shared rate-limit gate: one schedule of send times per connection, pure and serialisable.

When one task learns that the API is blocked until T (a ``Retry-After``, or a reset while
the remaining quota is 0, which lets us stop *before* the 429), every other task of the
same connection waits for T without sending. While the API is throttled, the gate hands
out send times one by one, so tasks that wake at T don't all send at once and get refused
again:

- **pacing**: when the server states its average rate (``RateLimit-Policy: 5;w=5`` is 5
  requests per 5 s), the slots after the quota is spent are spaced ``w / q`` seconds apart;
  evenly spaced sends stay within a token bucket and within any fixed window. The server
  spaces them by when they *arrive*, the gate by when it lets them out: a task on a busy
  host can take half a second between the two. So while the quota is counted spent, a paced
  request waits at its time until the answer to any request out before it is stored (that
  answer says when the next token comes), at most :data:`PROBE_TIMEOUT_SECONDS`;
- **windows**: when the server only states a quota and when it resets (GitHub's
  ``X-RateLimit-Limit/Remaining/Reset``), up to ``limit`` tasks get the reset time itself,
  and each of the rest looks again when the window it fits in opens (as far as the window's
  length is known: from its first report to its reset), so each window's quota is used as
  soon as it opens; a task that can wait where it is (a trigger) looks a little before and
  holds the exact reset the window before reported;
- **configured limits**: limits the user declared (:mod:`network_requests.configured_limits`,
  for APIs that announce none) hold on top of all that, the stricter wins. Each is a sliding
  window over the requests the gate let out: a request counts from when it is let out until
  the limit's window after its answer was observed, so neither lateness nor network jitter
  can bring more requests into a window than declared.

An answer's remaining quota is the server's count when it answered. Every other request
still out may be missing from it, whatever order the gate let them out in (they overtake each
other on the way), so each counts against it. An answer about a window that is over (a later
one was reported) counts nothing; one whose reset reads only a little later than the known one
(two answers from either side of a whole-second ``Date``) is the same window's, unless its
request went after the known reset. Past a block that said only when (a ``Retry-After``),
with a limit known, one task goes first and brings back the count; a task back later than a
window lasts after its time queues again.

Each task holds a *ticket* (its task-instance key). A task that comes back at its time
sends only if the gate has not been closed further meanwhile; otherwise it is given a new
time. When its caller reports every answer (``admit(reports_answers=True)``), its ticket
stands for the request until that report, and sending at its time changes nothing to store.

Every function here takes ``now`` (epoch seconds) and returns a new state: the storage and
locking live in :mod:`network_requests.gate_store`, and what a response says is read by
:mod:`network_requests.rate_limit_headers` (nothing here reads a header).

The state is bounded and fails safe, because one stored value outlives the response that
caused it and every later task of the connection reads it:

- no time the gate stores or hands out lies more than :data:`HORIZON_SECONDS` (the header
  reader's 7 days) after the ``now`` it was written at, and every count is capped;
- a state is forgotten relative to *now*: once all its times are :data:`STATE_TTL_SECONDS`
  in the past, or once it has not been written for :data:`MAX_STATE_AGE_SECONDS`;
- a stored state that cannot be read (not JSON, a wrong type, a time beyond the horizon)
  becomes a short conservative block (:data:`DAMAGED_STATE_BLOCK_SECONDS`, or any longer
  block still readable in it), marked :attr:`GateState.damaged`: never an open gate, never
  an exception.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import accumulate
from typing import Any

from network_requests.configured_limits import ConfiguredLimit
from network_requests.rate_limit_headers import MAX_HORIZON_SECONDS, RateLimitInfo

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
#: No time is stored or handed out further than this after the ``now`` it is computed at:
#: the header reader believes no wait beyond it, so neither does the gate.
HORIZON_SECONDS = float(MAX_HORIZON_SECONDS)
#: A stored time up to this much beyond the reader's horizon is still read (as the horizon):
#: the host that wrote it may have a clock this far ahead. Beyond it, the state is damaged.
CLOCK_SKEW_SECONDS = 300.0
#: Counts (remaining, limit, send times handed out for a window) are capped here: far above
#: any real quota, far below anything that could overflow a float or a database column.
MAX_COUNT = 10**9
#: A state not written for this long is forgotten whatever it holds. Every time the gate
#: writes lies within HORIZON_SECONDS of that write, so nothing it wrote can matter later.
MAX_STATE_AGE_SECONDS = HORIZON_SECONDS + STATE_TTL_SECONDS
#: How long an unreadable stored state holds its connection. What was lost may have been a
#: block, so the gate must not open at once; but every real block the server announced is
#: re-announced by its next answer, and after this pause the gate knows nothing, so one
#: request goes first as a probe (see :func:`admit`) and brings the real limits back: being
#: wrong costs at most that one request. 30 s lets the requests already out report back,
#: covers the per-second and most of a per-minute window, and keeps a corrupt Variable
#: from stalling a connection: a task waits it out in the worker or one short deferral.
DAMAGED_STATE_BLOCK_SECONDS = 30.0
#: Answers kept per configured limit (as ``(time, how many)``). Beyond it the two closest are
#: merged into the later time: those requests then count a little longer, never shorter.
#: With 64, a full "5000 per 1h" may wait up to about a minute more than the exact rule.
MAX_LOG_ENTRIES = 64
#: Configured limits one gate keeps a log for (several operators may declare different ones).
MAX_LIMIT_LOGS = 16
#: Two resets this close are the same window's, read at different moments: a reset measured
#: against a response's ``Date`` (whole seconds) varies by up to a second between answers.
SAME_WINDOW_SECONDS = 1.0
#: A task that can wait where it is and fits only in a later window looks again a quarter of a
#: window before it opens, at most this long, to hold its exact reset: by then the window
#: before has reported it, and the looks of a whole window's tasks are through the store.
EARLY_LOOK_SECONDS = 60.0
#: A window length this close above a whole second is that second (float arithmetic on epoch times).
WHOLE_SECOND_TOLERANCE = 1e-3
#: Two float times this close are one moment (epoch seconds have ~0.2 us of precision).
SAME_MOMENT_SECONDS = 1e-6
#: While paced requests wait for the answer to the one before them (the quota counted spent),
#: they look again this often: an answer normally comes back well within one interval.
ANSWER_RECHECK_SECONDS = 0.1
#: The gate's reason for such a look (the log shows it at DEBUG only: attempts.announce_wait).
WAITING_FOR_AN_ANSWER = "waiting for the answer to the request before it (shared gate)"


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
    #: Configured limit (its ``ConfiguredLimit.key``) -> when the requests it counts were
    #: answered, ``(time, how many)`` oldest first, for the limit's window after that.
    limit_logs: dict[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)
    #: Why the stored state could not be read, when this state is the conservative block
    #: that replaced it (for the store to log once, and for the UI). Not stored, not compared:
    #: the next write stores a sound state.
    damaged: str | None = field(default=None, compare=False)

    def to_json(self) -> str:
        # A shallow dict: asdict() deep-copies every ticket, which adds up at thousands.
        fields = {name: getattr(self, name) for name in _STORED_FIELDS}
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes | None, *, now: float) -> GateState:
        """Read a stored state, checking every field against ``now``. Never raises.

        Nothing stored is a fresh gate. A state that cannot be read (not JSON, a wrong type,
        a negative count, a time beyond the horizon) is a conservative block: ``now`` +
        :data:`DAMAGED_STATE_BLOCK_SECONDS`, or the stored ``blocked_until`` when that field
        is readable and later, with :attr:`damaged` saying why.
        """
        if raw is None or raw in ("", b""):
            return cls()
        try:
            data = json.loads(raw)
        except Exception as error:  # any bytes at all: RecursionError, UnicodeDecodeError, ...
            return damaged_state(f"not JSON ({type(error).__name__})", now=now)
        if not isinstance(data, dict):
            return damaged_state(f"not a JSON object but {type(data).__name__}", now=now)
        try:
            return _read_fields(data, now)
        except Exception as error:  # a bug in the checks must not open the gate either
            return damaged_state(f"unreadable ({type(error).__name__})", now=now)

    @property
    def horizon(self) -> float:
        """The latest time the state still says anything about."""
        times = [self.updated_at, self.blocked_until, self.next_slot, self.reset_at or 0.0, *self.tickets.values()]
        # An answer counts against its configured limit for the limit's window after it.
        times.extend(entries[-1][0] + _log_seconds(key) for key, entries in self.limit_logs.items() if entries)
        return max(times)


_STORED_FIELDS = tuple(name for name in GateState.__dataclass_fields__ if name != "damaged")


def damaged_state(reason: str, *, now: float, blocked_until: float = 0.0, origin: str = "") -> GateState:
    """The conservative block that stands in for a state that could not be read."""
    return GateState(
        blocked_until=max(now + DAMAGED_STATE_BLOCK_SECONDS, blocked_until),
        origin=origin,
        updated_at=now,
        damaged=reason,
    )


# -- reading a stored state ------------------------------------------------------------------


class _BadField(ValueError):
    pass


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadField(f"{_shown(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise _BadField(f"{_shown(value)} is too large") from None
    if not math.isfinite(number):
        raise _BadField(f"{value!r} is not finite")
    return number


def _stored_time(value: object, now: float) -> float:
    """An epoch time the gate could have written: 0 (never) up to the horizon after now."""
    number = _number(value)
    if number < 0:
        raise _BadField(f"{_shown(value)} is before 1970")
    latest = now + HORIZON_SECONDS
    if number > latest + CLOCK_SKEW_SECONDS:
        raise _BadField(f"{_shown(value)} is {(number - now) / 86400:,.0f} days away, beyond the horizon")
    return min(number, latest)


def _stored_seconds(value: object) -> float:
    number = _number(value)
    if not 0 <= number <= HORIZON_SECONDS:
        raise _BadField(f"{_shown(value)} s is not a duration within the horizon")
    return number


def _stored_count(value: object) -> int:
    number = _number(value)
    if not number.is_integer() or not 0 <= number <= MAX_COUNT:
        raise _BadField(f"{_shown(value)} is not a count from 0 to {MAX_COUNT}")
    return int(number)


def _stored_times(value: object, now: float) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _BadField(f"{_shown(value)} is not an object")
    times = {str(key): _stored_time(at, now) for key, at in value.items()}
    if len(times) > MAX_TICKETS:
        times = dict(sorted(times.items(), key=lambda item: item[1])[-MAX_TICKETS:])
    return times


def _stored_text(value: object) -> str:
    if not isinstance(value, str):
        raise _BadField(f"{_shown(value)} is not a string")
    return value


def _stored_logs(value: object, now: float) -> dict[str, tuple[tuple[float, int], ...]]:
    if not isinstance(value, dict):
        raise _BadField(f"{_shown(value)} is not an object")
    logs: dict[str, tuple[tuple[float, int], ...]] = {}
    for key, entries in value.items():
        try:
            ConfiguredLimit.from_key(str(key))
        except ValueError:
            raise _BadField(f"{_shown(key)} is not a configured limit") from None
        if not isinstance(entries, list):
            raise _BadField(f"{_shown(entries)} is not a list")
        pairs: list[tuple[float, int]] = []
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 2:
                raise _BadField(f"{_shown(entry)} is not a [time, count] pair")
            pairs.append((_stored_time(entry[0], now), _stored_count(entry[1])))
        logs[str(key)] = _compacted(sorted(pair for pair in pairs if pair[1]))
    return _fewest_logs(logs)


def _read_fields(data: dict[str, Any], now: float) -> GateState:
    """Each field checked on its own: one bad field leaves the good ones (a block) usable."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    readers = {
        "blocked_until": lambda v: _stored_time(v, now),
        "remaining": _stored_count,
        "reset_at": lambda v: _stored_time(v, now),
        "limit": _stored_count,
        "interval": _stored_seconds,
        "next_slot": lambda v: _stored_time(v, now),
        "next_window_taken": _stored_count,
        "tickets": lambda v: _stored_times(v, now),
        "updated_at": lambda v: _stored_time(v, now),
        "origin": _stored_text,
        "observed_at": lambda v: _stored_time(v, now),
        "probe_until": lambda v: _stored_time(v, now),
        "window_first_seen": lambda v: _stored_time(v, now),
        "window_seconds": _stored_seconds,
        "in_flight": lambda v: _stored_times(v, now),
        "limit_logs": lambda v: _stored_logs(v, now),
    }
    for name, read in readers.items():
        value = data.get(name)
        if value is None:
            continue  # absent (an older state) or null: the default
        try:
            values[name] = read(value)
        except _BadField as problem:
            problems.append(f"{name}: {problem}")
    if problems:
        return damaged_state(
            "; ".join(problems),
            now=now,
            blocked_until=values.get("blocked_until", 0.0),
            origin=values.get("origin", ""),
        )
    if "interval" in values and values["interval"] == 0:
        values["interval"] = None  # 0 s per request says nothing
    return GateState(**values)


# -- transitions -----------------------------------------------------------------------------


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


def for_origin(state: GateState, origin: str, *, checks_origin: bool = True) -> GateState:
    """The state if it is about ``origin``, else a fresh one: what another API said does not apply.

    A damaged state whose origin could not be read may be about ``origin``: its block holds.
    ``checks_origin=False`` (a gate key shared on purpose, see
    ``configured_limits.resolve_gate_key``): the state is the quota's whatever API asks; it
    keeps the origin that first wrote it, for the UI.
    """
    if state.origin == origin:
        return state
    if not checks_origin:
        return state if state.origin else replace(state, origin=origin)
    if state.damaged is not None and not state.origin:
        return replace(state, origin=origin)
    return GateState(origin=origin)


def _latest(times: dict[str, float], *, after: float) -> dict[str, float]:
    """The entries later than ``after``, at most MAX_TICKETS of them (the latest)."""
    kept = {k: v for k, v in times.items() if v > after}
    if len(kept) > MAX_TICKETS:
        kept = dict(sorted(kept.items(), key=lambda item: item[1])[-MAX_TICKETS:])
    return kept


def _within(times: dict[str, float], latest: float) -> dict[str, float]:
    if all(at <= latest for at in times.values()):
        return times
    return {k: min(at, latest) for k, at in times.items()}


def _bounded(state: GateState, now: float) -> GateState:
    """The state with no time beyond the horizon after ``now`` and no longer duration (a
    no-op for any state the gate wrote or :meth:`GateState.from_json` read)."""
    latest = now + HORIZON_SECONDS
    if (
        max(state.horizon, state.probe_until, state.window_first_seen) <= latest
        and max(state.interval or 0.0, state.window_seconds) <= HORIZON_SECONDS
    ):
        return state
    return replace(
        state,
        blocked_until=min(state.blocked_until, latest),
        reset_at=None if state.reset_at is None else min(state.reset_at, latest),
        next_slot=min(state.next_slot, latest),
        updated_at=min(state.updated_at, latest),
        probe_until=min(state.probe_until, latest),
        window_first_seen=min(state.window_first_seen, latest),
        tickets=_within(state.tickets, latest),
        interval=None if state.interval is None else min(state.interval, HORIZON_SECONDS),
        window_seconds=min(state.window_seconds, HORIZON_SECONDS),
        limit_logs={
            key: tuple((min(at, latest - _log_seconds(key)), count) for at, count in entries)
            for key, entries in state.limit_logs.items()
        },
    )


def _expire(state: GateState, now: float) -> GateState:
    """Forget what no longer matters, measured from ``now``: stale tickets, and the whole
    state once all its times are long past or it has not been written for long."""
    state = _bounded(state, now)
    if state.updated_at and (
        now > state.horizon + STATE_TTL_SECONDS or now > state.updated_at + MAX_STATE_AGE_SECONDS
    ):
        return GateState(interval=state.interval, origin=state.origin)
    in_flight = _latest(state.in_flight, after=now - IN_FLIGHT_TTL_SECONDS)
    logs = state.limit_logs
    for ticket, let_out in state.in_flight.items():
        if ticket not in in_flight:
            # Never reported (its task died): counted as answered when it stopped being out.
            logs = _with_answer(logs, min(let_out + IN_FLIGHT_TTL_SECONDS, now))
    state = replace(
        state,
        tickets=_latest(state.tickets, after=now - TICKET_TTL_SECONDS),
        in_flight=in_flight,
        limit_logs=_pruned_logs(logs, now, keep_empty=bool(in_flight)),
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


def _seconds(value: float | None) -> float | None:
    """A duration from the reader, checked again: the stored state outlives the response."""
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return min(float(value), HORIZON_SECONDS)


def _count(value: int | None) -> int | None:
    if value is None or value < 0:
        return None
    return min(int(value), MAX_COUNT)


def observe(
    state: GateState,
    info: RateLimitInfo,
    *,
    now: float,
    rate_limited_until: float | None = None,
    ticket: str | None = None,
) -> GateState:
    """Update the gate from what a response said (``info``, from the header reader).

    ``rate_limited_until`` is the time a refused response asked to wait until (clamped to the
    horizon); ``ticket`` is the task whose response this is. ``blocked_until`` only ever
    moves later: two tasks reporting at once can't shorten a block. A response whose quota
    is spent (``remaining == 0``, whichever header said so, ``RateLimit: r=0;t=30`` too)
    closes the gate until its reset even when it was a success.
    """
    state = _expire(state, now)
    reported_remaining = _count(info.remaining)
    reset_after = _seconds(info.reset_after)
    reported_reset = None if reset_after is None else now + reset_after
    if (
        reported_reset is not None
        and state.reset_at is not None
        and reported_reset < state.reset_at - SAME_WINDOW_SECONDS
    ):
        # An answer about a window that is over: another answer already reported a later one
        # (this one was slow, or its request went just before the window turned). Its count
        # is not the current window's, and taken for it, it would bring back a full quota at
        # its reset in the middle of the window the others are spending.
        reported_remaining = reported_reset = None
    interval = _seconds(info.interval) or None
    reported_limit = _count(info.limit)

    # When this answer's request was let out (a holder that sent at its time without writing
    # the gate went no earlier than that time: its ticket stood for the request until now).
    sent_at = state.in_flight.get(ticket) if ticket is not None else None
    if sent_at is None and ticket in state.tickets and state.tickets[ticket] <= now:
        sent_at = state.tickets[ticket]
    in_flight = {other: at for other, at in state.in_flight.items() if other != ticket}
    tickets = {other: at for other, at in state.tickets.items() if other != ticket}
    # Every other request still out may be missing from the server's count, whenever the gate
    # let it out: requests overtake each other on the way (and answers on the way back), so
    # one let out before this one may reach the server after it. Counting one the server did
    # count costs at most that one request of this window; missing one sends a request early.
    unseen = len(in_flight)
    blocked_until = state.blocked_until
    later_by = None if reported_reset is None or state.reset_at is None else reported_reset - state.reset_at
    surely_same = later_by is not None and abs(later_by) <= SAME_WINDOW_SECONDS
    # A reset a little more than a second later is this window's read against another Date
    # (two answers from either side of a whole second, observed out of order) or the next
    # window's: unless its request went after the known reset, it is taken as this window's,
    # whose quota only shrinks, and says nothing of the window's length.
    unsure = (
        later_by is not None
        and not surely_same
        and later_by <= 2 * SAME_WINDOW_SECONDS
        and (sent_at is None or sent_at < state.reset_at)
    )
    same_window = surely_same or unsure
    if reported_remaining is None:
        remaining = state.remaining
    else:
        # The server's count does not know the send times we have already handed out
        # for this window: those tasks will spend quota too.
        window_end = reported_reset if reported_reset is not None else math.inf
        promised = sum(1 for send_at in tickets.values() if _outstanding(send_at, now) and send_at < window_end)
        remaining = max(reported_remaining - promised - unseen, 0)
        if same_window and state.remaining is not None:
            # Within one window the quota only shrinks.
            remaining = min(state.remaining, remaining)
    reset_at = reported_reset if reported_reset is not None else state.reset_at
    if rate_limited_until is not None and not math.isnan(rate_limited_until):
        blocked_until = max(blocked_until, min(rate_limited_until, now + HORIZON_SECONDS))
    if reported_remaining == 0 and reset_at is not None and reset_at > now:
        # The server says the quota is spent: stop before it has to say 429. (Our own,
        # lower count only holds back new tasks in admit(); it must not block the tasks
        # this window's quota was promised to.)
        blocked_until = max(blocked_until, reset_at)
    next_window_taken = state.next_window_taken
    if reported_reset is not None and not same_window:
        # A window newly reported: the times handed out for the window after it are those at
        # or past its reset (within the second it may be read late), such as a block's end.
        next_window_taken = sum(
            1 for at in tickets.values() if _outstanding(at, now) and at >= reported_reset - SAME_WINDOW_SECONDS
        )
    window_first_seen, window_seconds = state.window_first_seen, state.window_seconds
    if reported_reset is not None and not unsure:
        if not (same_window and window_first_seen):
            window_first_seen = now
        # The window began no later than its first report: its length is at least this.
        window_seconds = min(max(window_seconds, reported_reset - window_first_seen), HORIZON_SECONDS)
    return replace(
        state,
        blocked_until=blocked_until,
        remaining=remaining,
        reset_at=reset_at,
        limit=reported_limit if reported_limit is not None else state.limit,
        interval=interval if interval is not None else state.interval,
        next_window_taken=next_window_taken,
        updated_at=now,
        observed_at=now,
        probe_until=0.0,
        window_first_seen=window_first_seen,
        window_seconds=window_seconds,
        in_flight=in_flight,
        tickets=tickets,
        # The server has seen this request: it counts against each configured limit for
        # the limit's window from now (when it was seen is not known more closely).
        limit_logs=_with_answer(state.limit_logs, now),
    )


def admit(
    state: GateState,
    ticket: str,
    *,
    now: float,
    in_process_up_to: float = 0.0,
    min_wait: float = 0.0,
    limits: Sequence[ConfiguredLimit] = (),
    reports_answers: bool = False,
    cheap_looks: bool = False,
) -> Admission:
    """May the task holding ``ticket`` send now? If not, when? Never before ``blocked_until``,
    and never before every one of the configured ``limits`` allows.

    A task is given one send time and keeps it: coming back at that time it sends, unless
    the gate was closed past it meanwhile (a 429 elsewhere), in which case it queues again.

    ``in_process_up_to`` and ``min_wait`` say when the task can really be back: it waits up
    to ``in_process_up_to`` seconds where it is, and a longer wait takes at least
    ``min_wait`` (a deferral's or a reschedule's minimum delay). Its send time is set to
    that, and the times after it are spaced from it, so tasks held back by a minimum delay
    don't come back in a bunch.

    ``limits`` (the Connection's or the operator's declared limits) hold on top of what the
    server said: a newcomer is given the first time that fits every limit, counting the
    requests out, answered, and promised to other tasks; a task back at its promised time is
    held back only by requests really sent since (it had its place).

    ``reports_answers``: the caller always tells the gate how its request ended
    (:func:`observe` with its ticket, or :func:`release_probe`), as the operator and its
    trigger do. A holder back at its time is then let through *without changing the state*:
    its ticket stands for the request until that report, so a store need not write, and the
    tasks sending as a window opens queue for the store only to read it. (Not with
    configured limits, which count each request out from when it is let out, nor while
    pacing with the quota spent, where the next request waits for this one's answer.)

    ``cheap_looks``: asking again costs the task no launch even after a long wait (it waits
    in the triggerer: a deferrable task, or the trigger itself), so a task that fits only in
    a later window may be told to look a little before that window opens and hold its exact
    reset. Without it, only a task that can wait ``in_process_up_to`` that long is.
    """

    def back_at(moment: float) -> float:
        if moment <= now or moment - now <= in_process_up_to:
            return moment
        return max(moment, now + min_wait)

    state = _expire(state, now)
    # How far ahead the task may be told to look again at no cost (see _admit's windows).
    look_ahead = math.inf if cheap_looks else in_process_up_to
    if limits:
        admission = _admit_within_limits(state, ticket, now, back_at, tuple(limits), look_ahead)
    else:
        # A holder back at its time need not write the gate if its answer will be reported,
        # unless configured limits count the requests out (another task's may: their logs
        # are in the state), or pacing with the quota spent, where the next request waits
        # for this one's answer.
        record_send = not reports_answers or bool(state.limit_logs) or _paced_and_spent(state)
        admission = _admit(state, ticket, now, back_at, look_ahead=look_ahead, record_send=record_send)
    latest = now + HORIZON_SECONDS
    if admission.send_at > latest or admission.state.next_slot > latest:
        # A place further than the horizon (a long backlog at a slow rate) is not promised
        # nor stored: the task asks again by then, from where the queue has got to.
        return _recheck(state, ticket, min(admission.send_at, latest), now)
    return admission


def _admit(
    state: GateState,
    ticket: str,
    now: float,
    back_at: Callable[[float], float],
    floor: float = 0.0,
    look_ahead: float = 0.0,
    record_send: bool = True,
) -> Admission:
    held = state.tickets.get(ticket)
    if held is not None and _missed_its_window(state, held, now):
        # Back later than a window lasts after its time: the quota its time was counted in was
        # that window's, and sending now would spend this one's, already handed out to others.
        state, held = _release(state, ticket, now), None
    if held is not None:
        if held <= now and state.blocked_until <= now:
            if state.remaining is not None or state.observed_at:
                if _waits_for_an_answer(state, ticket, now):
                    # Its place stands (nothing written): it looks again shortly.
                    return Admission(send_at=back_at(now + ANSWER_RECHECK_SECONDS),
                                     reason=WAITING_FOR_AN_ANSWER, state=state)
                if not record_send:
                    # Its place was counted when it was given it, and its ticket stands for the
                    # request until the answer is observed (observe and release_probe drop it):
                    # nothing to write, so tasks sending as a window opens queue for the store
                    # only to read it.
                    return Admission(send_at=now, reason=None, state=state)
                return _send_now(_release(state, ticket, now), ticket, now)
            state = _release(state, ticket, now)
            # Held through a block while nothing was known about the API (a damaged state's
            # block): the holders don't all go at once, the probe rule below lets one first.
        elif state.blocked_until <= held:
            return Admission(send_at=held, reason="waiting for its turn at the shared gate", state=state)
        elif not state.interval and state.blocked_until - held <= SAME_WINDOW_SECONDS:
            # Windows: the block moved just past our time, the same reset read again (an epoch
            # reset is measured against the response's Date, whole seconds, so two answers of
            # one window give resets up to a second apart). Keep the place; wait for the block.
            # Queueing again would count this task into the windows after the next. (When
            # pacing, a later time would fall on the next task's slot: it queues again.)
            state = replace(state, tickets={**state.tickets, ticket: back_at(state.blocked_until)}, updated_at=now)
            return _at(state, ticket, state.tickets[ticket], now, "waiting for its turn at the shared gate")
        else:
            # The gate closed past our time: queue again from blocked_until.
            state = _release(state, ticket, now)

    start = max(now, state.blocked_until, floor)
    if state.remaining is None and not state.observed_at and start <= now:
        # Nothing known about this API yet: one request goes first and brings back its
        # limits, instead of everyone starting at once into a 429 the others can't see.
        if state.probe_until > now:
            if _holds_the_probe(state, ticket):
                # The probe's own task asking again: a store that redid its change on a state
                # that already had it (the Variable store's read-back), or a caller that could
                # not act on its "send now" in time. It is still the one to go; holding it
                # back for its own probe would hold everyone until the probe times out.
                probe_until = max(state.probe_until, now + PROBE_TIMEOUT_SECONDS)
                return _send_now(replace(state, probe_until=probe_until, updated_at=now), ticket, now)
            return _recheck(state, ticket, back_at(min(state.probe_until, now + RECHECK_SECONDS)), now)
        state = replace(state, probe_until=now + PROBE_TIMEOUT_SECONDS, updated_at=now)
        return _send_now(state, ticket, now)
    send_at = back_at(start)
    # The quota left is this window's: a request sent after its reset (past a block that ends
    # later) counts in the next window, with the times handed out for it below.
    if state.remaining is None or (state.remaining > 0 and not _counts_after_reset(state, send_at, margin=0.0)):
        remaining = None if state.remaining is None else state.remaining - 1
        taken = state.next_window_taken
        if _counts_after_reset(state, send_at, margin=SAME_WINDOW_SECONDS):
            # The reset is read up to a second late (against a whole-second Date): the window
            # may have turned by then, so the request counts in both.
            taken = min(taken + 1, MAX_COUNT)
        # The next paced slot comes one interval after this send.
        pacing_floor = max(state.next_slot, send_at + (state.interval or 0.0))
        state = replace(state, remaining=remaining, next_slot=pacing_floor, next_window_taken=taken, updated_at=now)
        return _at(state, ticket, send_at, now, "the API is blocked (shared gate)")

    if state.interval:
        slot = back_at(max(start, state.next_slot))
        if slot <= now and _waits_for_an_answer(state, ticket, now):
            slot = back_at(now + ANSWER_RECHECK_SECONDS)
        state = replace(state, next_slot=slot + state.interval, updated_at=now)
        return _at(state, ticket, slot, now, "pacing to the API's rate (shared gate)")

    if state.reset_at is not None and state.limit:
        slot = back_at(max(start, state.reset_at))
        taken = state.next_window_taken
        state = replace(state, next_window_taken=min(taken + 1, MAX_COUNT), updated_at=now)
        if taken < state.limit:
            return _at(state, ticket, slot, now, "quota spent, waiting for the window to reset (shared gate)")
        # The next window's quota is handed out too: look again once the window this task
        # would fit in (``taken // limit`` windows later) can have opened, so it uses that
        # window's quota as it opens. The look sends nothing by itself.
        if not state.window_seconds:
            return _recheck(state, ticket, back_at(slot + RECHECK_SECONDS), now)
        windows_later = taken // state.limit
        early = min(EARLY_LOOK_SECONDS, state.window_seconds / 4)
        look = slot + windows_later * state.window_seconds - early
        if look - now <= look_ahead:
            # Looking again costs it nothing (it waits in a trigger): it looks a little before
            # the window opens, when the window before has reported the exact reset, and
            # holds that.
            return _recheck(state, ticket, back_at(max(look, now)), now)
        # A look too early would cost a rescheduled task another launch: it comes when the
        # window opens, as far as the length is known.
        return _recheck(state, ticket, back_at(slot + windows_later * _whole_window_seconds(state.window_seconds)), now)

    if state.limit:
        # The quota is spent and the window it was counted in is over or unknown: past the
        # block (a Retry-After says nothing of the window it ends in), how much of the quota
        # is left is unknown, though the limit is known to be small enough to matter. One task
        # goes and brings back the count; the others look again after it, not all at the
        # block's end. While a request is out or a task holds a time, the others wait for it,
        # as for a first-contact probe: not for one whose task died without reporting.
        recent = now - PROBE_TIMEOUT_SECONDS
        ahead = [held for held in state.tickets.values() if held > recent]
        if ahead or any(let_out > recent for let_out in state.in_flight.values()):
            return _recheck(state, ticket, back_at(max([start, *ahead]) + RECHECK_SECONDS), now)
    # Quota reported spent but no reset time or rate: only the block is known; past it,
    # let the server say what comes next.
    return _at(state, ticket, back_at(start), now, "the API is blocked (shared gate)")


def _missed_its_window(state: GateState, held: float, now: float) -> bool:
    """Fixed windows: is a task back at ``now`` for the time ``held`` past the end of the window
    that time was in? A time handed out is never before its window opened, and a window lasts
    at least the length seen less a second (the length is measured to a reset read up to a
    second late)."""
    if not state.limit or state.interval or state.window_seconds <= SAME_WINDOW_SECONDS:
        return False
    return now >= held + state.window_seconds - SAME_WINDOW_SECONDS


def _counts_after_reset(state: GateState, at: float, *, margin: float) -> bool:
    """Fixed windows of a known limit: would a request sent at ``at`` count in the window after
    the one ending at ``reset_at``, the reset read up to ``margin`` late?"""
    return (
        bool(state.limit)
        and not state.interval
        and state.reset_at is not None
        and at >= state.reset_at - margin
    )


def _whole_window_seconds(length: float) -> float:
    """A fixed window's length, from the longest seen from a window's first answer to its reset.

    Windows last whole seconds (GitHub's hour, most APIs' minute) and that figure is below
    the length by how late the first answer came, so it is rounded up. (The reset itself is
    read up to a second late, against a whole-second Date: then this is a second long.) It
    replaces the figure plus RECHECK_SECONDS, which brought these tasks back up to a second
    after their window opened even when the reset was read exactly.
    """
    return float(math.ceil(length - WHOLE_SECOND_TOLERANCE))


def _outstanding(send_at: float, now: float) -> bool:
    """A time handed out is still a request to come (or out, unanswered): not one whose task
    is long gone."""
    return send_at > now - IN_FLIGHT_TTL_SECONDS


def _paced_and_spent(state: GateState) -> bool:
    """Pacing to a stated rate, with the quota counted spent: each request is let out on
    its own slot, and needs the answer of the one before to know the next token's time."""
    return bool(state.interval) and state.remaining == 0


def _waits_for_an_answer(state: GateState, ticket: str, now: float) -> bool:
    """Must a paced request due now wait for another one's answer? While the quota is counted
    spent, yes, as long as a request let out recently is unanswered: it may reach the server
    after its time (or this one before it), and its answer, once stored, says when the next
    token comes. Not for one whose task went silent :data:`PROBE_TIMEOUT_SECONDS` ago.
    (Holders sending in this state are recorded as out, see ``_admit``.)"""
    if not _paced_and_spent(state):
        return False
    recent = now - PROBE_TIMEOUT_SECONDS
    return any(other != ticket and let_out > recent for other, let_out in state.in_flight.items())


def _holds_the_probe(state: GateState, ticket: str) -> bool:
    """Was ``ticket`` let out as the first-contact probe that is still under way? The probe's
    time runs ``PROBE_TIMEOUT_SECONDS`` from when its task was let out; a ticket let out for an
    earlier probe, since timed out, is not it."""
    let_out = state.in_flight.get(ticket)
    return let_out is not None and let_out >= state.probe_until - PROBE_TIMEOUT_SECONDS - 1e-3


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


# -- configured limits -------------------------------------------------------------------------
#
# Each configured limit is a set of sliding windows (``ConfiguredLimit.windows``: at most n
# requests in any w seconds). A request counts in them from when it is let out (while in
# flight, as if answered at any moment now) until w after its answer was observed (the
# limit's log). A task is given the first time at which one more request keeps every window
# of every limit within its count, counting also the times promised to other tasks.


#: Rounds of fitting a time to several windows before taking the time after all their requests.
_MAX_FIT_ROUNDS = 32


@lru_cache(maxsize=256)
def _log_seconds(key: str) -> float:
    """How long an answer counts against the configured limit stored under ``key``."""
    return ConfiguredLimit.from_key(key).per_seconds


def _compacted(entries: Sequence[tuple[float, int]]) -> tuple[tuple[float, int], ...]:
    """Sorted ``entries`` with one entry per moment and at most MAX_LOG_ENTRIES of them: the
    two closest merge into the later one (those requests then count longer, never shorter)."""
    merged: list[tuple[float, int]] = []
    for at, count in entries:
        if merged and at - merged[-1][0] <= SAME_MOMENT_SECONDS:
            merged[-1] = (at, min(merged[-1][1] + count, MAX_COUNT))
        else:
            merged.append((at, count))
    while len(merged) > MAX_LOG_ENTRIES:
        closest = min(range(len(merged) - 1), key=lambda i: merged[i + 1][0] - merged[i][0])
        earlier, later = merged[closest], merged[closest + 1]
        merged[closest : closest + 2] = [(later[0], min(earlier[1] + later[1], MAX_COUNT))]
    return tuple(merged)


def _fewest_logs(logs: dict[str, tuple[tuple[float, int], ...]]) -> dict[str, tuple[tuple[float, int], ...]]:
    """At most MAX_LIMIT_LOGS logs, the most recently answered."""
    if len(logs) <= MAX_LIMIT_LOGS:
        return logs
    by_recency = sorted(logs.items(), key=lambda item: item[1][-1][0] if item[1] else 0.0)
    return dict(by_recency[-MAX_LIMIT_LOGS:])


def _with_answer(
    logs: dict[str, tuple[tuple[float, int], ...]], at: float
) -> dict[str, tuple[tuple[float, int], ...]]:
    """Every configured limit's log with one more request answered at ``at``."""
    updated = {}
    for key, entries in logs.items():
        items = list(entries)
        insort(items, (at, 1))
        updated[key] = _compacted(items)
    return updated


def _pruned_logs(
    logs: dict[str, tuple[tuple[float, int], ...]], now: float, *, keep_empty: bool
) -> dict[str, tuple[tuple[float, int], ...]]:
    """The logs without the answers no window from ``now`` on can hold. An empty log is kept
    while requests are out: their answers must find the logs of the limits they count in."""
    pruned = {}
    for key, entries in logs.items():
        since = now - _log_seconds(key)
        kept = tuple(entry for entry in entries if entry[0] > since)
        if kept or keep_empty:
            pruned[key] = kept
    return pruned


@dataclass(frozen=True)
class _Window:
    """One sliding window of a configured limit, and the requests counted in it: ``times``
    sorted, ``totals[i]`` the number of requests at ``times[:i]``."""

    limit: ConfiguredLimit
    at_most: int
    seconds: float
    times: list[float]
    totals: list[int]

    def counted(self, end: float) -> int:
        """Requests in the window ``(end - seconds, end]``."""
        low = bisect_right(self.times, end - self.seconds + SAME_MOMENT_SECONDS)
        return self.totals[bisect_right(self.times, end)] - self.totals[low]

    def earliest(self, start: float) -> float:
        """The first time from ``start`` at which one more request keeps every window of
        ``seconds`` within ``at_most``: the windows ending then, and those ending later."""
        times, totals, seconds = self.times, self.totals, self.seconds
        moment = start
        while True:
            low = bisect_right(times, moment - seconds + SAME_MOMENT_SECONDS)
            inside = totals[bisect_right(times, moment)] - totals[low]
            if inside >= self.at_most:
                # Full: wait until enough of the earliest requests in it have left.
                leaving = bisect_left(totals, totals[low] + inside - self.at_most + 1) - 1
                moment = times[leaving] + seconds
                continue
            later = bisect_right(times, moment)
            while later < len(times) and times[later] < moment + seconds - SAME_MOMENT_SECONDS:
                if self.counted(times[later]) >= self.at_most:
                    break  # a later window is full already and would hold this one too
                later = bisect_right(times, times[later])
            else:
                return moment
            moment = times[later]


def _windows(
    limits: Sequence[ConfiguredLimit], state: GateState, ticket: str, now: float, *, holder: bool
) -> list[_Window]:
    """The windows of ``limits`` with the requests each counts for a task asking at ``now``:
    those answered (the limit's log), those out (as if answered at any moment now), and,
    unless the task is a ``holder`` back at its promised time (its place was counted when the
    others were given theirs), the times promised to other tasks."""
    others = [] if holder else sorted(
        at for other, at in state.tickets.items() if other != ticket and _outstanding(at, now)
    )
    # Promised times already past: those tasks are back (or about to be), sending now.
    due = bisect_left(others, now)
    out = sum(1 for other in state.in_flight if other != ticket)
    others[:due] = [now] * (due + out)
    windows = []
    for limit in limits:
        times, weights = list(others), [1] * len(others)
        for at, count in state.limit_logs.get(limit.key, ()):
            place = bisect_right(times, at)
            times.insert(place, at)
            weights.insert(place, count)
        totals = [0, *accumulate(weights)]
        windows.extend(_Window(limit, at_most, seconds, times, totals) for at_most, seconds in limit.windows)
    return windows


def _fit(windows: Sequence[_Window], start: float) -> tuple[float, ConfiguredLimit | None]:
    """The first time from ``start`` every window allows, and the limit that set it (``None``:
    ``start`` itself)."""
    moment, binding = start, None
    for _ in range(_MAX_FIT_ROUNDS):
        moved = False
        for window in windows:
            allowed = window.earliest(moment)
            if allowed > moment:
                moment, binding, moved = allowed, window.limit, True
        if not moved:
            return moment, binding
    # Windows still pushing each other: once every counted request is out of every window,
    # all of them allow it.
    after_all = max((window.times[-1] + window.seconds for window in windows if window.times), default=moment)
    return max(moment, after_all), binding


def _kept_fit(
    windows: Sequence[_Window], start: float, back_at: Callable[[float], float]
) -> tuple[float, ConfiguredLimit | None]:
    """As :func:`_fit`, a time the task can keep: stretched to its minimum wait, then fitted
    again (a later time may meet other requests' windows)."""
    moment, binding = start, None
    while True:
        fitted, by = _fit(windows, moment)
        binding = by or binding
        kept = back_at(fitted)
        if kept == fitted:
            return fitted, binding
        moment = kept  # at least now + min_wait: back_at keeps any later time as it is


def _limit_reason(limit: ConfiguredLimit | None) -> str:
    described = "" if limit is None else f" {limit.describe()}"
    return f"waiting for the configured rate limit{described} (shared gate)"


def _admit_within_limits(
    state: GateState,
    ticket: str,
    now: float,
    back_at: Callable[[float], float],
    limits: Sequence[ConfiguredLimit],
    look_ahead: float,
) -> Admission:
    held = state.tickets.get(ticket)
    if held is not None and held <= now and state.blocked_until <= now:
        # Back at its time. Requests sent since it was given that time (others back late,
        # answers slower than thought) may still fill a window: then it waits for them.
        when, binding = _kept_fit(_windows(limits, state, ticket, now, holder=True), now, back_at)
        if when > now:
            return _at(replace(state, updated_at=now), ticket, when, now, _limit_reason(binding))
        return _with_limit_logs(_admit(state, ticket, now, back_at, look_ahead=look_ahead), limits, now)
    if held is not None and now < held and state.blocked_until <= held:
        return _admit(state, ticket, now, back_at, look_ahead=look_ahead)  # back early: the same time again
    # The other tasks' places and requests are the same before and after _admit below.
    windows = _windows(limits, state, ticket, now, holder=False)
    floor, floor_binding = _fit(windows, max(now, state.blocked_until))
    admission = _admit(state, ticket, now, back_at, floor, look_ahead)
    if admission.send_at <= now:
        return _with_limit_logs(admission, limits, now)
    if admission.state.tickets.get(ticket) != admission.send_at:
        return admission  # told to look again: nothing promised
    # What the server said (a reset, its pacing) or a minimum wait moved the time past the
    # floor: fit it again there.
    when, binding = _kept_fit(windows, admission.send_at, back_at)
    if when == admission.send_at:
        if floor_binding is not None and when == back_at(floor):
            return replace(admission, reason=_limit_reason(floor_binding))
        return admission
    fitted = admission.state
    if fitted.interval:
        fitted = replace(fitted, next_slot=max(fitted.next_slot, when + fitted.interval))
    return _at(fitted, ticket, when, now, _limit_reason(binding))


def _with_limit_logs(admission: Admission, limits: Sequence[ConfiguredLimit], now: float) -> Admission:
    """A request let out now: the logs of its limits exist for its answer to be counted in."""
    if admission.send_at > now:
        return admission
    logs = admission.state.limit_logs
    missing = {limit.key: () for limit in limits if limit.key not in logs}
    if not missing:
        return admission
    return replace(admission, state=replace(admission.state, limit_logs=_fewest_logs({**logs, **missing})))


def release_probe(state: GateState, ticket: str | None = None, *, now: float | None = None) -> GateState:
    """A request got no answer (refused, timed out): it is no longer out (nor holds a time),
    and if it was the first-contact probe, the next task may try.

    It may still have reached the server, so it counts against the configured limits as if
    answered at ``now`` (when not given, at when it was let out: pass ``now``).
    """
    in_flight = {k: v for k, v in state.in_flight.items() if k != ticket}
    tickets = {k: v for k, v in state.tickets.items() if k != ticket}
    logs = state.limit_logs
    if ticket in state.in_flight:
        logs = _with_answer(logs, state.in_flight[ticket] if now is None else now)
    return replace(state, probe_until=0.0, in_flight=in_flight, tickets=tickets, limit_logs=logs)


def is_open(state: GateState, now: float) -> bool:
    """Would a task with no ticket be let through right now? (For the UI and logs.)"""
    return admit(state, "__probe__", now=now).send_at <= now
