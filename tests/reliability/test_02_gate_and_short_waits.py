"""The shared gate and short waits: two bugs these tests found, now fixed, and a race that stays.

1. **A failed first request held the shared gate for 10 s.** On first contact with an API the
   gate lets one request go ahead to learn the limits (``probe_until``) and holds every other
   task of the Connection until that request reports. A request that got *no response*
   (connection refused, timeout, reset, body over ``max_response_bytes``) raised before
   ``_gate_observe`` and never reported, so for ``gate.PROBE_TIMEOUT_SECONDS`` (10 s) every task
   of the Connection waited in 1 s rechecks, the task's own retry included: a retry_delay of 1 s
   became about 10 s. Fixed: the operator releases the probe when the request raises
   (``gate.release_probe``).

2. **Short reschedules can cost a try.** A task that reschedules itself for a second or two can
   be marked failed or up_for_retry by the scheduler: the executor's "finished" event of the
   previous, rescheduled run of the task arrives after the task was queued again with the same
   try_number, and Airflow 3.3.2 takes it for a task killed externally ("Executor ... reported
   that the task instance ... finished with state success, but the task instance's state
   attribute is queued"; apache/airflow#71172). The gate's 1 s rechecks and any
   ``Retry-After: 1`` produced exactly that, and the shipped periodic DAG (6 tasks, one
   Connection) is the pattern. Now, with ``deferrable=False``, waits up to
   ``in_process_wait_threshold`` (5 s) are slept in the task and no reschedule is due sooner
   than ``MIN_RESCHEDULE_DELAY`` (10 s). The race is Airflow's and depends on timing (a
   supervisor was seen reporting 5.4 s late under load), so its test stays a non-strict xfail.
   The default, ``deferrable=True``, is kept out of the race (the last test here).
"""

from __future__ import annotations

import pytest

from tests.support.scripted_api import ScriptedResponse

from . import dag_sources
from .conftest import DAG_IDS

pytestmark = pytest.mark.reliability


class HeldByTheGate(AssertionError):
    """The retry waited for the shared gate's probe timeout."""


def test_a_first_request_without_a_response_does_not_hold_the_retry_at_the_gate(request, scripted_api):
    from network_requests.gate import PROBE_TIMEOUT_SECONDS

    from tests.conftest import TEST_DAGS_DIR
    from tests.support.dag_runner import operator_dag_source, run_dag, set_connection, write_dag_file

    # The connection is closed without an answer (a ConnectionError), then the API answers.
    scripted_api.script(ScriptedResponse.close(), ScriptedResponse(body={"ok": True}))
    set_connection(scripted_api.base_url)
    dag_id = "reliability_gate_probe_release"
    source = operator_dag_source(dag_id, "endpoint='/api/users'", "{'retries': 1, 'retry_delay': timedelta(seconds=1)}")
    result = run_dag(write_dag_file(TEST_DAGS_DIR, dag_id, source), dag_id)

    task = result.task("request")
    assert result.state == "success"
    assert task.try_number == 2
    assert scripted_api.request_count == 2
    gap = scripted_api.gaps()[0]
    print(f"\n[gate] retry_delay 1 s; the retry's request came {gap:.1f}s after the failed one")
    if gap >= PROBE_TIMEOUT_SECONDS - 1:
        raise HeldByTheGate(f"the retry came {gap:.1f}s after a 1 s retry_delay: held by the gate's probe")
    assert gap < 6


def _run_short_waits(stack, api, case: str, label: str):
    """Every task of the case's DAG gets SHORT_WAIT_429S answers of ``429 Retry-After: 1``, then
    a 200; run the DAG and return its task instances and run id (asserting the run succeeded)."""
    dag_id = DAG_IDS[case]
    for index in range(dag_sources.SHORT_WAIT_TASKS):
        api.route(
            f"/{case}/item/{index}",
            *[ScriptedResponse.too_many_requests(retry_after=1)] * dag_sources.SHORT_WAIT_429S,
            ScriptedResponse(body={"item": index}),
        )

    run_id = stack.trigger(dag_id)
    run = stack.wait_for_run(dag_id, run_id, timeout=180)

    tis = stack.task_instances(dag_id, run_id)
    summary = [(ti["task_id"], ti["state"], ti["try_number"]) for ti in tis]
    print(f"\n[{label}] {summary}")
    assert run["state"] == "success", summary
    return tis, summary, run_id


@pytest.mark.xfail(
    strict=False,
    reason="race in Airflow 3.3.2 + LocalExecutor (apache/airflow#71172): a reschedule due in a second "
    "or two can be taken for an externally killed task and spend a try; flaky by nature, so not strict",
)
def test_short_rate_limit_waits_never_cost_a_try(stack, api):
    tis, summary, _ = _run_short_waits(stack, api, "c12", "short waits")
    assert all(ti["try_number"] == 1 for ti in tis), f"a rate-limit wait spent a try: {summary}"


def test_short_rate_limit_waits_deferred_to_the_triggerer_never_cost_a_try(stack, api):
    """The same short waits with ``deferrable=True`` and nothing slept in the task: the first
    wait of ``Retry-After: 1`` is a deferral due a second later (no sooner than
    ``min_heartbeat_interval``, 1 s here), and the trigger sends the request itself and waits
    out the next 429s. Airflow 3.3.2 forgives the executor's late report of the deferring run
    while the task is back in ``scheduled`` or queued, and by the time it can run again the
    report is in: strict, no xfail."""
    tis, summary, run_id = _run_short_waits(stack, api, "c13", "deferred short waits")
    assert all(ti["try_number"] == 1 for ti in tis), f"a deferred rate-limit wait spent a try: {summary}"
    # After the first 429 each task waited and re-sent from the triggerer, which ended it
    # there (TaskSuccessEvent): its XCom is the response, pushed by the triggerer.
    results = {entry["task_id"]: entry["value"] for entry in stack.xcom_entries(DAG_IDS["c13"], run_id)
               if entry["key"] == "return_value"}
    assert results == {f"fetch_{index}": {"item": index} for index in range(dag_sources.SHORT_WAIT_TASKS)}
    worker_runs = {f"fetch_{index}": stack.task_log(DAG_IDS["c13"], run_id, f"fetch_{index}", 1).count("::group::Pre Execute")
                   for index in range(dag_sources.SHORT_WAIT_TASKS)}
    assert set(worker_runs.values()) == {1}, f"each task ran once on a worker, then only in the triggerer: {worker_runs}"
    for index in range(dag_sources.SHORT_WAIT_TASKS):
        times = [r.received_monotonic for r in api.requests_for(f"/c13/item/{index}")]
        assert len(times) == dag_sources.SHORT_WAIT_429S + 1, (index, len(times))
        # Each 429 asked for 1 s; the server sees the next request at least that much later.
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        print(f"[deferred short waits] fetch_{index}: gaps after each 429 {[round(g, 2) for g in gaps]}")
        assert min(gaps) >= 0.99, f"fetch_{index} re-sent before the 1 s Retry-After: {gaps}"
