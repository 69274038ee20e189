"""What a sensor does after a poke: one pure decision, for the worker and the triggerer alike.

``NetworkRequestSensor`` (on a worker) and ``NetworkRequestSensorTrigger`` (in the
triggerer) are two thin drivers of :func:`next_poke`. Each tells it what the last poke
read (a :data:`Reading`): ready, not ready yet, rate limited (the engine's wait for the
server's time), or held by the shared gate before anything was sent; and carries out the
:data:`SensorStep` it returns: finish, poke again not before a moment (sleeping, deferred or
rescheduled), or time out. Nothing here sleeps, sends or reads a clock: ``now`` is an argument.

The rules, in one place:

- a not-ready answer (``response_check`` said no, a ``not_ready_status_codes`` status, a
  transient error when those count as not ready) is poked again ``poke_interval`` after it;
- a rate-limited answer is poked again at the later of the server's time (``Retry-After``,
  a reset, else the engine's backoff; see :mod:`network_requests.engine`) and
  ``poke_interval`` after it: the server's time is a floor, and so is the interval;
- a request the shared gate holds is sent at the gate's time (nothing was sent, so no
  interval to keep);
- the sensor's ``timeout`` counts from its first poke (as Airflow's sensors count it); when
  the next allowed poke lies beyond it, the sensor times out now instead of waiting only to
  time out afterwards. A poke that happens late (a worker that came back late) and reads
  "ready" still succeeds.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from network_requests.engine import Mode, Place, Wait, WaitBudget, WaitRules

if TYPE_CHECKING:
    from network_requests.request_spec import WaitSettings


class SensorPlace(enum.Enum):
    """Where the sensor runs, which decides how it waits between pokes."""

    #: A worker, ``mode="poke"``: sleeps between pokes, holding its slot (Airflow's default mode).
    WORKER_POKING = "worker_poking"
    #: A worker, ``mode="reschedule"``: every wait frees the slot (``up_for_reschedule``).
    WORKER_RESCHEDULING = "worker_rescheduling"
    #: A worker, ``deferrable=True``: every wait goes to the triggerer.
    WORKER_DEFERRABLE = "worker_deferrable"
    #: The triggerer: pokes and waits there; the task stays deferred.
    TRIGGERER = "triggerer"


@dataclass(frozen=True)
class SensorRules:
    """The sensor's settings that space its pokes and end its waiting."""

    place: SensorPlace
    poke_interval: timedelta
    #: Counted from the first poke (``SensorState.started_at``).
    timeout: timedelta
    #: A wait that leaves the worker is due no sooner than this (see ``wait_delays``).
    min_leave_delay: timedelta = timedelta(0)

    def engine_rules(self, settings: WaitSettings) -> WaitRules:
        """The engine's rules for the rate-limit waits of this sensor (caps, backoff, gate hints).

        The engine's own choice of how to wait is not used: :func:`next_poke` chooses. The
        place still matters to the shared gate, which is told when the task can really be back.
        """
        if self.place is SensorPlace.TRIGGERER:
            return settings.rules(Place.TRIGGERER)
        if self.place is SensorPlace.WORKER_POKING:
            # Poke mode sleeps every wait where it runs, however long, as Airflow's sensors do.
            rules = settings.rules(Place.WORKER_RESCHEDULING, in_process_threshold=timedelta.max)
            return replace(rules, max_in_process_waits=sys.maxsize)
        place = Place.WORKER_DEFERRABLE if self.place is SensorPlace.WORKER_DEFERRABLE else Place.WORKER_RESCHEDULING
        return settings.rules(place, min_leave_delay=self.min_leave_delay)


