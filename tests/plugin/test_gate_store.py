"""Where the shared gate lives (network_requests.gate_store): atomic updates, verify-and-redo, the host lock.

``VariableGateStore`` reads and writes through the Task SDK, which only answers inside a
running task; here ``airflow.sdk.Variable`` is replaced by a dict (or, across processes, by
a JSON file), so the read-modify-write logic itself is what is tested.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import airflow.sdk
import pytest

from network_requests import gate_store
from network_requests.gate import GateState, admit, observe
from network_requests.gate_store import MemoryGateStore, VariableGateStore, variable_key

NOW = 1_700_000_000.0
ORIGIN = "https://api.example.com:443"
#: A gate closed until NOW + 10 whose API allows one request per INTERVAL: every task
#: admitted at NOW is given its own send time.
INTERVAL = 0.5


def paced_blocked_state() -> GateState:
    return GateState(blocked_until=NOW + 10, remaining=0, interval=INTERVAL, updated_at=NOW, origin=ORIGIN)


def admit_change(ticket: str, now: float = NOW):
    def change(state: GateState):
        admission = admit(state, ticket, now=now)
        return admission, admission.state

    return change


# -- MemoryGateStore -------------------------------------------------------------------------


class TestMemoryGateStore:
    def test_an_unknown_connection_reads_as_a_fresh_gate(self):
        assert MemoryGateStore().read("api") == GateState()

    def test_update_stores_the_new_state_and_returns_the_changes_result(self):
        store = MemoryGateStore()
        admission = store.update("api", lambda state: ("result", replace_blocked(state, NOW + 5)))
        assert admission == "result"
        assert store.read("api").blocked_until == NOW + 5
        assert store.read("other").blocked_until == 0.0

    def test_eight_threads_admitting_200_tickets_each_lose_no_update(self):
        # Each task is admitted at a blocked, paced gate (a send time of its own), then comes
        # back at that time and is let through (its ticket released, which keeps the stored
        # state small). A lost update would hand two tasks the same time.
        store = MemoryGateStore()
        store.update("api", lambda _: (None, paced_blocked_state()))
        threads, per_thread = 8, 200
        barrier = threading.Barrier(threads)
        results: dict[str, float] = {}
        results_lock = threading.Lock()
        errors: list[BaseException] = []

        def change_for(ticket: str, now: float):
            def change(state: GateState):
                admission = admit(state, ticket, now=now)
                time.sleep(0)  # invite a thread switch inside the read-modify-write
                return admission, admission.state

            return change

        def worker(index: int) -> None:
            try:
                barrier.wait()
                for i in range(per_thread):
                    ticket = f"dag|run|t{index}|{i}"
                    admission = store.update("api", change_for(ticket, NOW))
                    with results_lock:
                        results[ticket] = admission.send_at
                    back = store.update("api", change_for(ticket, admission.send_at))
                    assert (back.send_at, back.reason) == (admission.send_at, None)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        pool = [threading.Thread(target=worker, args=(index,)) for index in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=60)
        assert not errors
        total = threads * per_thread
        assert len(results) == total
        # Every admission got its own slot, and together they are exactly the paced schedule.
        assert sorted(results.values()) == [NOW + 10 + k * INTERVAL for k in range(total)]
        final = store.read("api")
        assert final.tickets == {}
        assert final.next_slot == NOW + 10 + total * INTERVAL


def replace_blocked(state: GateState, until: float) -> GateState:
    return observe(state, {}, now=NOW, rate_limited_until=until)


# -- VariableGateStore with a dict for airflow.sdk.Variable ----------------------------------


class DictVariable:
    """``airflow.sdk.Variable`` as a dict; ``after_set`` lets a test play another writer."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.sets: list[tuple[str, str, str | None]] = []
        self.gets = 0
        self.after_set = None

    def get(self, key: str, default=None):
        self.gets += 1
        return self.values.get(key, default)

    def set(self, key: str, value: str, description: str | None = None, serialize_json: bool = False) -> None:
        self.values[key] = value
        self.sets.append((key, value, description))
        if self.after_set is not None:
            self.after_set(key, value)

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


@pytest.fixture
def variables(monkeypatch, tmp_path) -> DictVariable:
    fake = DictVariable()
    monkeypatch.setattr(airflow.sdk, "Variable", fake)
    # The host lock file goes to tempfile.gettempdir(): keep it in this test's directory.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return fake


