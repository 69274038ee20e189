"""Case 14: a batch (BatchRequestOperator) whose worker or triggerer is SIGKILLed mid-batch
resumes from its checkpoint and never sends again a request that had succeeded.

The DAG and the Connection are this module's own: the DAG file is written into the stack's
DAGs folder and the Connection created through the REST API, so the session's stack needs no
change. The server (in this process) holds each answer a moment, so the batch is still under
way when the test kills:

* **the worker** (``deferrable=False``: the task process sends the batch itself): its
  supervisor reports the try failed, Airflow retries it, the retry sends what is left;
* **the triggerer** (the default, ``deferrable=True``), with its trigger runner: the stack is
  restarted and the new triggerer runs the trigger again, which reads the checkpoint.

What was recorded as done before the kill was sent exactly once. The only requests sent
twice are those the server had answered while the journal line was not written yet (the
window docs/batch.md names), so at most ``max_in_flight`` of them. Each case first proves
that the kill came mid-batch (some requests done, some not, and none sent while nothing ran).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from network_requests.batch_checkpoint import read_journal
from tests.support.embedded_stack import DAGS_FOLDER_ENV
from tests.support.scripted_api import ScriptedResponse

from .helpers import failure_summary
from .servers import RoutedApi

pytestmark = pytest.mark.reliability

CONN_ID = "rel_c14_batch"
DAG_IDS = {"worker": "rel_batch_worker_killed", "triggerer": "rel_batch_triggerer_killed"}
ITEMS = 40
MAX_IN_FLIGHT = 2
#: How long the server holds each answer: 40 requests, 2 at a time, take about 8 s.
ANSWER_DELAY = 0.4
#: Kill once this many requests are recorded as done (and before all are).
KILL_AFTER = 8

DAG_SOURCE = '''
"""Test DAG of tests/reliability/test_11_batch_resume.py (written by the test, not part of the project)."""
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from network_requests.batch import BatchRequestOperator

for dag_id, deferrable in ({dags!r}):
    with DAG(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
             tags=["reliability-test"], default_args={{"retries": 1, "retry_delay": timedelta(seconds=2)}}):
        BatchRequestOperator(
            task_id="batch",
            http_conn_id={conn_id!r},
            requests=[f"/{{dag_id}}/items/{{i}}" for i in range({items})],
            max_in_flight={max_in_flight},
            deferrable=deferrable,
        )
'''


@pytest.fixture(scope="module")
def batch_api(stack):
    """This module's server, Connection and DAGs, registered in the running stack."""
    api = RoutedApi(default_response=ScriptedResponse(body={"ok": True}, delay_s=ANSWER_DELAY)).start()
    connection = {"connection_id": CONN_ID, "conn_type": "http", "host": "127.0.0.1", "port": api.port, "schema": "http"}
    if stack.rest("GET", f"/api/v2/connections/{CONN_ID}").ok:
        stack.rest_json("PATCH", f"/api/v2/connections/{CONN_ID}", connection)
    else:
        stack.rest_json("POST", "/api/v2/connections", connection)
    dags = tuple((dag_id, place == "triggerer") for place, dag_id in DAG_IDS.items())
    source = DAG_SOURCE.format(dags=dags, conn_id=CONN_ID, items=ITEMS, max_in_flight=MAX_IN_FLIGHT)
    (Path(stack.env[DAGS_FOLDER_ENV]) / "rel_batch_resume.py").write_text(textwrap.dedent(source).lstrip())
    stack.wait_for_dags(DAG_IDS.values(), timeout=180)
    try:
        yield api
    finally:
        api.stop()


def _journal(stack, dag_id: str) -> tuple[Path | None, dict]:
    found = sorted((stack.data_dir / dag_id).rglob("*.checkpoint.jsonl"))
    if not found:
        return None, {}
    return found[-1], read_journal(found[-1])[1]


def _done_paths(records: dict) -> set[int]:
    """The indexes recorded as done (request i is "/<dag_id>/items/<i>")."""
    return {record["index"] for record in records.values() if record["status"] == "ok"}


def _wait_until_mid_batch(stack, dag_id: str) -> None:
    stack.wait_for(f"{KILL_AFTER} requests of {dag_id} done", lambda: len(_done_paths(_journal(stack, dag_id)[1])) >= KILL_AFTER,
                   timeout=120, interval=0.05)


def _sigkill(pids: list[int]) -> list[str]:
    killed = []
    for pid in pids:
        try:
            described = f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]!r}"
            os.kill(pid, signal.SIGKILL)
            killed.append(described)
        except (ProcessLookupError, psutil.Error):
            pass
    return killed


def _check_resumed_without_resending(api, dag_id: str, done_at_kill: set[int], sent_at_kill: Counter) -> Counter:
    sent = _requests_by_index(api, dag_id)
    assert set(sent) == set(range(ITEMS)), "every request was sent"
    assert all(sent[index] == 1 for index in done_at_kill), (
        f"a request recorded as done before the kill was sent again: {[(i, sent[i]) for i in done_at_kill if sent[i] != 1]}")
    twice = {index for index, count in sent.items() if count > 1}
    assert all(sent[index] == 2 for index in twice), sent
    assert twice <= set(sent_at_kill), "only a request already out at the kill can be sent twice"
    assert len(twice) <= MAX_IN_FLIGHT, f"sent twice: {sorted(twice)}: more than the requests in flight at the kill"
    return sent


