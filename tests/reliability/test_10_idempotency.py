"""Issue 10 item 6: a deferred POST is sent again after a kill, and every send carries one Idempotency-Key.

A ``POST`` task (deferrable, the default) is answered ``429, Retry-After: RETRY_AFTER``; it
defers, and at the allowed moment the *triggerer* sends the POST again. The server holds that
POST (reads it, answers nothing) while the test kills, with SIGKILL:

* (a) the triggerer: ``airflow triggerer`` and its trigger-runner child. ``airflow
  standalone`` does not start a dead component again (its ``SubCommand`` threads only stream
  their process's output; checked below), so the stack is restarted;
* (b) the whole stack: every process of ``make run``, as a power cut would. It is started
  again on the same AIRFLOW_HOME.

Each test first proves the fault: the process holding the POST's connection was a triggerer
and is gone, and the server saw that connection drop without an answer. Then the task
succeeds, every receipt of the POST (the 429'd one, the cut one, the answered one) carries the
same ``Idempotency-Key``, and none arrived before the time the 429 allowed.

The stack is this module's own (not the session's of conftest.py): killing it must not touch
the other cases' tasks.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from scripts.process_tree import alive, tree
from tests.support.embedded_stack import EmbeddedStack

from .dag_sources import HEADER
from .helpers import failure_summary

pytestmark = pytest.mark.reliability

#: Short, and longer than a deferral's minimum delay (1 s on the embedded stack), so the
#: triggerer (not the worker) sends the second POST.
RETRY_AFTER = 3
#: The longest the server holds a POST waiting for the client to hang up; the kill comes well before.
HOLD_LIMIT_S = 120.0
BODY = {"order": 42, "amount": "9.99"}
CASES = {  # case -> (dag_id, conn_id, path): one Connection each, so one gate each
    "triggerer": ("rel_idem_triggerer_killed", "rel_idem_a", "/orders/a"),
    "stack": ("rel_idem_stack_killed", "rel_idem_b", "/orders/b"),
}


# -- the server -------------------------------------------------------------------------


@dataclass
class Receipt:
    """One POST as the server saw it."""

    path: str
    idempotency_key: str | None
    arrived: float  # time.time()
    status: int | None = None  # what it was answered; None: cut before an answer
    answered: float | None = None
    dropped: float | None = None  # when the client hung up on a held request


class HoldingApi:
    """Per path: ``429, Retry-After`` first, then holds the next POST until the client hangs
    up (recording when), then ``201`` to every later one."""

    def __init__(self) -> None:
        self.receipts: list[Receipt] = []
        self._changed = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receipt = Receipt(self.path, self.headers.get("Idempotency-Key"), time.time())
                with api._changed:
                    earlier = sum(1 for r in api.receipts if r.path == self.path)
                    api.receipts.append(receipt)
                    api._changed.notify_all()
                if earlier == 1 and not self._held_until_client_leaves(receipt):
                    return
                status = 429 if earlier == 0 else 201
                body = json.dumps({"error": "slow down"} if status == 429 else {"created": BODY}).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", str(RETRY_AFTER))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with api._changed:
                    receipt.status, receipt.answered = status, time.time()
                    api._changed.notify_all()
                self.wfile.write(body)

            def _held_until_client_leaves(self, receipt: Receipt) -> bool:
                """False once the client hung up; True (answer it) if it stayed HOLD_LIMIT_S."""
                deadline = time.monotonic() + HOLD_LIMIT_S
                while time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.1)
                    try:
                        gone = bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
                    except OSError:  # reset
                        gone = True
                    if gone:
                        with api._changed:
                            receipt.dropped = time.time()
                            api._changed.notify_all()
                        self.close_connection = True
                        return False
                return True

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def for_path(self, path: str) -> list[Receipt]:
        with self._changed:
            return [r for r in self.receipts if r.path == path]

    def wait_until(self, what: str, condition, timeout: float):
        with self._changed:
            found = self._changed.wait_for(condition, timeout)
        if not found:
            raise TimeoutError(f"{what} within {timeout}s; the server saw {self.receipts}")
        return found


# -- the stack --------------------------------------------------------------------------


def post_dag(dag_id: str, conn_id: str, path: str) -> str:
    """A DAG of one POST task with the project's defaults (deferrable, shared gate, Idempotency-Key)."""
    return HEADER + f"""
with DAG(dag_id={dag_id!r}, schedule=None, start_date=START, catchup=False, tags=["reliability-test"],
         default_args={{"retries": 2, "retry_delay": timedelta(seconds=2)}}):
    NetworkRequestOperator(
        task_id="create_order",
        http_conn_id={conn_id!r},
        endpoint={path!r},
        method="POST",
        data={json.dumps(BODY)!r},
        headers={{"Content-Type": "application/json"}},
    )
"""


