"""BatchRequestOperator through real Airflow (``dag.test()``, which runs the trigger in-line)
against a server on 127.0.0.1 that answers and counts per path: per-request outcomes,
failures and their retries, resuming without re-sending, a cleared task, mapped chunks with
a TaskFlow task downstream, and what the trigger's stored arguments hold."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.conftest import TEST_DAGS_DIR  # first: importing it drops AIRFLOW_CONN_NETWORK_REQUEST_API
from tests.reliability.servers import RoutedApi
from tests.support.dag_runner import DagRunResult, collect, load_dag, set_connection, write_dag_file
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

HEADER = '''
from datetime import timedelta
import pendulum
from airflow.sdk import DAG, task
from network_requests.batch import BatchRequestOperator, batch_results, chunked

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         default_args={default_args}) as dag:
'''


@pytest.fixture
def api():
    server = RoutedApi(default_response=ScriptedResponse(body={"ok": True})).start()
    set_connection(server.base_url)
    try:
        yield server
    finally:
        server.stop()


def _dag_id(request) -> str:
    return request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:200]


def _run(request, body: str, *, default_args: str = "{'retries': 0}", logical_date: datetime | None = None) -> DagRunResult:
    """``dag.test()`` a DAG named after the test whose body (indented under ``with DAG``) is given."""
    dag_id = _dag_id(request)
    source = HEADER.format(dag_id=dag_id, default_args=default_args) + "".join(
        f"    {line}\n" for line in body.strip().splitlines())
    path = write_dag_file(TEST_DAGS_DIR, dag_id, source)
    dag = load_dag(path, dag_id)
    run = dag.test(logical_date=logical_date, run_after=logical_date) if logical_date else dag.test()
    return collect(dag_id, run.run_id, str(run.state))


def _batch(requests, folder: Path, **kwargs) -> str:
    settings = ", ".join(f"{name}={value!r}" for name, value in kwargs.items())
    return (f'BatchRequestOperator(task_id="batch", http_conn_id="network_request_api", requests={requests!r}, '
            f'output_folder={str(folder)!r}, item_retry_delay=0.2{", " + settings if settings else ""})')


def _sent(api) -> Counter:
    return Counter(request.path for request in api.requests)


# -- outcomes per request ------------------------------------------------------------------------


def test_each_request_gets_its_own_outcome_and_the_xcom_is_a_summary(request, api, tmp_path):
    api.route("/flaky", ScriptedResponse(status=500, body={"error": "busy"}))  # then the default: 200
    api.route_default("/missing", ScriptedResponse(status=404, body={"error": "no such thing"}))
    api.route_default("/ok/2", ScriptedResponse(body={"id": 2}))
    requests = ["/ok/1", {"endpoint": "/ok/2", "output": "two.json"}, "/missing", "/flaky"]

    result = _run(request, _batch(requests, tmp_path, allow_failures=1))

    task = result.task("batch")
    assert task.state == "success"
    assert _sent(api) == {"/ok/1": 1, "/ok/2": 1, "/missing": 1, "/flaky": 2}, "a 404 once, a 500 tried again"
    summary = task.xcom
    assert {k: summary[k] for k in ("total", "succeeded", "failed", "not_done", "allowed_failures")} == {
        "total": 4, "succeeded": 3, "failed": 1, "not_done": 0, "allowed_failures": 1}
    assert [(f["index"], f["request"], f["status_code"]) for f in summary["failed_items"]] == [(2, "GET /missing", 404)]
    assert "no such thing" in summary["failed_items"][0]["error"]
    assert json.loads((tmp_path / "two.json").read_text()) == {"id": 2}
    assert json.loads((tmp_path / "flaky").read_text()) == {"ok": True}
    assert not (tmp_path / "missing").exists()
    assert len(json.dumps(summary)) < 2000, "the XCom holds no body"


def test_more_failures_than_allowed_fail_the_task_naming_them_and_a_4xx_is_not_retried(request, api, tmp_path, capfd):
    api.route_default("/missing", ScriptedResponse(status=404, body={"error": "gone"}))

    result = _run(request, _batch(["/ok/1", "/missing"], tmp_path), default_args="{'retries': 2, 'retry_delay': 1}")

    task = result.task("batch")
    assert (task.state, task.try_number) == ("failed", 1), "every failure permanent: a retry would fail the same way"
    assert _sent(api) == {"/ok/1": 1, "/missing": 1}
    output = capfd.readouterr()
    logged = output.out + output.err
    assert "BatchFailedPermanentlyError" in logged
    assert "1 of 2 requests failed (allowed: 0)" in logged and "[1] GET /missing" in logged


def test_a_request_that_keeps_failing_transiently_fails_the_try_and_the_retry_sends_only_it(request, api, tmp_path):
    api.route("/down", *[ScriptedResponse(status=503, body={"error": "down"})] * 3)  # max_tries_per_item=3

    result = _run(request, _batch(["/ok/1", "/down"], tmp_path),
                  default_args="{'retries': 1, 'retry_delay': timedelta(seconds=1)}")

    task = result.task("batch")
    assert (task.state, task.try_number) == ("success", 2), "a transient failure is worth an Airflow retry"
    assert _sent(api) == {"/ok/1": 1, "/down": 4}, "three tries in the first run; the retry sends /down alone"
    assert task.xcom["succeeded_in_earlier_tries"] == 1 and task.xcom["failed"] == 0


# -- resuming ---------------------------------------------------------------------------------------


def test_a_crash_between_an_answer_and_its_record_resends_that_request_alone_with_its_key(request, api, tmp_path,
                                                                                           monkeypatch):
    """The documented window: a process that dies after the server answered and before the
    journal line is written. Simulated in-process (dag.test() runs the trigger here): the 4th
    record fails as a crash would. The killed-process version is tests/reliability/test_11."""
    from network_requests.batch_checkpoint import Checkpoint

    real_record, records_seen = Checkpoint.record, []

    def crash_on_the_fourth(self, record):
        records_seen.append(record["index"])
        if len(records_seen) == 4:
            raise OSError("simulated crash between the answer and its record")
        return real_record(self, record)

    monkeypatch.setattr(Checkpoint, "record", crash_on_the_fourth)
    requests = [{"endpoint": f"/orders/{i}", "method": "POST", "data": json.dumps({"n": i})} for i in range(8)]

    result = _run(request, _batch(requests, tmp_path, max_in_flight=2),
                  default_args="{'retries': 1, 'retry_delay': timedelta(seconds=1)}")

    task = result.task("batch")
    assert (task.state, task.try_number) == ("success", 2)
    crashed = records_seen[3]
    assert records_seen[3] in records_seen[4:], "the crashed request was sent again by the retry"
    sent = _sent(api)
    assert sent[f"/orders/{crashed}"] == 2
    assert all(count == 1 for path, count in sent.items() if path != f"/orders/{crashed}"), (
        f"every request recorded as done was sent once: {sent}")
    keys = {}
    for recorded in api.requests:
        keys.setdefault(recorded.path, set()).add(recorded.header("Idempotency-Key"))
    assert all(len(found) == 1 for found in keys.values()), "every send of one request carries the same key"
    assert len({next(iter(found)) for found in keys.values()}) == 8, "each request its own key"
    assert task.xcom["succeeded"] == 8


def test_a_cleared_task_sends_nothing_that_already_succeeded(request, api, tmp_path):
    logical_date = datetime(2026, 3, 1, tzinfo=timezone.utc)
    body = _batch([f"/items/{i}" for i in range(5)], tmp_path)
    first = _run(request, body, logical_date=logical_date)
    assert first.task("batch").state == "success" and sum(_sent(api).values()) == 5

    again = _run(request, body, logical_date=logical_date)  # dag.test() clears the run of that date first

    task = again.task("batch")
    assert again.run_id == first.run_id, "the same DAG run, cleared"
    assert task.state == "success" and task.xcom["succeeded"] == 5
    assert sum(_sent(api).values()) == 5, "nothing sent again"


# -- where it runs, what the trigger holds -------------------------------------------------------------


def test_a_request_with_a_secret_header_is_sent_from_the_worker_and_never_written_to_disk(request, api, tmp_path):
    requests = ["/ok/1", {"endpoint": "/private", "headers": {"Authorization": "Bearer tok-987654"}}]

    result = _run(request, _batch(requests, tmp_path))

    assert result.task("batch").state == "success"
    assert [r.header("Authorization") for r in api.requests_for("/private")] == ["Bearer tok-987654"]
    assert not list(tmp_path.glob(".batch/*.requests.json")), "no request list for a triggerer"
    assert all(b"tok-987654" not in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())


def test_without_deferral_the_worker_sends_the_batch_itself(request, api, tmp_path):
    api.route("/flaky", ScriptedResponse(status=502, body={}))

    result = _run(request, _batch(["/ok/1", "/flaky"], tmp_path, deferrable=False))

    task = result.task("batch")
    assert task.state == "success" and task.xcom["succeeded"] == 2
    assert _sent(api) == {"/ok/1": 1, "/flaky": 2}
    assert not list(tmp_path.glob(".batch/*.requests.json"))


def test_a_request_list_the_triggerer_cannot_read_fails_the_try_sending_nothing(request, api, tmp_path, monkeypatch,
                                                                               capfd):
    from network_requests.batch_checkpoint import Checkpoint

    real_write = Checkpoint.write_manifest
    # As if the triggerer saw another folder than the worker (not shared): not the list it was given.
    monkeypatch.setattr(Checkpoint, "write_manifest", lambda self, items: real_write(self, items[:1]) and "0" * 64)

    result = _run(request, _batch(["/ok/1", "/ok/2"], tmp_path))

    assert result.task("batch").state == "failed"
    assert api.request_count == 0
    output = capfd.readouterr()
    assert "output_folder must be a folder the workers and the triggerer share" in output.out + output.err


def test_the_triggers_arguments_hold_settings_and_a_digest_not_thousands_of_requests(monkeypatch, tmp_path):
    from network_requests.batch import BatchRequestOperator
    from network_requests.batch_checkpoint import Checkpoint
    from network_requests.batch_trigger import BatchRequestTrigger
    from network_requests.request_spec import TaskRef

    monkeypatch.setenv("AIRFLOW_CONN_NETWORK_REQUEST_API", "http://robot:pa55word@127.0.0.1:1?X-Conn-Key=conn-s3cret")
    operator = BatchRequestOperator(task_id="t", requests=[f"/repos/{i}" for i in range(3000)], output_folder=str(tmp_path))
    settings = operator.settings(TaskRef("d", "r", "t"), 1)
    items = operator.plan()
    digest = Checkpoint(settings.output_folder, settings.request.task).write_manifest(items)

    classpath, kwargs = BatchRequestTrigger(settings.to_dict(), digest).serialize()
    stored = json.dumps(kwargs)

    assert classpath == "network_requests.batch_trigger.BatchRequestTrigger"
    assert len(stored) < 3000, f"{len(stored)} bytes for 3,000 requests"
    assert "/repos/" not in stored and "pa55word" not in stored and "conn-s3cret" not in stored
    assert BatchRequestTrigger(**json.loads(stored)).serialize()[1] == kwargs, "it survives the round trip"


def test_a_batch_with_outlets_ends_on_a_worker_so_its_asset_event_is_emitted(request, api, tmp_path, monkeypatch):
    """Airflow 3.3.2 emits no asset event for a task that ends in the triggerer: a batch with
    outlets hands the finished batch back to a worker, even where it could end in the triggerer."""
    from network_requests import batch_trigger
    from tests.plugin.test_assets import stored_asset_events

    asked: list[bool] = []

    def as_in_the_triggerer() -> bool:  # dag.test() runs the trigger in-line: act as the triggerer would
        asked.append(True)
        return True

    monkeypatch.setattr(batch_trigger, "in_the_triggerer", as_in_the_triggerer)
    asset = f"batch_{_dag_id(request)}"
    operator = _batch(["/ok/1", "/ok/2"], tmp_path).replace(
        "BatchRequestOperator(", f"BatchRequestOperator(outlets=[Asset({asset!r})], ")

    result = _run(request, "from airflow.sdk import Asset\n" + operator)

    task = result.task("batch")
    assert asked, "the trigger ran and asked where it runs"
    assert task.state == "success" and task.xcom["succeeded"] == 2
    assert _sent(api) == {"/ok/1": 1, "/ok/2": 1}, "handing back sends nothing again"
    events = stored_asset_events(asset)
    assert [(e["source_dag_id"], e["source_task_id"]) for e in events] == [(result.dag_id, "batch")]


def test_only_a_batch_without_outlets_may_end_in_the_triggerer(tmp_path):
    from airflow.sdk import Asset

    from network_requests.batch import BatchRequestOperator
    from network_requests.request_spec import TaskRef

    plain = BatchRequestOperator(task_id="a", requests=["/x"], output_folder=str(tmp_path))
    with_outlets = BatchRequestOperator(task_id="b", requests=["/x"], output_folder=str(tmp_path), outlets=[Asset("x")])

    assert plain.settings(TaskRef("d", "r", "a"), 1).finish_in_triggerer is True
    assert with_outlets.settings(TaskRef("d", "r", "b"), 1).finish_in_triggerer is False


# -- mapped chunks, and TaskFlow around a batch ------------------------------------------------------


def test_chunks_expand_into_mapped_batches_and_a_taskflow_task_reads_every_result(request, api, tmp_path):
    body = f'''
@task
def endpoints():
    return chunked([f"/items/{{i}}" for i in range(7)], 3)

@task
def report(summaries):
    results = [result for summary in summaries for result in batch_results(summary)]
    return {{"ok": sum(r["status"] == "ok" for r in results), "files": sorted(Path(r["path"]).name for r in results)}}

from pathlib import Path
summaries = BatchRequestOperator.partial(task_id="batch", http_conn_id="network_request_api",
                                         output_folder={str(tmp_path)!r}).expand(requests=endpoints())
report(summaries.output)
'''
    result = _run(request, body)

    mapped = [result.task("batch", index) for index in range(3)]
    assert [t.state for t in mapped] == ["success"] * 3
    assert [t.xcom["total"] for t in mapped] == [3, 3, 1]
    assert len({t.xcom["checkpoint"] for t in mapped}) == 3, "a checkpoint per chunk, one output folder"
    assert result.task("report").xcom == {"ok": 7, "files": [f"items_{i}" for i in range(7)]}
    assert sorted(_sent(api)) == [f"/items/{i}" for i in range(7)]
