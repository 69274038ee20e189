"""The recent rate-limit waits of each connection, for the "Rate limits" page.

The events subscriber :func:`on_event` appends every rate-limit wait (shared-gate waits
included, initial delays not) to a ring buffer kept in the Airflow Variable
``network_requests.waits.<conn_id>``: a JSON list of the last :data:`MAX_WAITS` waits,
oldest first, written from the task process through the Task SDK (``airflow.sdk.Variable``).

Every URL goes through ``redact_url`` when it is stored and again when it is read (the
operator already redacts it; an entry written by an older version is shown safely too).

Observing never changes the outcome: a failing read or write is logged and the task goes
on. The read-modify-write is serialised between processes of one host by a file lock; two
hosts appending at the very same moment may lose one entry, which only thins the chart.
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import datetime
from typing import Any

from network_requests.endpoints import redact_url
from network_requests.events import Event, WaitEvent
from network_requests.gate_store import fresh_variable, host_lock, variable_suffix

log = logging.getLogger(__name__)

VARIABLE_PREFIX = "network_requests.waits."
MAX_WAITS = 200
#: Wait sources that are not rate limits.
NOT_RATE_LIMITS = frozenset({"initial_delay"})
_FIELDS = ("at", "until", "seconds", "source", "mode", "task", "url")


def variable_key(conn_id: str) -> str:
    """The Variable holding the recent waits of ``conn_id`` (same naming as the gate's)."""
    return VARIABLE_PREFIX + variable_suffix(conn_id)


def entry_of(event: WaitEvent) -> dict[str, Any]:
    return {
        "at": _epoch(event.at),
        "until": _epoch(event.not_before),
        "seconds": round(float(event.seconds), 3),
        "source": str(event.source),
        "mode": str(event.mode),
        "task": str(event.task)[:250],
        "url": redact_url(str(event.url))[:500],
    }


def _epoch(moment: datetime) -> float:
    return round(moment.timestamp(), 3)


def parse(raw: str | None) -> list[dict[str, Any]]:
    """The stored waits; anything unreadable is skipped (never an error)."""
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    waits = []
    for item in data:
        if not isinstance(item, dict):
            continue
        try:
            wait = {
                "at": float(item["at"]),
                "until": float(item["until"]),
                "seconds": float(item.get("seconds") or 0.0),
                "source": str(item.get("source") or ""),
                "mode": str(item.get("mode") or ""),
                "task": str(item.get("task") or ""),
                # Again on the way out: an entry stored by an older version is shown safely too.
                "url": redact_url(str(item.get("url") or "")),
            }
        except (KeyError, TypeError, ValueError):
            continue
        waits.append(wait)
    return waits


def appended(raw: str | None, entry: dict[str, Any], limit: int = MAX_WAITS) -> str:
    """The stored value with ``entry`` added, keeping the newest ``limit`` waits."""
    waits = [*parse(raw), {key: entry[key] for key in _FIELDS}]
    waits.sort(key=lambda wait: wait["at"])
    return json.dumps(waits[-limit:], separators=(",", ":"))


def _host_lock(key: str) -> contextlib.AbstractContextManager[None]:
    return host_lock(key, "waits")


def _read_variable(key: str) -> str | None:
    return fresh_variable(key)


def record(event: WaitEvent) -> None:
    """Append ``event`` to its connection's ring buffer (raises on failure; see :func:`on_event`)."""
    from airflow.sdk import Variable

    key = variable_key(event.conn_id)
    with _host_lock(key):
        value = appended(_read_variable(key), entry_of(event))
        Variable.set(key, value, description=f"Last {MAX_WAITS} rate-limit waits (network_requests plugin)")


def on_event(event: Event) -> None:
    """The events subscriber: store rate-limit waits; never raises, never fails the task."""
    if not isinstance(event, WaitEvent) or event.source in NOT_RATE_LIMITS:
        return
    try:
        record(event)
    except Exception:
        log.warning("Could not store the rate-limit wait of %s in the wait history", event.conn_id, exc_info=True)