def _requests_to(api, dag_id: str) -> list:
    return [request for request in api.requests if request.path.startswith(f"/{dag_id}/items/")]


def _requests_by_index(api, dag_id: str) -> Counter:
    return Counter(int(request.path.rsplit("/", 1)[1]) for request in _requests_to(api, dag_id))


def test_a_batch_whose_worker_is_killed_resumes_in_the_retry_without_resending(stack, batch_api):
    dag_id = DAG_IDS["worker"]
    run_id = stack.trigger(dag_id)
    _wait_until_mid_batch(stack, dag_id)

    pids = stack.wait_for("the task process", lambda: stack.processes_connected_to(batch_api.port), 15, 0.02)
    killed = _sigkill(pids)
    killed_at = time.time()
    _, records = _journal(stack, dag_id)
    done_at_kill, sent_at_kill = _done_paths(records), _requests_by_index(batch_api, dag_id)
    print(f"\n[case 14] killed the task process {killed} with {len(done_at_kill)} of {ITEMS} done, "
          f"{sum(sent_at_kill.values())} sent")
    assert killed, "the task process was found and killed"
    assert KILL_AFTER <= len(done_at_kill) < ITEMS, "the kill came mid-batch"

    run = stack.wait_for_run(dag_id, run_id, timeout=180)

    ti = stack.task_instance(dag_id, run_id, "batch")
    assert run["state"] == "success", failure_summary(stack.task_log(dag_id, run_id, "batch", ti["try_number"]))
    assert ti["try_number"] == 2, "the killed try failed and the retry finished the batch"
    sent = _check_resumed_without_resending(batch_api, dag_id, done_at_kill, sent_at_kill)
    resumed = [r for r in _requests_to(batch_api, dag_id) if r.received_at > killed_at]
    assert resumed and all(int(r.path.rsplit("/", 1)[1]) not in done_at_kill for r in resumed)
    _, final = _journal(stack, dag_id)
    assert len(_done_paths(final)) == ITEMS
    print(f"[case 14] worker: {sum(sent.values())} requests for {ITEMS} items; sent twice (the window): "
          f"{sorted(i for i, c in sent.items() if c > 1)}")


def test_a_batch_whose_triggerer_is_killed_resumes_in_the_new_triggerer_without_resending(stack, batch_api):
    dag_id = DAG_IDS["triggerer"]
    run_id = stack.trigger(dag_id)
    _wait_until_mid_batch(stack, dag_id)

    triggerer = stack.find_processes("triggerer")
    trees = sorted({p for pid in triggerer for p in [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]})
    killed = _sigkill(trees)
    killed_at = time.time()
    _, records = _journal(stack, dag_id)
    done_at_kill, sent_at_kill = _done_paths(records), _requests_by_index(batch_api, dag_id)
    print(f"\n[case 14] killed the triggerer {killed} with {len(done_at_kill)} of {ITEMS} done, "
          f"{sum(sent_at_kill.values())} sent")
    assert killed, "the triggerer was found and killed"
    assert KILL_AFTER <= len(done_at_kill) < ITEMS, "the kill came mid-batch"
    time.sleep(3 * ANSWER_DELAY)
    assert _requests_by_index(batch_api, dag_id) == sent_at_kill, "nothing was sent while no triggerer ran"

    took = stack.restart([dag_id])
    run = stack.wait_for_run(dag_id, run_id, timeout=240)

    ti = stack.task_instance(dag_id, run_id, "batch")
    assert run["state"] == "success", failure_summary(stack.task_log(dag_id, run_id, "batch", ti["try_number"]))
    assert ti["try_number"] == 1, "the new triggerer finished the batch: no try spent"
    sent = _check_resumed_without_resending(batch_api, dag_id, done_at_kill, sent_at_kill)
    resumed = [r for r in _requests_to(batch_api, dag_id) if r.received_at > killed_at]
    assert resumed and all(int(r.path.rsplit("/", 1)[1]) not in done_at_kill for r in resumed)
    summary = {e["key"]: e["value"] for e in stack.xcom_entries(dag_id, run_id, "batch")}["return_value"]
    summary = summary if isinstance(summary, dict) else json.loads(summary)
    assert summary["succeeded"] == ITEMS and summary["failed"] == 0
    print(f"[case 14] triggerer: stack back in {took:.0f}s; {sum(sent.values())} requests for {ITEMS} items; "
          f"sent twice (the window): {sorted(i for i, c in sent.items() if c > 1)}")

    # Cleared afterwards, the task finds every request done and sends nothing.
    before = sum(_requests_by_index(batch_api, dag_id).values())
    stack.clear_task(dag_id, run_id, ["batch"])
    stack.wait_for("the cleared batch to finish again",
                   lambda: (t := stack.task_instance(dag_id, run_id, "batch"))["try_number"] == 2 and t["state"] == "success",
                   timeout=120)
    assert sum(_requests_by_index(batch_api, dag_id).values()) == before, "a cleared batch sends nothing done"
