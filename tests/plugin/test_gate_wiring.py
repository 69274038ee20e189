"""The drivers, the header reader and the shared gate together: regressions of issue 10, through real Airflow.

``dag.test()`` against a scripted server on 127.0.0.1. Each DAG has tasks of one Connection
run one after the other, so what the first task's answer told the gate is what the next
task finds there.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from network_requests import events
from network_requests.gate import GateState
from network_requests.gate_store import MemoryGateStore, variable_key
from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag, read_variable, run_source, set_variable
from tests.support.dag_runner import SendCounter, run_operator_task
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

GATE_VARIABLE = variable_key("network_request_api")
TWO_TASKS = """
a = NetworkRequestOperator(task_id="a", http_conn_id="network_request_api", endpoint="/a")
b = NetworkRequestOperator(task_id="b", http_conn_id="network_request_api", endpoint="/b")
a >> b
"""


def _two_tasks(request, scripted_api):
    dag_id = dag_id_for(request)
    body = one_task_dag(dag_id, TWO_TASKS, imports="from network_requests import NetworkRequestOperator")
    return run_source(dag_id, body, base_url=scripted_api.base_url)


def _stored_gate() -> GateState:
    return GateState.from_json(read_variable(GATE_VARIABLE), now=time.time())


def test_a_200_with_a_spent_quota_and_a_reset_in_epoch_milliseconds_holds_the_next_task_until_then(request, scripted_api):
    reset_s = time.time() + 3
    scripted_api.script(ScriptedResponse(body={"ok": 1}, headers={
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(reset_s * 1000))}))

    result = _two_tasks(request, scripted_api)

    assert {key[0]: task.state for key, task in result.tasks.items()} == {"a": "success", "b": "success"}, (
        "no OverflowError: the millisecond reset is a time 3 s away, not the year 58,887"
    )
    assert [r.path for r in scripted_api.requests] == ["/a", "/b"]
    assert scripted_api.requests[1].received_at >= int(reset_s * 1000) / 1000, "b waited for the reset"
    assert _stored_gate().blocked_until < time.time() + 60


def test_a_ten_year_retry_after_is_rejected_and_the_task_backs_off_instead(request, scripted_api):
    """The reader rejects a wait beyond its 7-day horizon as malformed (never turned into a date),
    so the wait is the task's backoff from retry_delay, as for any unusable header; the gate is
    not blocked for years either. rate_limit_timeout still bounds the whole."""
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=10 * 365 * 24 * 3600),
                        ScriptedResponse(body={"ok": True}))

    result = run_operator_task(request, scripted_api.base_url, "endpoint='/api/users'",
                               "{'retries': 0, 'retry_delay': timedelta(seconds=2)}")

    task = result.task("request")
    assert (task.state, task.try_number, task.xcom) == ("success", 1, {"ok": True})
    assert 2.0 <= scripted_api.gaps()[0] < 60, "waited retry_delay: neither 10 years nor at once"
    assert _stored_gate().blocked_until < time.time() + 60


def test_a_corrupt_gate_variable_makes_the_next_task_wait_briefly_then_succeed(request, scripted_api, monkeypatch):
    from network_requests import gate

    monkeypatch.setattr(gate, "DAMAGED_STATE_BLOCK_SECONDS", 3.0)  # 30 s in production; short here
    set_variable(GATE_VARIABLE, '{"blocked_until": "soon", "tickets": [1, 2')
    assert _stored_gate().damaged, "the fault is in place: the stored gate cannot be read"
    started = time.time()

    result = run_operator_task(request, scripted_api.base_url, "endpoint='/api/users'")

    assert result.task("request").state == "success"
    assert scripted_api.request_count == 1
    assert scripted_api.requests[0].received_at >= started + 3.0, "waited out the conservative block, no blind probe"
    assert _stored_gate().damaged is None, "the gate was written afresh"


def test_the_structured_ratelimit_header_on_a_200_holds_the_next_task(request, scripted_api):
    scripted_api.script(ScriptedResponse(body={"ok": 1}, headers={
        "RateLimit-Policy": '"default";q=10;w=3', "RateLimit": '"default";r=0;t=3'}))

    result = _two_tasks(request, scripted_api)

    assert {key[0]: task.state for key, task in result.tasks.items()} == {"a": "success", "b": "success"}
    assert scripted_api.gaps()[0] >= 3.0, "b sent nothing before t=3 s had passed"


class _ObserveFails(MemoryGateStore):
    """A gate store that admits, then fails to record answers after the first ``ok_observes``."""

    def __init__(self, ok_observes: int) -> None:
        super().__init__()
        self.ok_observes, self.observes, self.failures = ok_observes, 0, 0
        self.lock = threading.Lock()

    def update(self, key, change):
        result, _ = change(self.read(key))
        if result is None:  # observe (admit returns an Admission)
            with self.lock:
                self.observes += 1
                if self.observes > self.ok_observes:
                    self.failures += 1
                    raise ConnectionError("gate store went away")
        return super().update(key, change)


@pytest.mark.parametrize("where", ["worker", "triggerer"])
def test_a_gate_write_failing_after_a_2xx_is_an_event_not_a_failed_try_and_the_post_is_sent_once(
    request, scripted_api, monkeypatch, where
):
    store = _ObserveFails(ok_observes=0 if where == "worker" else 1)
    for module in ("network_requests.request_seams", "network_requests.triggers"):
        monkeypatch.setattr(f"{module}.default_gate_store", lambda: store)
    if where == "triggerer":
        scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1))
    scripted_api.script(ScriptedResponse(status=201, body={"id": 7}))
    seen: list[events.GateUpdateFailedEvent] = []
    recorder = events.subscribe(lambda event: seen.append(event) if isinstance(event, events.GateUpdateFailedEvent) else None)
    sends = SendCounter(monkeypatch)
    try:
        result = run_operator_task(request, scripted_api.base_url, "endpoint='/api/orders', method='POST'",
                                   "{'retries': 2, 'retry_delay': timedelta(seconds=1)}")
    finally:
        events.unsubscribe(recorder)

    assert store.failures == 1, "the fault happened: the write after the 2xx failed"
    task = result.task("request")
    assert (task.state, task.try_number, task.xcom) == ("success", 1, {"id": 7})
    assert [r.response.status for r in scripted_api.requests].count(201) == 1, "the POST was not sent again"
    assert sends.triggerer == (1 if where == "triggerer" else 0)
    assert [(e.conn_id, e.operation) for e in seen] == [("network_request_api", "observe")]
    assert "gate store went away" in seen[0].error and json.dumps(seen[0].error)


def test_a_request_that_got_no_answer_counts_against_a_declared_limit_from_when_it_failed(
    request, scripted_api, monkeypatch
):
    """It may have reached the server, which counted it when it saw it: as late as the moment the
    connection broke. So a declared "1 per 3 s" holds the next task 3 s from then, not from the send."""
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")  # a deferral's minimum: 1 s, not 5
    scripted_api.script(ScriptedResponse.close(after_s=2.0))
    body = one_task_dag(dag_id_for(request), """
a = NetworkRequestOperator(task_id="a", http_conn_id="network_request_api", endpoint="/a",
                           rate_limit={"requests": 1, "per": "3s"})
b = NetworkRequestOperator(task_id="b", http_conn_id="network_request_api", endpoint="/b",
                           rate_limit={"requests": 1, "per": "3s"}, trigger_rule="all_done")
a >> b
""", imports="from network_requests import NetworkRequestOperator")

    result = run_source(dag_id_for(request), body, base_url=scripted_api.base_url)

    assert {key[0]: task.state for key, task in result.tasks.items()} == {"a": "failed", "b": "success"}
    cut, answered = scripted_api.requests
    assert cut.response.action == "close", "the fault happened: a got no answer"
    assert answered.received_at >= cut.received_at + 2.0 + 3.0, "b waited 3 s from when a's connection broke"