@pytest.fixture(scope="module")
def holding_api() -> Iterator[HoldingApi]:
    api = HoldingApi()
    api._thread.start()
    try:
        yield api
    finally:
        api._server.shutdown()
        api._server.server_close()


@pytest.fixture(scope="module")
def idem_stack(tmp_path_factory: pytest.TempPathFactory, holding_api: HoldingApi) -> Iterator[EmbeddedStack]:
    root = tmp_path_factory.mktemp("idempotency")
    dags = root / "dags"
    dags.mkdir()
    base_url = f"http://127.0.0.1:{holding_api.port}"
    env = {"AIRFLOW_CONN_NETWORK_REQUEST_API": base_url}  # set: no demo API is started
    for dag_id, conn_id, path in CASES.values():
        (dags / f"{dag_id}.py").write_text(post_dag(dag_id, conn_id, path).lstrip())
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = base_url
    stack = EmbeddedStack(root / "airflow-home", dags_folder=dags, extra_env=env)
    stack.start()
    try:
        took = stack.wait_ready([dag_id for dag_id, _, _ in CASES.values()], timeout=300)
        sys.stderr.write(f"\n[idempotency] stack ready in {took:.0f}s\n")
        yield stack
    finally:
        leftovers = stack.kill_everything()
    assert not leftovers, f"processes of the stack outlived it: {leftovers}"


# -- the steps both cases share -----------------------------------------------------------


def _post_held_in_the_triggerer(stack: EmbeddedStack, api: HoldingApi,
                                case: str) -> tuple[str, float, Receipt, list[psutil.Process]]:
    """Trigger the case's run and wait until the triggerer's POST is held by the server.

    Returns the run id, the time the 429 allowed, the held receipt, and the pids of the
    triggerer (its tree) whose child holds the connection.
    """
    dag_id, _, path = CASES[case]
    run_id = stack.trigger(dag_id)
    api.wait_until("the second POST", lambda: len(api.for_path(path)) >= 2, timeout=120)
    first, held = api.for_path(path)[:2]
    assert first.status == 429 and held.status is None, api.for_path(path)
    holders = stack.wait_for("the process holding the POST", lambda: stack.processes_connected_to(api.port), 15, 0.1)
    assert len(holders) == 1, [(pid, stack.cmdline(pid)) for pid in holders]
    triggerer = _triggerer_root(stack, holders[0])
    assert triggerer is not None, f"the POST was sent by {stack.cmdline(holders[0])!r}, not by the triggerer"
    ti = stack.task_instance(dag_id, run_id, "create_order")
    assert ti["state"] == "deferred", ti
    return run_id, first.answered + RETRY_AFTER, held, tree(triggerer.pid)


def _triggerer_root(stack: EmbeddedStack, pid: int) -> psutil.Process | None:
    """The ``airflow triggerer`` process that ``pid`` is or runs under (its trigger runner is a child)."""
    process: psutil.Process | None = psutil.Process(pid)
    found = None
    while process is not None and process.pid in stack.pids():
        if "triggerer" in stack.cmdline(process.pid):
            found = process
        process = process.parent()
    return found


