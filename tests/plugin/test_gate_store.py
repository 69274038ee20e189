"""Where the shared gate lives (network_requests.gate_store): the three stores and the choice.

``VariableGateStore`` reads and writes through the Task SDK, which only answers inside a
running task; here ``airflow.sdk.Variable`` is replaced by a dict (or, across processes, by
a JSON file), so the read-modify-write logic itself is what is tested (tests/distributed
runs it on the real metadata database). ``RedisGateStore`` runs against the real Redis on
127.0.0.1:6379, each test under its own key prefix; those tests skip when Redis is not there.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

import airflow.sdk
import pytest
from airflow.sdk.exceptions import ErrorType
from airflow.sdk.execution_time import task_runner
from airflow.sdk.execution_time.comms import ErrorResponse, GetVariable, VariableResult
from hypothesis import assume, given
from hypothesis import strategies as st

from network_requests import gate_store, wait_history
from network_requests.gate import DAMAGED_STATE_BLOCK_SECONDS, STATE_TTL_SECONDS, GateState, admit, observe, release_probe
from network_requests.gate_store import (
    GateContentionError,
    GateStoreError,
    GateStoreUnavailableError,
    MemoryGateStore,
    RedisGateStore,
    VariableGateStore,
    expiry_seconds,
    gate_store_from_config,
    variable_key,
)
from network_requests.rate_limit_headers import MAX_HORIZON_SECONDS, RateLimitInfo
from tests.support.scripted_api import free_port

NOW = 1_700_000_000.0
ORIGIN = "https://api.example.com:443"
#: A gate closed until NOW + 10 whose API allows one request per INTERVAL: every task
#: admitted at NOW is given its own send time.
INTERVAL = 0.5
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def paced_blocked_state() -> GateState:
    return GateState(blocked_until=NOW + 10, remaining=0, interval=INTERVAL, updated_at=NOW, origin=ORIGIN)


def admit_change(ticket: str, now: float = NOW):
    def change(state: GateState):
        admission = admit(state, ticket, now=now)
        return admission, admission.state

    return change


def block_change(until: float, now: float = NOW):
    """What a task does with a ``429, Retry-After`` answered at ``now``: block the gate until ``until``."""

    def change(state: GateState):
        return None, observe(state, RateLimitInfo(retry_after=until - now), now=now, rate_limited_until=until)

    return change


def fixed_clock() -> float:
    return NOW


@pytest.fixture(autouse=True)
def fresh_logging_memory(monkeypatch):
    """Each test sees the store's once-per-process messages afresh."""
    monkeypatch.setattr(gate_store, "_damage_logged", set())
    monkeypatch.setattr(gate_store, "_executor_warned", False)


# -- MemoryGateStore -------------------------------------------------------------------------


class TestMemoryGateStore:
    def test_an_unknown_connection_reads_as_a_fresh_gate(self):
        assert MemoryGateStore(fixed_clock).read("api") == GateState()

    def test_update_stores_the_new_state_and_returns_the_changes_result(self):
        store = MemoryGateStore(fixed_clock)
        result = store.update("api", lambda state: ("result", block_change(NOW + 5)(state)[1]))
        assert result == "result"
        assert store.read("api").blocked_until == NOW + 5
        assert store.read("other").blocked_until == 0.0

    def test_eight_threads_admitting_200_tickets_each_lose_no_update(self):
        # Each task is admitted at a blocked, paced gate (a send time of its own), then comes
        # back at that time, is let through and its answer is observed in the same change (its
        # ticket released, which keeps the stored state small; a request left out would hold
        # the next paced one for its answer). A lost update would hand two tasks the same time.
        store = MemoryGateStore(fixed_clock)
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
                if admission.send_at <= now:  # sent, and answered at once
                    return admission, release_probe(admission.state, ticket, now=now)
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


# -- VariableGateStore with a dict for airflow.sdk.Variable ----------------------------------


