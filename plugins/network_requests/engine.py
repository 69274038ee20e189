"""What a request task does next: one pure decision, for the worker and the triggerer alike.

The operator (on a worker) and the trigger (in the triggerer) are two thin drivers of
:func:`next_step`. Each tells it what just happened (an :class:`Observation`: an initial
delay to honour, the shared gate's answer, a gate that could not be read, or the server's
answer), and carries out the :class:`Step` it returns: send now, wait (in the process,
deferred, or rescheduled), fail, or finish with the answer. Nothing here sleeps, sends,
reads a clock or draws a random number: ``now`` and ``rand`` are arguments, and the
small :class:`WaitBudget` of what this try has waited so far goes in and comes out.

No hammering: a rate-limited answer that allows an immediate retry (``Retry-After: 0``, a
date already past, a reset already passed) is retried at once only once in a row. The next
ones in a row back off from ``retry_delay`` with the task's exponential factor and jitter,
so a server that answers ``429, Retry-After: 0`` forever sees a bounded number of requests
per minute until ``rate_limit_timeout`` ends the try with a rate-limit failure.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from network_requests.rate_limit import Backoff, Outcome, RateLimitWait, WaitSource, wait_limit_violation

#: At most this many in-process waits per run of the task on a worker, so a slot is never held for long.
MAX_IN_PROCESS_WAITS = 5
#: A shared gate that cannot be read is never taken for an open one: the task waits this long
#: and asks again (the store may be restarting) ...
GATE_UNREADABLE_WAIT = timedelta(seconds=5)
#: ... and after this many failed reads in a row it fails the try (Airflow's retries apply).
MAX_GATE_FAILURES = 3
#: Answers waited out (the server's time, else the backoff) and sent again, spending no try.
WAITED_OUTCOMES = frozenset({Outcome.RATE_LIMITED, Outcome.IN_PROGRESS})
#: Why a 409 to a keyed request is waited out, for the log.
IN_PROGRESS_REASON = ("the server is still processing an earlier send of this request (409 to its "
                      "Idempotency-Key); sending it again with the same key")


class Place(enum.Enum):
    """Where the task is waiting, which decides how a wait is carried out."""

    #: A worker, ``deferrable=True``: long waits go to the triggerer.
    WORKER_DEFERRABLE = "worker_deferrable"
    #: A worker, ``deferrable=False``: long waits are reschedules.
    WORKER_RESCHEDULING = "worker_rescheduling"
    #: The triggerer: every wait is slept in the trigger, and the task stays deferred.
    TRIGGERER = "triggerer"


class Mode(str, enum.Enum):
    """How a wait is carried out (also the ``mode`` of wait events and metrics)."""

    IN_PROCESS = "in_process"
    DEFER = "defer"
    RESCHEDULE = "reschedule"


@dataclass(frozen=True)
class WaitRules:
    """The task's settings that bound and shape its waits."""

    place: Place
    backoff: Backoff
    #: A single wait longer than this fails the task (``max_rate_limit_wait``).
    max_single_wait: timedelta | None = None
    #: Rate-limit waiting of one try beyond this fails the task (``rate_limit_timeout``).
    total_timeout: timedelta | None = None
    #: Waits this short are slept where the task runs (worker only).
    in_process_threshold: timedelta = timedelta(0)
    #: A wait that leaves the worker is due no sooner than this (min defer / reschedule delay).
    min_leave_delay: timedelta = timedelta(0)
    max_in_process_waits: int = MAX_IN_PROCESS_WAITS

    def in_process_allowed(self, budget: WaitBudget) -> bool:
        return self.place is Place.TRIGGERER or budget.in_process_waits < self.max_in_process_waits

    def gate_hints(self, budget: WaitBudget) -> tuple[float, float]:
        """``(in_process_up_to, min_wait)`` seconds for ``gate.admit``: when this task can really be back."""
        if self.place is Place.TRIGGERER:
            return float("inf"), 0.0  # the trigger sleeps to any moment exactly
        up_to = self.in_process_threshold.total_seconds() if self.in_process_allowed(budget) else 0.0
        return up_to, self.min_leave_delay.total_seconds()