class TestVariableGateStore:
    def test_the_variable_key_is_named_after_the_connection_and_safe(self):
        assert variable_key("my_api") == "network_requests.gate.my_api"
        assert variable_key("my api/v2:é") == "network_requests.gate.my_api_v2__"

    def test_a_missing_or_unreadable_variable_reads_as_a_fresh_gate(self, variables):
        store = VariableGateStore()
        assert store.read("api") == GateState()
        variables.values[variable_key("api")] = "{not json"
        assert store.read("api") == GateState()

    def test_update_writes_the_new_state_and_returns_the_changes_result(self, variables):
        variables.values[variable_key("api")] = paced_blocked_state().to_json()
        admission = VariableGateStore().update("api", admit_change("a"))
        assert admission.send_at == NOW + 10
        stored = GateState.from_json(variables.values[variable_key("api")])
        assert stored == admission.state
        assert len(variables.sets) == 1
        assert variables.sets[0][2]  # a description for Admin -> Variables

    def test_an_unreadable_variable_is_overwritten_with_a_good_state(self, variables):
        variables.values[variable_key("api")] = "garbage"
        VariableGateStore().update("api", admit_change("a"))
        assert GateState.from_json(variables.values[variable_key("api")]) != GateState()
        assert json.loads(variables.values[variable_key("api")])["tickets"] == {}

    def test_a_change_that_changes_nothing_writes_nothing(self, variables):
        store = VariableGateStore()
        variables.values[variable_key("api")] = paced_blocked_state().to_json()
        store.update("api", admit_change("a"))
        writes = len(variables.sets)
        # The ticket holder coming back early is told the same time: nothing to store.
        again = store.update("api", admit_change("a", now=NOW + 1))
        assert again.send_at == NOW + 10
        assert len(variables.sets) == writes

    def test_every_read_bypasses_the_secrets_cache(self, variables, monkeypatch):
        from airflow.sdk.execution_time.cache import SecretCache

        invalidated: list[str] = []
        monkeypatch.setattr(SecretCache, "invalidate_variable", classmethod(lambda cls, key: invalidated.append(key)))
        VariableGateStore().update("api", admit_change("a"))
        # One read before the change, one to verify the write.
        assert invalidated == [variable_key("api")] * 2

    def test_a_broken_secrets_cache_does_not_stop_the_gate(self, variables, monkeypatch):
        from airflow.sdk.execution_time.cache import SecretCache

        def broken(cls, key):
            raise RuntimeError("no cache here")

        monkeypatch.setattr(SecretCache, "invalidate_variable", classmethod(broken))
        assert VariableGateStore().update("api", admit_change("a")).send_at == NOW

    def test_a_concurrent_writer_between_set_and_get_back_gets_the_change_redone_on_its_state(
        self, variables, caplog
    ):
        key = variable_key("api")
        initial = paced_blocked_state()
        variables.values[key] = initial.to_json()
        theirs = admit(initial, "theirs", now=NOW)

        def other_writer(key_written: str, value: str) -> None:
            # Another worker, which read the state before our write, writes its own change
            # right after ours: our admission is lost from the Variable.
            variables.after_set = None
            variables.values[key_written] = theirs.state.to_json()

        variables.after_set = other_writer
        with caplog.at_level(logging.INFO, logger=gate_store.__name__):
            ours = VariableGateStore().update("api", admit_change("ours"))
        assert "redoing the change" in caplog.text
        assert theirs.send_at == NOW + 10
        assert ours.send_at == NOW + 10 + INTERVAL  # redone on their state: the next slot, not theirs
        stored = GateState.from_json(variables.values[key])
        assert stored.tickets == {"theirs": NOW + 10, "ours": NOW + 10 + INTERVAL}
        assert stored == ours.state
        assert len(variables.sets) == 2

    def test_a_redo_cannot_lower_a_block_another_writer_stored(self, variables):
        key = variable_key("api")
        variables.values[key] = GateState(origin=ORIGIN).to_json()
        blocked = observe(GateState(origin=ORIGIN), {}, now=NOW, rate_limited_until=NOW + 100)

        def other_writer(key_written: str, value: str) -> None:
            variables.after_set = None
            variables.values[key_written] = blocked.to_json()  # a 429 seen by another worker

        variables.after_set = other_writer
        VariableGateStore().update(
            "api", lambda state: (None, observe(state, {}, now=NOW, rate_limited_until=NOW + 5))
        )
        assert GateState.from_json(variables.values[key]).blocked_until == NOW + 100

    def test_a_writer_that_keeps_interfering_makes_update_give_up_after_a_bounded_number_of_tries(
        self, variables
    ):
        key = variable_key("api")
        variables.values[key] = paced_blocked_state().to_json()
        interfering = GateState(blocked_until=NOW + 60, origin=ORIGIN, updated_at=NOW)
        variables.after_set = lambda key_written, value: variables.values.__setitem__(
            key_written, interfering.to_json()
        )
        admission = VariableGateStore().update("api", admit_change("a"))
        assert len(variables.sets) == gate_store._VERIFY_ATTEMPTS
        # The last try was computed on the other writer's state, so it honours its block.
        assert admission.send_at == NOW + 60

    def test_clear_deletes_the_variable(self, variables):
        variables.values[variable_key("api")] = paced_blocked_state().to_json()
        VariableGateStore().clear("api")
        assert variable_key("api") not in variables.values


