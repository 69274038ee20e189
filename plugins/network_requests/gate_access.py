"""Asking and telling the shared gate from a task, failing safe: the effects around the pure gate.

- Which gate, and which declared limits: :func:`gate_settings` (the task's ``gate_key`` and
  ``rate_limit`` arguments, else its Connection's ``extra``; see
  :mod:`network_requests.configured_limits`). A task checks them when it starts
  (:func:`check_gate_settings`): a bad one fails it with a message naming the field.
- Before sending, :meth:`SharedGate.ask` returns the gate's answer; a store that cannot be
  read is :class:`~network_requests.engine.GateUnreadable`, which the engine turns into a
  short wait: never an open gate.
- After an answer, :meth:`SharedGate.tell` records what the server said. A store that
  cannot be written is logged and emitted as a ``GateUpdateFailedEvent``, and the task goes
  on: after a 2xx the response is returned, so a POST is not sent again for the gate's sake.

Every driver (the operator, the sensor, their triggers, the batch runner) builds its gate
here (:func:`task_gate`, :func:`spec_gate`) and uses it the same way (the triggers in a
thread: the stores are synchronous).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.sdk.exceptions import AirflowFailException

from network_requests import events
from network_requests.configured_limits import (ConfiguredLimit, GateKey, describe_limits, limits_from_extra,
                                                parse_limits, resolve_gate_key)
from network_requests.engine import GateAnswer, GateUnreadable, Step, WaitBudget, WaitRules, next_step
from network_requests.gate import Admission, GateState, admit, for_origin, observe, release_probe
from network_requests.gate_store import GateStore
from network_requests.rate_limit_headers import RateLimitInfo

if TYPE_CHECKING:
    from network_requests.request_spec import RequestSpec

log = logging.getLogger(__name__)

#: A clock in UTC (``batch_runner``'s ``_utcnow``, say).
WallClock = Callable[[], datetime]


def default_gate_store() -> GateStore:
    """The store ``[network_requests] gate_store`` selects (the Variable store by default)."""
    try:
        from network_requests.gate_store import gate_store_from_config
    except ImportError:  # a gate_store module without the setting: the Variable store
        from network_requests.gate_store import VariableGateStore

        return VariableGateStore()
    return gate_store_from_config()


def origin_of(base_url: str) -> str:
    """``scheme://host:port`` of a Connection's base URL, without user info: the API a gate is about."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


# -- which gate, which limits -------------------------------------------------------------------


class GateSettingsError(AirflowFailException):
    """A ``rate_limit`` or ``gate_key`` that cannot be used: the task fails without a retry
    (the same settings would fail again); the message names the field and where it was set."""


def gate_settings(
    conn_id: str, *, rate_limit: Any = None, gate_key: Any = None, conn_extra: Mapping[str, Any] | str | None = None
) -> tuple[GateKey, tuple[ConfiguredLimit, ...]]:
    """The gate a request to ``conn_id`` counts against, and the limits declared for it.

    ``rate_limit`` is the task's argument (rendered): when given it replaces the
    Connection's ``extra["rate_limit"]`` (``[]`` declares none); an empty text counts as not
    given, as a template rendering to nothing does. Raises :class:`GateSettingsError`.
    """
    try:
        key = resolve_gate_key(conn_id, gate_key)
    except ValueError as error:
        raise GateSettingsError(f"The task's {error}") from None
    if rate_limit is not None and not (isinstance(rate_limit, str) and not rate_limit.strip()):
        try:
            return key, parse_limits(rate_limit)
        except ValueError as error:
            raise GateSettingsError(f"The task's rate_limit argument cannot be used: {error}") from None
    try:
        return key, limits_from_extra(conn_extra)
    except ValueError as error:
        raise GateSettingsError(f"The extra of Connection {conn_id!r} cannot be used: {error}") from None


def connection_extra(conn_id: str) -> dict[str, Any]:
    """The Connection's ``extra``, as a dict (blocking: it reads the Connection)."""
    from network_requests.hooks import NetworkRequestHook

    extra = NetworkRequestHook.get_connection(conn_id).extra_dejson
    return extra if isinstance(extra, dict) else {}


def check_gate_settings(task: Any) -> tuple[GateKey, tuple[ConfiguredLimit, ...]]:
    """A task's gate settings (``http_conn_id``, ``rate_limit``, ``gate_key``), checked when it
    starts, before any wait; limits that no gate will enforce are logged."""
    key, limits = gate_settings(task.http_conn_id, rate_limit=getattr(task, "rate_limit", None),
                                gate_key=getattr(task, "gate_key", None), conn_extra=connection_extra(task.http_conn_id))
    if limits and not task.shared_gate:
        task.log.warning("Rate limits declared (%s) are not enforced: shared_gate is off", describe_limits(limits))
    return key, limits


def task_gate(task: Any, *, base_url: str, cheap_looks: bool) -> SharedGate | None:
    """The shared gate of a task on a worker (an operator or a sensor, which name their
    Connection, settings and ``gate_store``), or ``None`` with ``shared_gate`` off."""
    if not task.shared_gate:
        return None
    key, limits = check_gate_settings(task)
    return SharedGate(task.gate_store, task.http_conn_id, origin_of(base_url), key=key, limits=limits,
                      cheap_looks=cheap_looks, reports_answers=True)


