"""What happened on each attempt, for whoever wants to know (metrics, the UI timeline).

The operator and the trigger call :func:`emit` once per attempt, once per wait and
whenever the shared gate could not be read or updated; subscribers registered
with :func:`subscribe` turn the events into metrics or stored history. A failing
subscriber is logged and never fails the task: observing must not change the outcome.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from network_requests.endpoints import redact_url

log = logging.getLogger(__name__)

#: ``GateUpdateFailedEvent.error`` is at most this long: a reason, not a traceback.
MAX_ERROR_CHARS = 300
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


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


@dataclass(frozen=True)
class GateUpdateFailedEvent:
    """The shared gate could not be read or updated; the task went on (e.g. after a 2xx).

    ``error`` is short (exception type and message, cut to :data:`MAX_ERROR_CHARS`) with
    any URL in it redacted: build it with :func:`describe_error`.
    """

    conn_id: str
    operation: str  # what was being done: "observe", "admit", "release_probe", "read", ...
    error: str
    at: datetime


Event = AttemptEvent | WaitEvent | GateUpdateFailedEvent
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


def describe_error(error: BaseException) -> str:
    """``"TypeName: message"``, short, with every URL in the message made safe by ``redact_url``.

    A store or client error may quote the URL it was talking to (a Redis URL with a
    password, an API URL with a key in its query): that must not reach a log or a metric.
    """
    message = _URL.sub(lambda match: redact_url(match.group(0)), str(error))
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