# -- VariableGateStore across processes: the host file lock ----------------------------------


class FileVariable:
    """``airflow.sdk.Variable`` kept in a JSON file shared by processes (no locking of its own)."""

    def __init__(self, path: str, sets_log: str) -> None:
        self.path, self.sets_log = path, sets_log

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(Path(self.path).read_text())
        except FileNotFoundError:
            return {}

    def get(self, key: str, default=None):
        return self._load().get(key, default)

    def set(self, key: str, value: str, description: str | None = None, serialize_json: bool = False) -> None:
        values = self._load()
        values[key] = value
        temporary = f"{self.path}.{os.getpid()}.tmp"
        Path(temporary).write_text(json.dumps(values))
        os.replace(temporary, self.path)
        _append(self.sets_log, f"{os.getpid()}\n")

    def delete(self, key: str) -> None:
        values = self._load()
        values.pop(key, None)
        Path(self.path).write_text(json.dumps(values))


def _append(path: str, line: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def _worker(directory: str, name: str, count: int, barrier, locked: bool) -> None:
    """One worker process: ``count`` admissions of its own tickets through a VariableGateStore."""
    airflow.sdk.Variable = FileVariable(os.path.join(directory, "variables.json"), os.path.join(directory, "sets"))
    tempfile.tempdir = directory
    if not locked:
        import contextlib

        gate_store._host_lock = lambda conn_id: contextlib.nullcontext()
    trace = os.path.join(directory, "trace")
    store = VariableGateStore()
    barrier.wait()
    for i in range(count):
        ticket = f"{name}-{i}"

        def change(state: GateState, ticket: str = ticket):
            _append(trace, f"enter {name}\n")
            time.sleep(0.002)  # a slow read-modify-write, as over the API server
            admission = admit(state, ticket, now=NOW)
            _append(trace, f"exit {name}\n")
            return admission, admission.state

        store.update("shared-api", change)


def _run_workers(directory: Path, count: int, locked: bool) -> list[str]:
    (directory / "variables.json").write_text(json.dumps({variable_key("shared-api"): paced_blocked_state().to_json()}))
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_worker, args=(str(directory), name, count, barrier, locked)) for name in ("p1", "p2")
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    return (directory / "trace").read_text().split("\n")[:-1]


def _overlaps(trace: list[str]) -> int:
    """How many times a read-modify-write started while another was still running."""
    inside = 0
    overlaps = 0
    for line in trace:
        if line.startswith("enter"):
            overlaps += inside > 0
            inside += 1
        else:
            inside -= 1
    return overlaps


class TestHostLock:
    def test_two_processes_updating_the_same_gate_are_serialised_and_lose_no_update(self, tmp_path):
        count = 25
        trace = _run_workers(tmp_path, count, locked=True)
        assert _overlaps(trace) == 0
        stored = GateState.from_json(json.loads((tmp_path / "variables.json").read_text())[variable_key("shared-api")])
        assert len(stored.tickets) == 2 * count
        assert sorted(stored.tickets.values()) == [NOW + 10 + k * INTERVAL for k in range(2 * count)]
        # Serialised by the lock: no write ever had to be verified away and redone.
        assert len((tmp_path / "sets").read_text().split()) == 2 * count

    def test_without_the_lock_the_same_harness_sees_the_read_modify_writes_overlap(self, tmp_path):
        # The control: the trace does detect concurrent updates when there is no lock.
        trace = _run_workers(tmp_path, 25, locked=False)
        assert _overlaps(trace) > 0