def _assert_cut(api: HoldingApi, held: Receipt, killed: list[psutil.Process], killed_at: float) -> None:
    """The kill landed: the server saw the held POST's connection drop, and the processes are gone."""
    api.wait_until("the held POST's connection to drop", lambda: held.dropped is not None, timeout=15)
    assert held.status is None and held.dropped >= killed_at, held
    deadline = time.monotonic() + 10  # SIGKILL is delivered at once, the exit takes a moment
    while alive(killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(killed), f"still running after SIGKILL: {alive(killed)}"


def _assert_succeeded_with_one_key(stack: EmbeddedStack, api: HoldingApi, case: str, run_id: str, allowed_at: float,
                                   killed_at: float) -> None:
    dag_id, _, path = CASES[case]
    run = stack.wait_for_run(dag_id, run_id, timeout=180)
    ti = stack.task_instance(dag_id, run_id, "create_order")
    assert run["state"] == "success", failure_summary(stack.task_log(dag_id, run_id, "create_order", ti["try_number"]))
    receipts = api.for_path(path)
    assert [r.status for r in receipts] == [429, None, 201], "sent again once, after the kill: " + str(receipts)
    keys = {r.idempotency_key for r in receipts}
    assert len(keys) == 1 and None not in keys, f"every send carries one Idempotency-Key: {receipts}"
    early = [round(allowed_at - r.arrived, 3) for r in receipts[1:] if r.arrived < allowed_at]
    assert not early, f"sent before the time the 429 allowed (seconds early): {early}"
    # The trigger was taken over, not failed: neither the 429 nor the kill cost a try.
    assert ti["try_number"] == 1, ti
    created = {e["key"]: e["value"] for e in stack.xcom_entries(dag_id, run_id, "create_order")}["return_value"]
    assert (json.loads(created) if isinstance(created, str) else created) == {"created": BODY}
    print(f"[idempotency] {case}: receipts {[r.status for r in receipts]}, all with Idempotency-Key {keys.pop()}; "
          f"held POST sent {receipts[1].arrived - allowed_at:.2f}s after the allowed time, "
          f"sent again {receipts[2].arrived - killed_at:.1f}s after the kill; try {ti['try_number']}")


# -- the cases ----------------------------------------------------------------------------


def test_a_deferred_post_cut_by_a_killed_triggerer_is_resent_with_the_same_idempotency_key(idem_stack, holding_api):
    stack, api = idem_stack, holding_api
    run_id, allowed_at, held, triggerer = _post_held_in_the_triggerer(stack, api, "triggerer")

    killed_at = time.time()
    for process in triggerer:
        process.kill()
    _assert_cut(api, held, triggerer, killed_at)
    # airflow/cli/commands/standalone_command.py: SubCommand.run only streams its process's
    # output, and nothing starts a component again. Seen here, not only read there:
    time.sleep(3)
    assert not stack.find_processes("triggerer"), "airflow standalone started a new triggerer by itself"
    print(f"\n[idempotency] triggerer {[p.pid for p in triggerer]} SIGKILLed mid-POST; "
          "standalone does not start it again")

    took = stack.restart(dag_ids=[CASES["triggerer"][0]])
    print(f"[idempotency] stack restarted in {took:.0f}s")
    _assert_succeeded_with_one_key(stack, api, "triggerer", run_id, allowed_at, killed_at)


def test_a_deferred_post_cut_by_a_killed_stack_is_resent_with_the_same_idempotency_key(idem_stack, holding_api):
    stack, api = idem_stack, holding_api
    run_id, allowed_at, held, triggerer = _post_held_in_the_triggerer(stack, api, "stack")

    everything = tree(stack.proc.pid)
    assert set(triggerer) <= set(everything)
    killed_at = time.time()
    for process in everything:
        process.kill()
    stack.proc.wait(10)
    _assert_cut(api, held, everything, killed_at)
    print(f"\n[idempotency] the whole stack ({len(everything)} processes) SIGKILLed mid-POST")

    begin = time.monotonic()
    stack.start()
    stack.wait_ready([CASES["stack"][0]], timeout=300)
    print(f"[idempotency] stack started again on the same AIRFLOW_HOME in {time.monotonic() - begin:.0f}s")
    _assert_succeeded_with_one_key(stack, api, "stack", run_id, allowed_at, killed_at)
