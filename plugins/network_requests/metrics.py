"""Metrics through Airflow's own ``Stats`` (StatsD, Datadog or OpenTelemetry, as ``[metrics]`` says).

This module is also the plugin's **listener** (Airflow listener hookimpls): when a task
process starts a task, it subscribes :func:`on_event` (and the wait history, see
:mod:`network_requests.wait_history`) to the operator's events, and registers the
sensitive query values of the rendered ``endpoint`` with Airflow's secrets masker. Every attempt and every
wait of a ``NetworkRequestOperator`` then becomes metrics, sent from the task process with
the Task SDK's stats module (``airflow.sdk.observability.stats``): the task runner
initialises it from ``[metrics]`` before the task runs, exactly as for Airflow's own
``ti.start``/``ti.finish``.

Names (each is sent twice: tagged with ``conn_id`` for backends with tags (OpenTelemetry,
Datadog, StatsD with ``statsd_influxdb_enabled``), and with the connection in the name,
``network_requests.conn.<conn_id>.<rest>``, for plain StatsD):

- ``network_requests.requests.<class>`` (counter): every request, ``<class>`` is ``1xx`` …
  ``5xx``, or ``connection_error`` when no answer came;
- ``network_requests.requests.rate_limited`` (counter): a response read as a rate limit
  (429; 503 or 403 with rate-limit headers);
- ``network_requests.request_duration`` (timer): every request that got an answer;
- ``network_requests.rate_limit.waits.<source>`` (counter) and
  ``network_requests.rate_limit.wait_seconds.<source>`` (timer): every rate-limit wait and
  its length, ``<source>`` is ``retry_after``, ``reset_header``, ``backoff`` or ``shared_gate``;
- ``network_requests.gate.guard_hits`` (counter) and ``network_requests.gate.wait_seconds``
  (timer): the shared gate stopped a request before it was sent (the early-request guard),
  and for how long;
- ``network_requests.initial_delays`` (counter): an ``initial_delay`` wait (not a rate limit);
- ``network_requests.gate_update_failed`` (counter): the shared gate could not be read or
  updated (the task went on without it, e.g. after a 2xx); tagged ``operation``.

Tags: ``conn_id`` on all; ``source`` and ``mode`` (``reschedule``/``defer``/``in_process``)
on waits; ``status_class`` on requests; ``operation`` on gate failures. No tag or name
ever holds a URL or an error message (they could carry a secret). A metric that cannot be sent is logged and
dropped: metrics never fail a task.
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import timedelta
from typing import Any

from network_requests import events
from network_requests.endpoints import mask_query_secrets
from network_requests.events import AttemptEvent, Event, GateUpdateFailedEvent, WaitEvent

log = logging.getLogger(__name__)

PREFIX = "network_requests"

#: WaitSource values (see rate_limit.WaitSource) -> the metric's source name.
WAIT_SOURCES = {
    "Retry-After": "retry_after",
    # The structured field's wait is its reset (``t``) of a spent quota.
    "RateLimit": "reset_header",
    "RateLimit-Reset": "reset_header",
    "X-RateLimit-Reset": "reset_header",
    "backoff": "backoff",
    "shared gate": "shared_gate",
}
INITIAL_DELAY = "initial_delay"

_INVALID = re.compile(r"[^A-Za-z0-9_-]")


def stat_safe(value: str) -> str:
    """A connection id as one StatsD name segment: ``.`` and anything unusual become ``_``."""
    return _INVALID.sub("_", value)[:100] or "_"


def status_class(status_code: int | None) -> str:
    if status_code is None:
        return "connection_error"
    if 100 <= status_code <= 599:
        return f"{status_code // 100}xx"
    return "other"


def _stats() -> Any:
    """The Task SDK's stats module (initialised from ``[metrics]`` by the task runner)."""
    from airflow.sdk.observability import stats

    return stats


def _incr(name: str, conn_id: str, tags: dict[str, str]) -> None:
    stats = _stats()
    stats.incr(f"{PREFIX}.{name}", tags={"conn_id": conn_id, **tags})
    stats.incr(f"{PREFIX}.conn.{stat_safe(conn_id)}.{name}")


