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

A change may also *follow* (:meth:`CoalescingGateStore.following`): it waits, for a bounded
time, to be applied by the next update someone else makes, after that update's own changes.
A request of the batch waiting for the answer to one of the batch's requests out asks that
way, so its admission is applied in the same update as that answer, not one update later:
while pacing with the quota spent (the gate's wait-for-the-answer rule) that halves the
store updates between two requests.

All store calls are made holding ``sdk_lock``, which the batch also holds around its other
Task SDK calls: the SDK takes one call at a time anyway, and ``dag.test()``'s in-process
comms are not thread-safe at all.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from network_requests.gate import GateState
from network_requests.gate_store import GateStore

T = TypeVar("T")


class _Pending:
    """One caller's change, waiting for an update to apply it."""

    def __init__(self, key: str, change: Callable[[GateState], tuple[Any, GateState]], follows: bool) -> None:
        self.key, self.change, self.follows = key, change, follows
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
        self._applied = threading.Condition(self._queue_lock)
        self._leader = threading.Lock()
        self._following = threading.local()
        #: Updates of ``inner`` made, and changes they applied (for the log and the tests).
        self.updates = 0
        self.changes = 0

    def read(self, key: str) -> GateState:
        with self._sdk_lock:
            return self.inner.read(key)

    @contextlib.contextmanager
    def following(self, seconds: float) -> Iterator[None]:
        """This thread's updates inside the block wait up to ``seconds`` to be applied by
        someone else's next update, after its own changes; then they make their own."""
        self._following.seconds = seconds
        try:
            yield
        finally:
            self._following.seconds = None

    def update(self, key: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        follow_for = getattr(self._following, "seconds", None)
        pending = _Pending(key, change, follows=follow_for is not None)
        with self._queue_lock:
            self._queue.append(pending)
            if follow_for is not None:
                self._applied.wait_for(lambda: pending.done, timeout=follow_for)
        if not pending.done:  # (a follower applied by someone else's update needs nothing more)
            with self._leader:  # whoever holds it applies everything queued for its key
                if not pending.done:
                    with self._queue_lock:
                        mine = [queued for queued in self._queue if queued.key == key]
                        self._queue = [queued for queued in self._queue if queued.key != key]
                    # Followers last: they wait for what the others tell the gate.
                    self._apply(key, [queued for queued in mine if not queued.follows]
                                + [queued for queued in mine if queued.follows])
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
        with self._applied:
            for pending, (applied, value) in zip(group, outcomes):
                pending.result, pending.error = (value, None) if applied else (None, value)
                pending.done = True
            self._applied.notify_all()
