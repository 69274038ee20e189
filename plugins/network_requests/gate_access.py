"""Asking and telling the shared gate from a task, failing safe: the effects around the pure gate.

- Before sending, :meth:`SharedGate.ask` returns the gate's answer; a store that cannot be
  read is :class:`~network_requests.engine.GateUnreadable`, which the engine turns into a
  short wait: never an open gate.
- After an answer, :meth:`SharedGate.tell` records what the server said. A store that
  cannot be written is logged and emitted as a ``GateUpdateFailedEvent``, and the task goes
  on: after a 2xx the response is returned, so a POST is not sent again for the gate's sake.

Both drivers use it (the trigger in a thread: the stores are synchronous).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

from network_requests import events
from network_requests.engine import GateAnswer, GateUnreadable, Step, WaitBudget, WaitRules, next_step
from network_requests.gate import Admission, GateState, admit, for_origin, observe, release_probe
from network_requests.gate_store import GateStore
from network_requests.rate_limit_headers import RateLimitInfo

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class SharedGate:
    """The gate of one Connection's API, in ``store``."""

    store: GateStore
    conn_id: str
    origin: str

    def ask(
        self, ticket: str, *, now: datetime, in_process_up_to: float, min_wait: float
    ) -> GateAnswer | GateUnreadable:
        """May ``ticket`` send now? The gate's answer, or why it could not be asked."""
        at = now.timestamp()

        def change(state: GateState) -> tuple[Admission, GateState]:
            admission = admit(for_origin(state, self.origin), ticket, now=at, in_process_up_to=in_process_up_to,
                              min_wait=min_wait)
            return admission, admission.state

        try:
            admission = self.store.update(self.conn_id, change)
        except Exception as error:
            return GateUnreadable(self._failed("admit", error, now))
        if admission.wait_seconds(at) <= 0:
            return GateAnswer()
        return GateAnswer(datetime.fromtimestamp(admission.send_at, timezone.utc), admission.reason)

    def admission_step(self, ticket: str, budget: WaitBudget, rules: WaitRules, *, now: datetime,
                       rand: Callable[[], float]) -> Step:
        """The engine's step on the gate's answer (told when the task can really be back): send or wait."""
        up_to, min_wait = rules.gate_hints(budget)
        return next_step(self.ask(ticket, now=now, in_process_up_to=up_to, min_wait=min_wait), budget, rules,
                         now=now, rand=rand)

    def tell(self, info: RateLimitInfo, *, now: datetime, rate_limited_until: datetime | None, ticket: str) -> bool:
        """Record what a response said; ``False`` (logged, event emitted) when the store failed."""
        at = now.timestamp()
        until = rate_limited_until.timestamp() if rate_limited_until else None

        def change(state: GateState) -> tuple[None, GateState]:
            return None, observe(for_origin(state, self.origin), info, now=at, rate_limited_until=until, ticket=ticket)

        try:
            self.store.update(self.conn_id, change)
        except Exception as error:
            self._failed("observe", error, now)
            return False
        return True

    def release(self, ticket: str, *, now: datetime) -> None:
        """A request got no answer: it is no longer out (and a first-contact probe is over)."""
        try:
            self.store.update(self.conn_id, lambda state: (None, release_probe(for_origin(state, self.origin), ticket)))
        except Exception as error:  # the request's own error is what the user must see
            self._failed("release_probe", error, now)

    def _failed(self, operation: str, error: BaseException, now: datetime) -> str:
        described = events.describe_error(error)
        log.warning("The shared gate of %s could not be updated (%s): %s", self.conn_id, operation, described)
        events.emit(events.GateUpdateFailedEvent(self.conn_id, operation, described, now))
        return described