class ExecutionApiComms:
    """A task's ``SUPERVISOR_COMMS`` answering ``GetVariable`` from a :class:`DictVariable`'s
    values (or with ``failing``); records every message sent."""

    def __init__(self, variables: DictVariable, failing: ErrorType | None = None) -> None:
        self.variables, self.failing = variables, failing
        self.messages: list = []

    def send(self, message):
        self.messages.append(message)
        if self.failing is not None:
            return ErrorResponse(error=self.failing, detail={"message": "down"})
        assert isinstance(message, GetVariable), message
        if message.key not in self.variables.values:
            return ErrorResponse(error=ErrorType.VARIABLE_NOT_FOUND, detail={"message": "not found"})
        return VariableResult(key=message.key, value=self.variables.values[message.key])


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
        assert re.fullmatch(r"network_requests\.gate\.my_api_v2__~[0-9a-f]{12}", variable_key("my api/v2:é"))

    @given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
    def test_two_keys_never_share_a_variable(self, first, second):
        """An explicit gate_key ("key:x") and the Connection "key_x" are two quotas, two gates."""
        assume(first != second)
        assert variable_key(first) != variable_key(second)
        assert re.fullmatch(r"[A-Za-z0-9_.~-]+", variable_key(first).removeprefix("network_requests.gate."))

    def test_a_gate_key_and_a_connection_named_like_it_get_their_own_variables(self):
        from network_requests.configured_limits import resolve_gate_key

        explicit = resolve_gate_key("any_conn", "github-token").name
        assert variable_key(explicit) != variable_key("key_github-token")
        assert wait_history.variable_key(explicit).removeprefix(wait_history.VARIABLE_PREFIX) == (
            variable_key(explicit).removeprefix("network_requests.gate."))

    def test_a_missing_variable_reads_as_a_fresh_gate(self, variables):
        assert VariableGateStore(fixed_clock).read("api") == GateState()

    def test_an_unreadable_variable_reads_as_a_short_conservative_block_logged_once(self, variables, caplog):
        variables.values[variable_key("api")] = "{not json"
        store = VariableGateStore(fixed_clock)
        with caplog.at_level(logging.WARNING, logger=gate_store.__name__):
            first, second = store.read("api"), store.read("api")
        assert first.blocked_until == NOW + DAMAGED_STATE_BLOCK_SECONDS
        assert first.damaged and second.damaged
        damaged_lines = [r for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(damaged_lines) == 1, caplog.text
        assert variable_key("api") in damaged_lines[0].getMessage()

    def test_update_writes_the_new_state_and_returns_the_changes_result(self, variables):
        variables.values[variable_key("api")] = paced_blocked_state().to_json()
        admission = VariableGateStore(fixed_clock).update("api", admit_change("a"))
        assert admission.send_at == NOW + 10
        stored = GateState.from_json(variables.values[variable_key("api")], now=NOW)
        assert stored == admission.state
        assert len(variables.sets) == 1
        assert variables.sets[0][2]  # a description for Admin -> Variables

    def test_an_unreadable_variable_is_replaced_by_a_sound_state_that_keeps_the_conservative_block(
        self, variables
    ):
        variables.values[variable_key("api")] = "garbage"
        admission = VariableGateStore(fixed_clock).update("api", admit_change("a"))
        assert admission.send_at >= NOW + DAMAGED_STATE_BLOCK_SECONDS
        stored = json.loads(variables.values[variable_key("api")])
        assert stored["blocked_until"] == NOW + DAMAGED_STATE_BLOCK_SECONDS
        assert GateState.from_json(variables.values[variable_key("api")], now=NOW).damaged is None

    def test_a_change_that_changes_nothing_writes_nothing(self, variables):
        store = VariableGateStore(fixed_clock)
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
        VariableGateStore(fixed_clock).update("api", admit_change("a"))
        # One read before the change, one to verify the write.
        assert invalidated == [variable_key("api")] * 2

    def test_a_broken_secrets_cache_does_not_stop_the_gate(self, variables, monkeypatch):
        from airflow.sdk.execution_time.cache import SecretCache

        def broken(cls, key):
            raise RuntimeError("no cache here")

        monkeypatch.setattr(SecretCache, "invalidate_variable", classmethod(broken))
        assert VariableGateStore(fixed_clock).update("api", admit_change("a")).send_at == NOW

    def test_in_a_task_a_read_is_one_get_variable_message_and_no_mask_secret(self, variables, monkeypatch):
        """Each message from a trigger costs a turn of the triggerer's main loop (database
        queries): Variable.get's MaskSecret after every read is not sent for a gate."""
        comms = ExecutionApiComms(variables)
        monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", comms, raising=False)
        variables.values[variable_key("api")] = paced_blocked_state().to_json()

        admission = VariableGateStore(fixed_clock).update("api", admit_change("a"))

        assert admission.send_at == NOW + 10
        # One read before the change, one to verify the write; the write is Variable.set's.
        assert [type(message).__name__ for message in comms.messages] == ["GetVariable", "GetVariable"]
        assert variables.gets == 0 and len(variables.sets) == 1
        assert json.loads(variables.values[variable_key("api")])["tickets"] == {"a": NOW + 10}

    def test_in_a_task_a_missing_variable_is_a_fresh_gate(self, variables, monkeypatch):
        monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", ExecutionApiComms(variables), raising=False)
        assert VariableGateStore(fixed_clock).read("api") == GateState()

    def test_an_execution_api_that_fails_to_answer_is_a_store_error_not_an_empty_gate(self, variables, monkeypatch):
        """Variable.get(default=None) would read it as "no gate yet" and let a request out."""
        comms = ExecutionApiComms(variables, failing=ErrorType.API_SERVER_ERROR)
        monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", comms, raising=False)
        variables.values[variable_key("api")] = paced_blocked_state().to_json()

        with pytest.raises(GateStoreError, match=r"could not be read through the execution API: API_SERVER_ERROR"):
            VariableGateStore(fixed_clock).update("api", admit_change("a"))
        assert variables.sets == [], "nothing was written"

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
            ours = VariableGateStore(fixed_clock).update("api", admit_change("ours"))
        assert "redoing the change" in caplog.text
        assert theirs.send_at == NOW + 10
        assert ours.send_at == NOW + 10 + INTERVAL  # redone on their state: the next slot, not theirs
        stored = GateState.from_json(variables.values[key], now=NOW)
        assert stored.tickets == {"theirs": NOW + 10, "ours": NOW + 10 + INTERVAL}
        assert stored == ours.state
        assert len(variables.sets) == 2

    def test_a_writer_that_keeps_interfering_makes_update_give_up_after_a_bounded_number_of_tries(
        self, variables
    ):
        key = variable_key("api")
        variables.values[key] = paced_blocked_state().to_json()
        interfering = GateState(blocked_until=NOW + 60, origin=ORIGIN, updated_at=NOW)
        variables.after_set = lambda key_written, value: variables.values.__setitem__(
            key_written, interfering.to_json()
        )
        admission = VariableGateStore(fixed_clock).update("api", admit_change("a"))
        assert len(variables.sets) == gate_store._VERIFY_ATTEMPTS
        # The last try was computed on the other writer's state, so it honours its block.
        assert admission.send_at == NOW + 60

    def test_across_two_temp_dirs_a_stale_writer_overwrites_a_block_and_a_third_task_goes_early(
        self, variables, tmp_path
    ):
        # Why the Variable store is single-host, deterministically: two hosts (two TMPDIRs, so
        # two lock files) and one metadata DB. Host A reads the open gate; host B stores a
        # 429's block of 120 s; host A then writes its admission computed on what it read.
        # Its read-back sees its own value, so nothing is redone: the block is gone.
        key = variable_key("api")
        host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
        host_a.mkdir(), host_b.mkdir()
        store_a, store_b = VariableGateStore(fixed_clock), VariableGateStore(fixed_clock)
        variables.values[key] = GateState(remaining=5, observed_at=NOW, updated_at=NOW, origin=ORIGIN).to_json()
        calls = []

        def stale_admission(state: GateState):
            calls.append(state)
            if len(calls) == 1:
                tempfile.tempdir = str(host_b)  # B's own lock file: A's lock does not stop it
                store_b.update("api", block_change(NOW + 120))
                tempfile.tempdir = str(host_a)
            return admit_change("a")(state)

        tempfile.tempdir = str(host_a)
        admitted_a = store_a.update("api", stale_admission)

        assert len(list(host_a.glob("*.lock"))) == len(list(host_b.glob("*.lock"))) == 1
        assert admitted_a.send_at == NOW  # A decided on the open gate it had read
        assert len(calls) == 1  # and was never told to redo it
        stored = GateState.from_json(variables.values[key], now=NOW)
        assert stored.blocked_until < NOW + 120, "the block B stored survived: no lost update"
        third = admit(stored, "c", now=NOW + 1)
        assert third.send_at == NOW + 1  # let out 119 s before the server allowed

    def test_clear_deletes_the_variable(self, variables):
        variables.values[variable_key("api")] = paced_blocked_state().to_json()
        VariableGateStore(fixed_clock).clear("api")
        assert variable_key("api") not in variables.values


class TestVariableGateStoreExecutorWarning:
    @pytest.mark.parametrize(
        "executor",
        ["CeleryExecutor", "airflow.providers.celery.executors.celery_executor.CeleryExecutor",
         "LocalExecutor,remote:airflow.providers.celery.executors.celery_executor.CeleryExecutor"],
    )  # fmt: skip
    def test_a_multi_host_executor_gets_one_warning_per_process_that_names_the_fix(
        self, monkeypatch, caplog, executor
    ):
        monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
        with caplog.at_level(logging.WARNING, logger=gate_store.__name__):
            VariableGateStore()
            VariableGateStore()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "CeleryExecutor" in warnings[0]
        assert "gate_store = redis" in warnings[0] and "AIRFLOW__NETWORK_REQUESTS__GATE_STORE=redis" in warnings[0]

    @pytest.mark.parametrize("executor", ["LocalExecutor", "SequentialExecutor", "LocalExecutor,SequentialExecutor"])
    def test_a_single_host_executor_gets_no_warning(self, monkeypatch, caplog, executor):
        monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
        with caplog.at_level(logging.WARNING, logger=gate_store.__name__):
            VariableGateStore()
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]


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
    store = VariableGateStore(fixed_clock)
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
        raw = json.loads((tmp_path / "variables.json").read_text())[variable_key("shared-api")]
        stored = GateState.from_json(raw, now=NOW)
        assert len(stored.tickets) == 2 * count
        assert sorted(stored.tickets.values()) == [NOW + 10 + k * INTERVAL for k in range(2 * count)]
        # Serialised by the lock: no write ever had to be verified away and redone.
        assert len((tmp_path / "sets").read_text().split()) == 2 * count

    def test_without_the_lock_the_same_harness_sees_the_read_modify_writes_overlap(self, tmp_path):
        # The control: the trace does detect concurrent updates when there is no lock.
        trace = _run_workers(tmp_path, 25, locked=False)
        assert _overlaps(trace) > 0