def spec_gate(store: GateStore, spec: RequestSpec, *, base_url: str) -> SharedGate | None:
    """The shared gate of a described request, in the triggerer or a batch (blocking: it reads
    the Connection again, whose declared limits may have changed since the task started).
    It waits where it runs, so it may look again at any moment."""
    if not spec.shared_gate:
        return None
    key, limits = gate_settings(spec.conn_id, rate_limit=spec.rate_limit, gate_key=spec.gate_key,
                                conn_extra=connection_extra(spec.conn_id))
    return SharedGate(store, spec.conn_id, origin_of(base_url), key=key, limits=limits, cheap_looks=True,
                      reports_answers=True)


# -- asking and telling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedGate:
    """The gate of one quota in ``store``: by default the Connection's API, else the one ``key`` names."""

    store: GateStore
    #: The Connection the requests go to (for the log and events).
    conn_id: str
    #: The API the Connection points at (``scheme://host:port``).
    origin: str
    #: The stored gate (``configured_limits.resolve_gate_key``); ``None``: the Connection's own.
    key: GateKey | None = None
    #: Limits declared for this quota, enforced on top of what the server says.
    limits: tuple[ConfiguredLimit, ...] = ()
    #: Looking again costs the task no worker launch (it waits in the triggerer): ``gate.admit``.
    cheap_looks: bool = False
    #: Every request let out is followed by :meth:`tell` or :meth:`release` (``gate.admit``).
    reports_answers: bool = False

    @property
    def gate_key(self) -> GateKey:
        return self.key or GateKey(self.conn_id, checks_origin=True)

    def _ours(self, state: GateState) -> GateState:
        return for_origin(state, self.origin, checks_origin=self.gate_key.checks_origin)

    def ask(
        self, ticket: str, *, now: datetime, in_process_up_to: float, min_wait: float
    ) -> GateAnswer | GateUnreadable:
        """May ``ticket`` send now? The gate's answer, or why it could not be asked."""
        return self._ask(ticket, now=now, in_process_up_to=in_process_up_to, min_wait=min_wait)[0]

    def _ask(
        self, ticket: str, *, now: datetime | WallClock, in_process_up_to: float, min_wait: float
    ) -> tuple[GateAnswer | GateUnreadable, datetime]:
        """:meth:`ask`, and the time it was decided at: ``now``, or when given a clock, the
        clock read as the store applies the change (a group commit may apply it later)."""
        decided = [now if isinstance(now, datetime) else now()]

        def change(state: GateState) -> tuple[Admission, GateState]:
            if not isinstance(now, datetime):
                decided[0] = now()
            admission = admit(self._ours(state), ticket, now=decided[0].timestamp(), in_process_up_to=in_process_up_to,
                              min_wait=min_wait, limits=self.limits, reports_answers=self.reports_answers,
                              cheap_looks=self.cheap_looks)
            return admission, admission.state

        try:
            admission = self.store.update(self.gate_key.name, change)
        except Exception as error:
            return GateUnreadable(self._failed("admit", error, decided[0])), decided[0]
        if admission.wait_seconds(decided[0].timestamp()) <= 0:
            return GateAnswer(), decided[0]
        return GateAnswer(datetime.fromtimestamp(admission.send_at, timezone.utc), admission.reason), decided[0]

    def admission_step(self, ticket: str, budget: WaitBudget, rules: WaitRules, *, now: datetime | WallClock,
                       rand: Callable[[], float]) -> Step:
        """The engine's step on the gate's answer (told when the task can really be back): send
        or wait. ``now`` may be a clock, read when the store applies the change."""
        up_to, min_wait = rules.gate_hints(budget)
        answer, decided_at = self._ask(ticket, now=now, in_process_up_to=up_to, min_wait=min_wait)
        return next_step(answer, budget, rules, now=decided_at, rand=rand)

    def tell(self, info: RateLimitInfo, *, now: datetime, rate_limited_until: datetime | None, ticket: str) -> bool:
        """Record what a response said; ``False`` (logged, event emitted) when the store failed."""
        at = now.timestamp()
        until = rate_limited_until.timestamp() if rate_limited_until else None

        def change(state: GateState) -> tuple[None, GateState]:
            return None, observe(self._ours(state), info, now=at, rate_limited_until=until, ticket=ticket)

        try:
            self.store.update(self.gate_key.name, change)
        except Exception as error:
            self._failed("observe", error, now)
            return False
        return True

    def release(self, ticket: str, *, now: datetime) -> None:
        """A request got no answer: it is no longer out (and a first-contact probe is over).
        It may have reached the server, so the declared limits count it as answered now."""
        at = now.timestamp()
        try:
            self.store.update(self.gate_key.name, lambda state: (None, release_probe(self._ours(state), ticket, now=at)))
        except Exception as error:  # the request's own error is what the user must see
            self._failed("release_probe", error, now)

    def _failed(self, operation: str, error: BaseException, now: datetime) -> str:
        described = events.describe_error(error)
        shown = self.conn_id if self.gate_key.checks_origin else f"{self.gate_key.name} ({self.conn_id})"
        log.warning("The shared gate of %s could not be updated (%s): %s", shown, operation, described)
        events.emit(events.GateUpdateFailedEvent(self.conn_id, operation, described, now))
        return described
