"""What happened on each attempt, for whoever wants to know (metrics, the UI timeline).

The operator calls :func:`emit` once per attempt and once per wait; subscribers registered
with :func:`subscribe` turn the events into metrics or stored history. A failing
subscriber is logged and never fails the task: observing must not change the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttemptEvent:
    """One request that got an answer (or a connection error, ``status_code=None``)."""

    conn_id: str
    method: str
    url: str  # without credentials
    status_code: int | None
    outcome: str  # rate_limit.Outcome value, or "connection_error"
    elapsed_s: float
    at: datetime


@dataclass(frozen=True)
class WaitEvent:
    """A wait the task started: rate limit, shared gate or initial delay."""

    conn_id: str
    url: str
    seconds: float
    source: str  # rate_limit.WaitSource value
    mode: str  # "reschedule", "defer" or "in_process"
    not_before: datetime
    at: datetime
    task: str  # dag_id.task_id[map_index]


Event = AttemptEvent | WaitEvent
_subscribers: list[Callable[[Event], None]] = []


def subscribe(callback: Callable[[Event], None]) -> Callable[[Event], None]:
    """Register ``callback`` for every event; returns it, so it works as a decorator."""
    if callback not in _subscribers:
        _subscribers.append(callback)
    return callback


def unsubscribe(callback: Callable[[Event], None]) -> None:
    if callback in _subscribers:
        _subscribers.remove(callback)


def emit(event: Event) -> None:
    for callback in list(_subscribers):
        try:
            callback(event)
        except Exception:
            log.warning("network_requests event subscriber %r failed", callback, exc_info=True)
