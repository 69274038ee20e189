"""Where the shared gate lives: an Airflow Variable per connection, seen by every worker.

The state is read and written through the Task SDK (``airflow.sdk.Variable``), so it works
the same on the LocalExecutor, on Celery workers on other hosts, and under ``dag.test()``,
with no extra service. Each change is a read-modify-write:

- on one host, a file lock serialises it between the worker processes (the LocalExecutor
  and each Celery host are fully safe);
- across hosts, the writer reads the Variable back and redoes its change when another
  writer got in between. A write that still slips past only hands two tasks the same send
  time, and the server's answer re-closes the gate: ``blocked_until`` only ever moves later,
  so no write can let a task send before a time the server asked for.

The state forgets itself (see ``gate.STATE_TTL_SECONDS``); ``clear`` removes it by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from network_requests.gate import GateState

log = logging.getLogger(__name__)

T = TypeVar("T")

VARIABLE_PREFIX = "network_requests.gate."
_VERIFY_ATTEMPTS = 3


def variable_key(conn_id: str) -> str:
    """The Variable holding the gate of ``conn_id`` (shown in Admin → Variables)."""
    return VARIABLE_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", conn_id)


class GateStore(Protocol):
    def update(self, conn_id: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        """Apply ``change`` to the stored state atomically and return its result."""

    def read(self, conn_id: str) -> GateState: ...


class MemoryGateStore:
    """A store in this process only: for tests and for a single-process runner."""

    def __init__(self) -> None:
        self._states: dict[str, str] = {}
        self._lock = threading.Lock()

    def read(self, conn_id: str) -> GateState:
        return GateState.from_json(self._states.get(conn_id))

    def update(self, conn_id: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        with self._lock:
            result, new_state = change(self.read(conn_id))
            self._states[conn_id] = new_state.to_json()
            return result


@contextlib.contextmanager
def host_lock(name: str, kind: str = "gate") -> Iterator[None]:
    """Serialise a read-modify-write of ``name`` between the processes of this host."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"network-requests-{kind}-{digest}.lock")
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _host_lock(conn_id: str) -> contextlib.AbstractContextManager[None]:
    return host_lock(conn_id, "gate")


def fresh_variable(key: str) -> str | None:
    """The Variable's current value, past Airflow's optional secrets cache ([secrets] use_cache)."""
    from airflow.sdk import Variable

    try:
        from airflow.sdk.execution_time.cache import SecretCache

        SecretCache.invalidate_variable(key)
    except Exception:  # the cache is an optimisation; an old SDK without it is fine
        pass
    return Variable.get(key, default=None)


class VariableGateStore:
    """The gate in an Airflow Variable, read and written through the Task SDK."""

    def read(self, conn_id: str) -> GateState:
        return GateState.from_json(fresh_variable(variable_key(conn_id)))

    def update(self, conn_id: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        from airflow.sdk import Variable

        key = variable_key(conn_id)
        with _host_lock(conn_id):
            raw = fresh_variable(key)
            for _ in range(_VERIFY_ATTEMPTS):
                result, new_state = change(GateState.from_json(raw))
                written = new_state.to_json()
                if written == raw:
                    return result
                Variable.set(key, written, description="Shared rate-limit gate of NetworkRequestOperator")
                raw = fresh_variable(key)
                if raw == written:
                    return result
                log.info("Shared gate %s changed by another worker while updating; redoing the change", key)
            return result

    def clear(self, conn_id: str) -> None:
        from airflow.sdk import Variable

        Variable.delete(variable_key(conn_id))