# -- RedisGateStore against the real Redis ---------------------------------------------------


@pytest.fixture
def redis_client():
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        pytest.skip(f"no Redis on {REDIS_HOST}:{REDIS_PORT} ({error}); the Redis gate store tests need one")
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client) -> str:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    value = f"network_requests:test:{uuid.uuid4().hex}:gate:"
    yield value
    keys = list(redis_client.scan_iter(match=value + "*"))
    if keys:
        redis_client.delete(*keys)


def redis_store(redis_client, prefix: str, **kwargs) -> RedisGateStore:
    return RedisGateStore("unused_in_this_test", client=redis_client, key_prefix=prefix, clock=fixed_clock, **kwargs)


class TestRedisGateStore:
    def test_an_unknown_gate_reads_as_a_fresh_gate_and_nothing_is_written_by_reading(self, redis_client, prefix):
        store = redis_store(redis_client, prefix)
        assert store.read("api") == GateState()
        assert redis_client.exists(prefix + "api") == 0

    def test_update_stores_the_state_with_a_version_under_the_prefix_and_returns_the_result(
        self, redis_client, prefix
    ):
        store = redis_store(redis_client, prefix)
        store.update("api", lambda _: (None, paced_blocked_state()))
        admission = store.update("api", admit_change("a"))
        assert admission.send_at == NOW + 10
        stored = redis_client.hgetall(prefix + "api")
        assert set(stored) == {b"state", b"version"}
        assert GateState.from_json(stored[b"state"], now=NOW) == admission.state == store.read("api")

    def test_the_default_key_prefix_is_network_requests_gate(self):
        assert RedisGateStore().redis_key("my_api") == "network_requests:gate:my_api"

    def test_a_stale_writer_is_refused_and_redone_on_the_block_another_store_wrote(self, redis_client, prefix):
        # The same interleaving that loses the block with the Variable store (see
        # TestVariableGateStore): here A's compare-and-set fails, and its change is redone on
        # the state holding B's block.
        import redis

        other_client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_timeout=5)
        store_a = redis_store(redis_client, prefix)
        store_b = redis_store(other_client, prefix)
        store_a.update("api", lambda _: (None, GateState(remaining=5, observed_at=NOW, updated_at=NOW, origin=ORIGIN)))
        seen: list[GateState] = []

        def admission_racing_a_block(state: GateState):
            seen.append(state)
            if len(seen) == 1:
                store_b.update("api", block_change(NOW + 120))
            return admit_change("a")(state)

        try:
            admitted_a = store_a.update("api", admission_racing_a_block)
        finally:
            other_client.close()
        assert len(seen) == 2, "the stale write was not refused"
        assert (seen[0].blocked_until, seen[1].blocked_until) == (0.0, NOW + 120)
        assert admitted_a.send_at == NOW + 120
        stored = store_a.read("api")
        assert stored.blocked_until == NOW + 120
        assert admit(stored, "c", now=NOW + 1).send_at >= NOW + 120

    def test_a_writer_that_loses_every_try_gives_up_with_a_contention_error_and_writes_nothing(
        self, redis_client, prefix
    ):
        store = redis_store(redis_client, prefix, attempts=3, sleep=lambda _: None)
        store.update("api", lambda _: (None, paced_blocked_state()))
        calls = []

        def always_overtaken(state: GateState):
            calls.append(state)
            # Another writer's update lands between every read and compare-and-set of ours.
            redis_client.hset(prefix + "api", "version", f"other-{len(calls)}")
            return admit_change(f"t{len(calls)}")(state)

        with pytest.raises(GateContentionError) as raised:
            store.update("api", always_overtaken)
        assert len(calls) == 3
        assert raised.value.attempts == 3 and raised.value.retry_after > 0
        assert "ask again" in str(raised.value)
        assert store.read("api").tickets == {}  # none of the three admissions was stored

    def test_retries_pause_a_short_random_while_that_grows_with_each_try(self, redis_client, prefix):
        pauses: list[float] = []
        store = redis_store(redis_client, prefix, attempts=4, sleep=pauses.append, random_fraction=lambda: 1.0)

        def overtaken(state: GateState):
            redis_client.hset(prefix + "api", "version", uuid.uuid4().hex)
            return None, paced_blocked_state()

        with pytest.raises(GateContentionError):
            store.update("api", overtaken)
        assert pauses == [gate_store.CAS_BACKOFF_SECONDS * n for n in (1, 2, 3)]

    def test_eight_threads_with_their_own_connections_lose_no_update(self, redis_client, prefix):
        import redis

        store_setup = redis_store(redis_client, prefix)
        store_setup.update("api", lambda _: (None, paced_blocked_state()))
        threads, per_thread = 8, 25
        results: dict[str, float] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(threads)

        def worker(index: int) -> None:
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_timeout=5)
            store = redis_store(client, prefix, attempts=200)
            try:
                barrier.wait()
                for i in range(per_thread):
                    ticket = f"t{index}-{i}"
                    results[ticket] = store.update("api", admit_change(ticket)).send_at
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
            finally:
                client.close()

        pool = [threading.Thread(target=worker, args=(index,)) for index in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=60)
        assert not errors
        total = threads * per_thread
        assert sorted(results.values()) == [NOW + 10 + k * INTERVAL for k in range(total)]
        assert len(store_setup.read("api").tickets) == total

    def test_each_write_sets_the_keys_expiry_from_the_states_horizon_plus_the_ttl(self, redis_client, prefix):
        store = redis_store(redis_client, prefix)
        store.update("api", block_change(NOW + 3600))
        ttl = redis_client.pttl(prefix + "api") / 1000
        assert 3600 + STATE_TTL_SECONDS - 5 <= ttl <= 3600 + STATE_TTL_SECONDS
        # A later write with a shorter horizon shortens it again: the key lives as long as its state.
        store.update("api", lambda state: (None, GateState(updated_at=NOW, origin=ORIGIN)))
        assert STATE_TTL_SECONDS - 5 <= redis_client.pttl(prefix + "api") / 1000 <= STATE_TTL_SECONDS

    def test_the_expiry_is_bounded_by_the_horizon_and_never_zero(self):
        far = GateState(blocked_until=NOW + 10 * MAX_HORIZON_SECONDS, updated_at=NOW)
        assert expiry_seconds(far, NOW) == MAX_HORIZON_SECONDS + STATE_TTL_SECONDS
        assert expiry_seconds(GateState(updated_at=NOW - 3600), NOW) == STATE_TTL_SECONDS

    @pytest.mark.parametrize("corrupt", ["garbage", '{"blocked_until": "soon"}', "[1, 2]"])
    def test_a_corrupt_stored_state_reads_as_a_conservative_block_and_is_replaced_by_a_sound_one(
        self, redis_client, prefix, corrupt, caplog
    ):
        redis_client.hset(prefix + "api", mapping={"state": corrupt, "version": "v1"})
        store = redis_store(redis_client, prefix)
        with caplog.at_level(logging.WARNING, logger=gate_store.__name__):
            state = store.read("api")
            admission = store.update("api", admit_change("a"))
        assert state.damaged
        assert state.blocked_until >= NOW + DAMAGED_STATE_BLOCK_SECONDS
        assert admission.send_at >= NOW + DAMAGED_STATE_BLOCK_SECONDS  # never an open gate
        assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1
        stored = GateState.from_json(redis_client.hget(prefix + "api", "state"), now=NOW)
        assert stored.damaged is None and stored.blocked_until >= NOW + DAMAGED_STATE_BLOCK_SECONDS

    def test_a_key_of_another_type_reads_as_damaged_and_the_next_update_replaces_it(self, redis_client, prefix):
        redis_client.set(prefix + "api", "someone else's value")
        store = redis_store(redis_client, prefix)
        assert "string" in store.read("api").damaged
        store.update("api", admit_change("a"))
        assert redis_client.type(prefix + "api") == b"hash"
        assert store.read("api").damaged is None

    def test_states_lists_every_gate_under_the_prefix_and_nothing_else(self, redis_client, prefix):
        store = redis_store(redis_client, prefix)
        store.update("b_api", block_change(NOW + 5))
        store.update("a_api", block_change(NOW + 7))
        states = store.states()
        assert list(states) == ["a_api", "b_api"]
        assert GateState.from_json(states["a_api"], now=NOW).blocked_until == NOW + 7

    def test_clear_deletes_the_gate(self, redis_client, prefix):
        store = redis_store(redis_client, prefix)
        store.update("api", block_change(NOW + 5))
        store.clear("api")
        assert redis_client.exists(prefix + "api") == 0

    def test_the_connection_is_read_from_airflow_on_first_use(self, redis_client, prefix, monkeypatch):
        monkeypatch.setenv("AIRFLOW_CONN_GATE_STORE_TEST_REDIS", f"redis://{REDIS_HOST}:{REDIS_PORT}/?db=0")
        store = RedisGateStore("gate_store_test_redis", key_prefix=prefix, clock=fixed_clock)
        store.update("api", block_change(NOW + 5))
        assert GateState.from_json(redis_client.hget(prefix + "api", "state"), now=NOW).blocked_until == NOW + 5

    def test_an_unreachable_redis_is_a_clear_error_that_names_the_connection_but_not_its_password(
        self, monkeypatch
    ):
        port = free_port()  # nothing listens there
        monkeypatch.setenv("AIRFLOW_CONN_GATE_STORE_DOWN", f"redis://:not-this-secret@127.0.0.1:{port}/?db=0")
        store = RedisGateStore("gate_store_down", clock=fixed_clock)
        with pytest.raises(GateStoreUnavailableError) as raised:
            store.update("api", admit_change("a"))
        assert "gate_store_down" in str(raised.value)
        assert "not-this-secret" not in str(raised.value)
        with pytest.raises(GateStoreUnavailableError):
            store.read("api")