@dataclass(frozen=True)
class WaitBudget:
    """What this try has waited so far: the input of the backoff, the caps and the in-process limit."""

    #: Rate-limited answers waited out this try (the backoff's exponent for a header-less 429).
    rate_limit_waits: int = 0
    #: Rate-limited answers in a row that allowed an immediate retry.
    immediate_in_a_row: int = 0
    #: When this try first waited (rate limit or shared gate); ``None`` if it has not.
    waiting_since: datetime | None = None
    #: Waits slept in this process run (worker only; a new run starts at 0).
    in_process_waits: int = 0
    #: Failed reads of the shared gate in a row.
    gate_failures: int = 0

    def waited(self, now: datetime) -> timedelta:
        if self.waiting_since is None:
            return timedelta(0)
        return max(now - self.waiting_since, timedelta(0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, for a deferral's kwargs and the trigger's."""
        return {
            "rate_limit_waits": self.rate_limit_waits,
            "immediate_in_a_row": self.immediate_in_a_row,
            "waiting_since": self.waiting_since.isoformat() if self.waiting_since else None,
            "gate_failures": self.gate_failures,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> WaitBudget:
        data = data or {}
        since = data.get("waiting_since")
        return cls(
            rate_limit_waits=int(data.get("rate_limit_waits") or 0),
            immediate_in_a_row=int(data.get("immediate_in_a_row") or 0),
            waiting_since=datetime.fromisoformat(since) if since else None,
            gate_failures=int(data.get("gate_failures") or 0),
        )


# -- What happened (the input) ------------------------------------------------------------------


@dataclass(frozen=True)
class InitialDelay:
    """The first try must not send before ``until`` (``initial_delay``)."""

    until: datetime


@dataclass(frozen=True)
class GateAnswer:
    """The shared gate's answer: send now (``send_at`` ``None`` or past), or not before ``send_at``."""

    send_at: datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class GateUnreadable:
    """The shared gate's store could not be read or updated before sending."""

    error: str


@dataclass(frozen=True)
class Answered:
    """The server answered; ``server_wait`` is the wait it asked for (the outcomes in
    :data:`WAITED_OUTCOMES` only)."""

    outcome: Outcome
    server_wait: RateLimitWait | None = None
    status_code: int | None = None


Observation = InitialDelay | GateAnswer | GateUnreadable | Answered


# -- What to do (the output) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send the request now."""

    budget: WaitBudget


@dataclass(frozen=True)
class Wait:
    """Wait, then observe again (ask the gate, send): never before ``not_before``."""

    #: The earliest moment the server (or the gate, or the initial delay) allows.
    not_before: datetime
    #: When the task really comes back: ``not_before``, or later by a minimum delay.
    resume_at: datetime
    seconds: float
    source: WaitSource
    mode: Mode
    #: The budget to carry on with, after this wait.
    budget: WaitBudget
    #: Why, for the log (the gate's reason, a rejected header, the no-hammering rule).
    reason: str | None = None


class FailKind(enum.Enum):
    #: A wait beyond ``max_rate_limit_wait`` or ``rate_limit_timeout``: fail, no retry.
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    #: The shared gate could not be read several times in a row: fail the try (retried).
    GATE_UNAVAILABLE = "gate_unavailable"


@dataclass(frozen=True)
class Fail:
    kind: FailKind
    #: For the user: why the task gives up.
    problem: str
    status_code: int | None = None
    wait_seconds: float = 0.0


@dataclass(frozen=True)
class Finish:
    """The answer is final: a success to return, or the error its outcome stands for."""

    outcome: Outcome


Step = Send | Wait | Fail | Finish


# -- The decision -----------------------------------------------------------------------------------


def next_step(
    observation: Observation,
    budget: WaitBudget,
    rules: WaitRules,
    *,
    now: datetime,
    rand: Callable[[], float],
) -> Step:
    """What the task does after ``observation``. Pure: same inputs, same step."""
    if isinstance(observation, InitialDelay):
        wait = RateLimitWait(_seconds_until(observation.until, now), WaitSource.INITIAL_DELAY, observation.until)
        # Not a rate-limit wait: no caps, no budget spent, never slept holding a slot.
        return _wait(wait, budget, budget, rules, now=now, in_process=False, counts=False)
    if isinstance(observation, GateUnreadable):
        failures = budget.gate_failures + 1
        if failures >= MAX_GATE_FAILURES:
            return Fail(FailKind.GATE_UNAVAILABLE, f"the shared gate could not be read {failures} times in a row: "
                        f"{observation.error}")
        wait = RateLimitWait(GATE_UNREADABLE_WAIT.total_seconds(), WaitSource.SHARED_GATE, now + GATE_UNREADABLE_WAIT)
        reason = f"the shared gate could not be read ({observation.error}); not sending blindly"
        return _wait(wait, budget, replace(budget, gate_failures=failures), rules, now=now, reason=reason)
    if isinstance(observation, GateAnswer):
        budget = replace(budget, gate_failures=0)
        if observation.send_at is None or observation.send_at <= now:
            return Send(budget)
        wait = RateLimitWait(_seconds_until(observation.send_at, now), WaitSource.SHARED_GATE, observation.send_at)
        return _wait(wait, budget, budget, rules, now=now, reason=observation.reason)
    if observation.outcome not in WAITED_OUTCOMES:
        return Finish(observation.outcome)
    if observation.server_wait is None:
        raise ValueError("a rate-limited answer needs the wait the server asked for")
    wait, after, reason = _without_hammering(observation.server_wait, budget, rules, now=now, rand=rand)
    if observation.outcome is Outcome.IN_PROGRESS:
        reason = "; ".join(filter(None, (IN_PROGRESS_REASON, reason)))
    return _wait(wait, budget, after, rules, now=now, reason=reason, status_code=observation.status_code)


def _without_hammering(
    wait: RateLimitWait, budget: WaitBudget, rules: WaitRules, *, now: datetime, rand: Callable[[], float]
) -> tuple[RateLimitWait, WaitBudget, str | None]:
    """The server's wait, unless it is the second immediate retry in a row: then a backoff."""
    counted = replace(budget, rate_limit_waits=budget.rate_limit_waits + 1)
    if wait.seconds > 0:
        return wait, replace(counted, immediate_in_a_row=0), wait.fallback_reason
    in_a_row = budget.immediate_in_a_row + 1
    counted = replace(counted, immediate_in_a_row=in_a_row)
    if in_a_row == 1:
        return wait, counted, wait.fallback_reason
    seconds = rules.backoff.seconds(in_a_row - 2, rand)
    reason = (
        f"the server allowed an immediate retry {in_a_row} times in a row ({wait.source.value}); "
        f"backing off from retry_delay instead"
    )
    return RateLimitWait(seconds, WaitSource.BACKOFF, now + timedelta(seconds=seconds), wait.fallback_reason), counted, reason


def _wait(
    wait: RateLimitWait,
    before: WaitBudget,
    after: WaitBudget,
    rules: WaitRules,
    *,
    now: datetime,
    reason: str | None = None,
    in_process: bool = True,
    counts: bool = True,
    status_code: int | None = None,
) -> Wait | Fail:
    """Turn a wait into a step: fail past the caps, else choose how to wait."""
    if counts:
        problem = wait_limit_violation(
            wait,
            waited_so_far=before.waited(now),
            max_single_wait=rules.max_single_wait,
            total_timeout=rules.total_timeout,
        )
        if problem:
            return Fail(FailKind.RATE_LIMIT_EXCEEDED, problem, status_code=status_code, wait_seconds=wait.seconds)
        after = replace(after, waiting_since=before.waiting_since or now)
    left = _seconds_until(wait.not_before, now)
    if rules.place is Place.TRIGGERER:
        mode, resume_at = Mode.DEFER, wait.not_before
    elif in_process and rules.in_process_allowed(before) and left <= rules.in_process_threshold.total_seconds():
        mode, resume_at = Mode.IN_PROCESS, wait.not_before
        after = replace(after, in_process_waits=before.in_process_waits + 1)
    else:
        mode = Mode.DEFER if rules.place is Place.WORKER_DEFERRABLE else Mode.RESCHEDULE
        resume_at = max(wait.not_before, now + rules.min_leave_delay)
        after = replace(after, in_process_waits=0)  # the task comes back in a new process
    return Wait(wait.not_before, resume_at, left, wait.source, mode, after, reason)


def _seconds_until(moment: datetime, now: datetime) -> float:
    return max((moment - now).total_seconds(), 0.0)


__all__ = [
    "Answered", "Fail", "FailKind", "Finish", "GateAnswer", "GateUnreadable", "InitialDelay", "Mode",
    "Observation", "Place", "Send", "Step", "WAITED_OUTCOMES", "Wait", "WaitBudget", "WaitRules", "next_step",
]  # fmt: skip
