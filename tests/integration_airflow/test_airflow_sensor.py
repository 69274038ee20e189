"""``NetworkRequestSensor`` through real Airflow (``dag.test()``) against a scripted server on 127.0.0.1.

Three ways to wait between pokes: ``deferrable`` (the trigger runs in-line under
``dag.test()`` and pokes from there), ``mode="reschedule"`` (``up_for_reschedule``; never
due sooner than MIN_RESCHEDULE_DELAY = 10 s, so those cases take ~10 s) and ``mode="poke"``.
The pure rules are tests/plugin/test_sensor.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag, run_source
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

IMPORTS = "from network_requests.sensors import NetworkRequestSensor\n"
MODES = {
    "deferrable": "deferrable=True",
    "reschedule": "deferrable=False, mode='reschedule'",
    "poke": "deferrable=False, mode='poke'",
}
#: A check the triggerer can import (by this path) as well as the worker.
BODY_CHECK = "tests.integration_airflow.test_airflow_sensor.body_says_ready"


def body_says_ready(response):
    """Ready when the JSON body says so; the body becomes the XCom."""
    from airflow.sdk import PokeReturnValue

    return PokeReturnValue(bool(response.json().get("ready")), xcom_value=response.json())


@pytest.fixture(autouse=True)
def quick_deferrals(monkeypatch):
    """A deferral from a worker is due no sooner than [workers] min_heartbeat_interval: 1 s, as in the project's stacks."""
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")


class Sends:
    """Counts the pokes sent from a worker and from the triggerer (a spy: the real senders send)."""

    def __init__(self, monkeypatch) -> None:
        from network_requests import sending, sending_async

        self.worker = self.triggerer = 0
        real_sync, real_async = sending.send, sending_async.send

        def sync_spy(*args, **kwargs):
            self.worker += 1
            return real_sync(*args, **kwargs)

        async def async_spy(*args, **kwargs):
            self.triggerer += 1
            return await real_async(*args, **kwargs)

        monkeypatch.setattr(sending, "send", sync_spy)
        monkeypatch.setattr(sending_async, "send", async_spy)


def run_sensor(request, api, tmp_path: Path, sensor_kwargs: str, default_args: str = "{'retries': 2}"):
    """``dag.test()`` a one-sensor DAG; return the task's result and how many times it ran on a worker."""
    runs = tmp_path / "worker_runs"
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        f"""
        NetworkRequestSensor(task_id="wait", http_conn_id="network_request_api", endpoint="/api/report",
                             {sensor_kwargs},
                             on_execute_callback=lambda context: open({str(runs)!r}, "a").write("run\\n"))
        """,
        default_args,
        imports=IMPORTS,
    )
    result = run_source(dag_id, body, base_url=api.base_url)
    worker_runs = len(runs.read_text().splitlines()) if runs.exists() else 0
    return result.task("wait"), worker_runs


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_a_429_is_waited_out_until_the_servers_time_without_spending_a_try(request, scripted_api, tmp_path,
                                                                          monkeypatch, mode):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=2), ScriptedResponse(body={"ready": True}))
    sends = Sends(monkeypatch)

    task, worker_runs = run_sensor(request, scripted_api, tmp_path, f"poke_interval=1, timeout=60, {MODES[mode]}")

    assert [r.response.status for r in scripted_api.requests] == [429, 200], "the first poke was rate limited"
    assert task.state == "success"
    assert task.try_number == 1, "the wait spent no try, though retries remain"
    assert scripted_api.gaps()[0] >= 2.0, "no request before the server's Retry-After"
    if mode == "deferrable":
        assert (sends.worker, sends.triggerer) == (1, 1), "the second poke was sent by the trigger"
        assert worker_runs == 2, "one run, and the resumption that returns the result"
    elif mode == "reschedule":
        assert task.reschedules == 1 and worker_runs == 2
        assert scripted_api.gaps()[0] >= 10.0, "a reschedule is never due sooner than MIN_RESCHEDULE_DELAY"
    else:
        assert worker_runs == 1, "poke mode sleeps in the worker"