def _timing(name: str, conn_id: str, seconds: float, tags: dict[str, str]) -> None:
    stats = _stats()
    delta = timedelta(seconds=max(seconds, 0.0))
    stats.timing(f"{PREFIX}.{name}", delta, tags={"conn_id": conn_id, **tags})
    stats.timing(f"{PREFIX}.conn.{stat_safe(conn_id)}.{name}", delta)


def record_attempt(event: AttemptEvent) -> None:
    klass = status_class(event.status_code)
    tags = {"status_class": klass}
    _incr(f"requests.{klass}", event.conn_id, tags)
    if event.outcome == "rate_limited":
        _incr("requests.rate_limited", event.conn_id, tags)
    if event.status_code is not None:
        _timing("request_duration", event.conn_id, event.elapsed_s, tags)


def record_wait(event: WaitEvent) -> None:
    if event.source == INITIAL_DELAY:
        _incr("initial_delays", event.conn_id, {"mode": event.mode})
        return
    source = WAIT_SOURCES.get(event.source, stat_safe(event.source).lower())
    tags = {"source": source, "mode": event.mode}
    _incr(f"rate_limit.waits.{source}", event.conn_id, tags)
    _timing(f"rate_limit.wait_seconds.{source}", event.conn_id, event.seconds, tags)
    if source == "shared_gate":
        # The gate said "not yet" and the request was not sent: the early-request guard.
        _incr("gate.guard_hits", event.conn_id, {"mode": event.mode})
        _timing("gate.wait_seconds", event.conn_id, event.seconds, {"mode": event.mode})


def record_gate_update_failed(event: GateUpdateFailedEvent) -> None:
    # The operation only (a short fixed word): the error text stays in the task log.
    _incr("gate_update_failed", event.conn_id, {"operation": stat_safe(event.operation).lower()})


def on_event(event: Event) -> None:
    """The events subscriber: one event in, its metrics out; never raises."""
    try:
        if isinstance(event, AttemptEvent):
            record_attempt(event)
        elif isinstance(event, WaitEvent):
            record_wait(event)
        elif isinstance(event, GateUpdateFailedEvent):
            record_gate_update_failed(event)
    except Exception:
        log.warning("Could not send network_requests metrics for %r", event, exc_info=True)


_install_lock = threading.Lock()


def install() -> None:
    """Subscribe the metrics and the wait history to the operator's events (idempotent)."""
    from network_requests import wait_history

    with _install_lock:
        events.subscribe(on_event)
        events.subscribe(wait_history.on_event)


def uninstall() -> None:
    from network_requests import wait_history

    with _install_lock:
        events.unsubscribe(on_event)
        events.unsubscribe(wait_history.on_event)


# -- Airflow listener hookimpls -----------------------------------------------------------
# The plugin lists this module in ``listeners``. Airflow calls the hooks in the task
# process (``on_starting`` when a task process starts; ``on_task_instance_running`` also
# under ``dag.test()``, which skips ``on_starting``) and in the scheduler/API server, where
# subscribing is harmless: no operator runs there.

try:
    from airflow.listeners import hookimpl
except ImportError:  # a worker with the Task SDK only
    from pluggy import HookimplMarker

    hookimpl = HookimplMarker("airflow")


@hookimpl
def on_starting(component: Any) -> None:
    install()


@hookimpl
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    install()
    mask_endpoint_secrets(getattr(task_instance, "task", None))


def mask_endpoint_secrets(task: Any) -> None:
    """Register the sensitive query values of a rendered task's ``endpoint`` with Airflow's masker.

    Called once the templates are rendered, before ``execute``: from then on Airflow masks
    them in every line of the task log, the HTTP client's own debug lines included.
    """
    endpoint = getattr(task, "endpoint", None)
    if not isinstance(endpoint, str):
        return
    try:
        mask_query_secrets(endpoint)
    except Exception:
        log.warning("Could not register the endpoint's query secrets with Airflow's masker", exc_info=True)