# -- gate_store_from_config ------------------------------------------------------------------


class TestGateStoreFromConfig:
    def test_the_default_is_the_variable_store(self, monkeypatch):
        monkeypatch.delenv("AIRFLOW__NETWORK_REQUESTS__GATE_STORE", raising=False)
        assert isinstance(gate_store_from_config(), VariableGateStore)

    @pytest.mark.parametrize("value", ["redis", " Redis "])
    def test_redis_selects_the_redis_store_with_the_default_connection(self, monkeypatch, value):
        monkeypatch.setenv("AIRFLOW__NETWORK_REQUESTS__GATE_STORE", value)
        monkeypatch.delenv("AIRFLOW__NETWORK_REQUESTS__REDIS_CONN_ID", raising=False)
        store = gate_store_from_config()
        assert isinstance(store, RedisGateStore)
        assert store.redis_conn_id == "redis_default"

    def test_the_redis_connection_id_is_configurable(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW__NETWORK_REQUESTS__GATE_STORE", "redis")
        monkeypatch.setenv("AIRFLOW__NETWORK_REQUESTS__REDIS_CONN_ID", "gate_redis")
        assert gate_store_from_config().redis_conn_id == "gate_redis"

    def test_building_the_redis_store_connects_to_nothing(self, monkeypatch):
        # The operator builds its store in execute(); DAG parsing must stay free of network.
        monkeypatch.setenv("AIRFLOW__NETWORK_REQUESTS__GATE_STORE", "redis")
        monkeypatch.setenv("AIRFLOW__NETWORK_REQUESTS__REDIS_CONN_ID", "no_such_connection_anywhere")
        assert gate_store_from_config()._client is None

    def test_an_unknown_store_is_an_error_naming_the_option_and_the_allowed_values(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW__NETWORK_REQUESTS__GATE_STORE", "memcached")
        with pytest.raises(ValueError) as raised:
            gate_store_from_config()
        message = str(raised.value)
        assert "[network_requests] gate_store" in message and "'memcached'" in message
        assert "variable, redis" in message and "AIRFLOW__NETWORK_REQUESTS__GATE_STORE" in message