@pytest.mark.parametrize(
    "mode, check, pokes_from",
    [
        ("poke", "lambda response: response.json()['ready']", "worker"),
        ("deferrable", repr(BODY_CHECK), "triggerer"),
        ("deferrable", "lambda response: response.json()['ready']", "worker"),
    ],
    ids=["poke_callable", "deferrable_import_path", "deferrable_callable"],
)
def test_not_ready_answers_are_poked_again_no_sooner_than_poke_interval(request, scripted_api, tmp_path, monkeypatch,
                                                                        mode, check, pokes_from):
    scripted_api.script(ScriptedResponse(body={"ready": False}), ScriptedResponse(body={"ready": False}))
    scripted_api.default_response = ScriptedResponse(body={"ready": True, "report": 7})
    sends = Sends(monkeypatch)

    task, _ = run_sensor(request, scripted_api, tmp_path,
                         f"poke_interval=1.5, timeout=60, response_check={check}, {MODES[mode]}")

    assert [r.response.body["ready"] for r in scripted_api.requests] == [False, False, True]
    assert task.state == "success" and task.try_number == 1
    assert min(scripted_api.gaps()) >= 1.5
    if pokes_from == "triggerer":
        assert (sends.worker, sends.triggerer) == (1, 2)
        assert task.xcom == {"ready": True, "report": 7}, "a PokeReturnValue's value is the XCom"
    else:
        assert (sends.worker, sends.triggerer) == (3, 0), "a callable check runs on the worker only"


@pytest.mark.parametrize("mode", ["deferrable", "poke"])
@pytest.mark.parametrize("soft_fail, state", [(True, "skipped"), (False, "failed")], ids=["soft_fail", "no_soft_fail"])
def test_a_sensor_that_never_sees_ready_times_out(request, scripted_api, tmp_path, mode, soft_fail, state):
    scripted_api.default_response = ScriptedResponse(status=404, body={"error": "not yet"})

    task, _ = run_sensor(request, scripted_api, tmp_path,
                         f"poke_interval=1, timeout=3, not_ready_status_codes=[404], soft_fail={soft_fail}, "
                         f"{MODES[mode]}", default_args="{'retries': 1}")

    assert {r.response.status for r in scripted_api.requests} == {404}, "never ready"
    assert (task.state, task.try_number) == (state, 1), "a timeout is not retried"
    # Pokes at 0, 1, 2, 3 s at the most: the next one would fall after the 3 s timeout.
    assert 2 <= scripted_api.request_count <= 4
    assert min(scripted_api.gaps()) >= 1.0


def test_the_timeout_counts_from_the_first_poke_across_reschedules(request, scripted_api, tmp_path):
    scripted_api.default_response = ScriptedResponse(status=404, body={"error": "not yet"})

    task, worker_runs = run_sensor(request, scripted_api, tmp_path,
                                   "poke_interval=1, timeout=5, not_ready_status_codes=[404], soft_fail=True, "
                                   + MODES["reschedule"])

    assert (task.state, task.try_number) == ("skipped", 1)
    # The first poke, a reschedule (10 s minimum), a second poke already past the 5 s timeout.
    assert scripted_api.request_count == 2 and worker_runs == 2


@pytest.mark.parametrize(
    "script, mode, sent",
    [
        ([ScriptedResponse(status=404)], "poke", 1),
        ([ScriptedResponse(status=404)], "deferrable", 1),
        ([ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(status=404)], "deferrable", 2),
    ],
    ids=["on_the_worker", "deferrable_first_poke", "in_the_triggerer"],
)
def test_a_404_fails_at_once_despite_retries(request, scripted_api, tmp_path, script, mode, sent):
    scripted_api.script(*script)
    scripted_api.default_response = ScriptedResponse(body={"ready": True})

    task, _ = run_sensor(request, scripted_api, tmp_path, f"poke_interval=1, timeout=60, {MODES[mode]}",
                         default_args="{'retries': 3}")

    assert scripted_api.requests[-1].response.status == 404
    assert (task.state, task.try_number) == ("failed", 1)
    assert scripted_api.request_count == sent, "no poke after the 404"


