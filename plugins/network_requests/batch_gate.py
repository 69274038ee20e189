"""The batch's way to the shared gate: concurrent changes applied in one store update (group commit).

Every request of a batch asks the gate before it is sent and tells it what the answer said
afterwards: two store updates per request, and each update of the Variable store is three
Task SDK calls (read, write, read back), the CPU-heaviest part of a batch in the triggerer.
:class:`CoalescingGateStore` wraps the configured store: while one update is running, the
changes other requests of the batch hand in queue up, and the next update applies all of
them, in the order they came, to one read of the state (each change is pure, as every store
requires). Every caller gets its own result (or its own exception), exactly as if its change
had been applied alone just after the ones before it. The busier the gate, the more changes
share an update, so the store keeps up with the batch instead of setting its pace.

All store calls are made holding ``sdk_lock``, which the batch also holds around its other
Task SDK calls: the SDK takes one call at a time anyway, and ``dag.test()``'s in-process
comms are not thread-safe at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from network_requests.gate import GateState
from network_requests.gate_store import GateStore

T = TypeVar("T")


class _Pending:
    """One caller's change, waiting for an update to apply it."""

    def __init__(self, key: str, change: Callable[[GateState], tuple[Any, GateState]]) -> None:
        self.key, self.change = key, change
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class CoalescingGateStore:
    """A :class:`~network_requests.gate_store.GateStore` that applies concurrent changes in one update of ``inner``."""

    def __init__(self, inner: GateStore, sdk_lock: threading.Lock) -> None:
        self.inner = inner
        self._sdk_lock = sdk_lock
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._leader = threading.Lock()
        #: Updates of ``inner`` made, and changes they applied (for the log and the tests).
        self.updates = 0
        self.changes = 0

    def read(self, key: str) -> GateState:
        with self._sdk_lock:
            return self.inner.read(key)

    def update(self, key: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        pending = _Pending(key, change)
        with self._queue_lock:
            self._queue.append(pending)
        with self._leader:  # whoever holds it applies everything queued for its key
            if not pending.done:
                with self._queue_lock:
                    group = [queued for queued in self._queue if queued.key == key]
                    self._queue = [queued for queued in self._queue if queued.key != key]
                self._apply(key, group)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _apply(self, key: str, group: list[_Pending]) -> None:
        def composed(state: GateState) -> tuple[list[tuple[bool, Any]], GateState]:
            outcomes: list[tuple[bool, Any]] = []
            for pending in group:
                try:
                    result, state = pending.change(state)
                except Exception as error:  # that change is not applied; the others are
                    outcomes.append((False, error))
                else:
                    outcomes.append((True, result))
            return outcomes, state

        try:
            with self._sdk_lock:
                outcomes = self.inner.update(key, composed)
        except Exception as error:  # nothing was stored: every change of the group failed with it
            outcomes = [(False, error)] * len(group)
        self.updates += 1
        self.changes += len(group)
        for pending, (applied, value) in zip(group, outcomes):
            pending.result, pending.error = (value, None) if applied else (None, value)
            pending.done = True