@dataclass(frozen=True)
class SensorState:
    """What one try of the sensor carries from poke to poke (across deferrals too)."""

    #: When this try first poked: the sensor's ``timeout`` counts from here.
    started_at: datetime
    #: The engine's budget of rate-limit waits (backoff exponent, the no-hammering count).
    budget: WaitBudget = WaitBudget()
    #: Requests answered so far this try (for the log).
    pokes: int = 0

    def deadline(self, rules: SensorRules) -> datetime:
        return self.started_at + rules.timeout

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, for a trigger's arguments and its events."""
        return {"started_at": self.started_at.isoformat(), "budget": self.budget.to_dict(), "pokes": self.pokes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensorState:
        return cls(
            started_at=datetime.fromisoformat(data["started_at"]),
            budget=WaitBudget.from_dict(data.get("budget")),
            pokes=int(data.get("pokes") or 0),
        )


# -- What the last poke read (the input) --------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The resource is ready; ``xcom`` is the sensor's result (a ``PokeReturnValue``'s value, else ``None``)."""

    xcom: Any = None


@dataclass(frozen=True)
class NotReady:
    """An answer that says "not yet"; ``why`` is for the log."""

    why: str


@dataclass(frozen=True)
class RateLimited:
    """The server answered with a rate limit; ``wait`` is the engine's step for it."""

    wait: Wait


@dataclass(frozen=True)
class Held:
    """The shared gate held the request (nothing was sent); ``wait`` is the engine's step for it."""

    wait: Wait


Reading = Ready | NotReady | RateLimited | Held


# -- What to do (the output) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """Ready: the task succeeds with ``xcom``."""

    xcom: Any = None


@dataclass(frozen=True)
class PokeAgain:
    """Poke again, never before ``at``."""

    at: datetime
    #: When the task really comes back: ``at``, or later by the minimum delay of leaving a worker.
    resume_at: datetime
    mode: Mode
    state: SensorState
    #: Why this long, for the log.
    why: str
    #: The engine's wait when the server or the gate set the time (announced as a rate-limit
    #: wait, with this step's mode and return time); ``None`` for an ordinary not-ready poke.
    paced_by: Wait | None = None


@dataclass(frozen=True)
class TimedOut:
    """The next allowed poke lies beyond the sensor's timeout."""

    message: str


SensorStep = Done | PokeAgain | TimedOut


# -- The decision -----------------------------------------------------------------------------------


def next_poke(reading: Reading, state: SensorState, rules: SensorRules, *, now: datetime) -> SensorStep:
    """What the sensor does after ``reading``. Pure: same inputs, same step.

    ``state`` is the state after the poke (its budget the one the request was sent with).
    """
    if isinstance(reading, Ready):
        return Done(reading.xcom)
    interval = f"poke_interval={rules.poke_interval.total_seconds():g}s"
    paced_by: Wait | None = None
    if isinstance(reading, NotReady):
        at, why = now + rules.poke_interval, f"not ready ({reading.why}); {interval}"
        state = replace(state, budget=replace(state.budget, immediate_in_a_row=0))
    elif isinstance(reading, RateLimited):
        paced_by, state = reading.wait, replace(state, budget=reading.wait.budget)
        at = max(reading.wait.not_before, now + rules.poke_interval)
        why = f"rate limited ({reading.wait.source.value})"
        if at > reading.wait.not_before:
            why += f"; {interval} is longer"
    else:
        paced_by, state = reading.wait, replace(state, budget=reading.wait.budget)
        at, why = reading.wait.not_before, f"held by the shared gate ({reading.wait.reason or 'its turn'})"
    deadline = state.deadline(rules)
    if at > deadline:
        return TimedOut(
            f"Sensor has timed out: the next poke is allowed at {at.isoformat()} ({why}), after the timeout of "
            f"{rules.timeout.total_seconds():g}s counted from the first poke at {state.started_at.isoformat()}"
        )
    mode, resume_at = _how_to_wait(at, rules, now=now)
    if paced_by is not None:
        left = max((at - now).total_seconds(), 0.0)
        paced_by = replace(paced_by, not_before=at, resume_at=resume_at, mode=mode, seconds=left)
    return PokeAgain(at, resume_at, mode, state, why, paced_by)


def _how_to_wait(at: datetime, rules: SensorRules, *, now: datetime) -> tuple[Mode, datetime]:
    if rules.place is SensorPlace.WORKER_POKING:
        return Mode.IN_PROCESS, at
    if rules.place is SensorPlace.TRIGGERER:
        return Mode.DEFER, at  # the trigger sleeps to any moment exactly
    mode = Mode.DEFER if rules.place is SensorPlace.WORKER_DEFERRABLE else Mode.RESCHEDULE
    return mode, max(at, now + rules.min_leave_delay)


__all__ = [
    "Done", "Held", "NotReady", "PokeAgain", "RateLimited", "Reading", "Ready", "SensorPlace", "SensorRules",
    "SensorState", "SensorStep", "TimedOut", "next_poke",
]  # fmt: skip