def test_a_404_with_soft_fail_skips_as_airflow_sensors_do(request, scripted_api, tmp_path):
    scripted_api.script(ScriptedResponse(status=404))

    task, _ = run_sensor(request, scripted_api, tmp_path, "poke_interval=1, timeout=60, soft_fail=True, deferrable=False")

    assert task.state == "skipped"
    assert scripted_api.request_count == 1


def test_a_server_error_means_not_ready_yet_and_spends_no_try(request, scripted_api, tmp_path):
    scripted_api.script(ScriptedResponse(status=502, body={"e": 1}))
    scripted_api.default_response = ScriptedResponse(body={"ready": True})

    task, _ = run_sensor(request, scripted_api, tmp_path, "poke_interval=1, timeout=60, deferrable=True")

    assert [r.response.status for r in scripted_api.requests] == [502, 200]
    assert (task.state, task.try_number) == ("success", 1)
    assert scripted_api.gaps()[0] >= 1.0


def test_a_server_error_fails_the_try_when_told_and_the_retry_succeeds(request, scripted_api, tmp_path):
    scripted_api.script(ScriptedResponse(status=502, body={"e": 1}))
    scripted_api.default_response = ScriptedResponse(body={"ready": True})

    task, _ = run_sensor(request, scripted_api, tmp_path,
                         "poke_interval=1, timeout=60, transient_errors_mean_not_ready=False, deferrable=False",
                         default_args="{'retries': 1, 'retry_delay': timedelta(seconds=1)}")

    assert [r.response.status for r in scripted_api.requests] == [502, 200]
    assert (task.state, task.try_number) == ("success", 2)
    assert len(task.earlier_tries) == 1, "one earlier, failed try"


def test_the_shipped_dag_waits_for_the_item_then_fetches_it(scripted_api):
    import shutil

    from tests.conftest import REPO_ROOT, TEST_DAGS_DIR
    from tests.support.dag_runner import run_dag, set_connection

    scripted_api.default_response = ScriptedResponse(body={"item": {"id": 42}})
    set_connection(scripted_api.base_url)
    path = TEST_DAGS_DIR / "network_request_wait_ready.py"
    shutil.copy(REPO_ROOT / "dags" / path.name, path)

    result = run_dag(path, "network_request_wait_ready")

    assert (result.task("wait_for_item").state, result.task("fetch_item").state) == ("success", "success")
    assert [r.path for r in scripted_api.requests] == ["/api/items/42", "/api/items/42"]
    assert Path(result.task("fetch_item").xcom["path"]).read_bytes() == b'{"item": {"id": 42}}'


@pytest.mark.parametrize("mode", ["poke", "deferrable"])
def test_a_block_another_task_recorded_at_the_shared_gate_holds_the_first_poke(request, scripted_api, tmp_path,
                                                                                monkeypatch, mode):
    """The sensor asks the operator's gate: a Retry-After another task met keeps its first poke back too.

    The gate lives in a MemoryGateStore (the Variable store needs a running task's SDK to be
    written from here); the worker and the trigger share it, as they share any store.
    """
    from datetime import datetime, timedelta, timezone

    from network_requests.gate_access import SharedGate, origin_of
    from network_requests.gate_store import MemoryGateStore
    from network_requests.rate_limit_headers import read_rate_limit_headers

    store = MemoryGateStore()
    for module in ("network_requests.request_seams", "network_requests.sensor_triggers"):
        monkeypatch.setattr(f"{module}.default_gate_store", lambda: store)
    now = datetime.now(timezone.utc)
    blocked_until = now + timedelta(seconds=3)
    gate = SharedGate(store, "network_request_api", origin_of(scripted_api.base_url))
    assert gate.tell(read_rate_limit_headers(429, {"Retry-After": "3"}, now=now), now=now,
                     rate_limited_until=blocked_until, ticket="another_dag|run|fetch|-1")
    scripted_api.default_response = ScriptedResponse(body={"ready": True})

    task, _ = run_sensor(request, scripted_api, tmp_path, f"poke_interval=1, timeout=60, {MODES[mode]}")

    assert task.state == "success" and task.try_number == 1
    assert scripted_api.request_count == 1
    assert scripted_api.requests[0].received_at >= blocked_until.timestamp(), "nothing sent while the gate was closed"
