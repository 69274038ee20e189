"""The shipped DAGs, run through real Airflow (dag.test()) against the real demo API on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TEST_DAGS_DIR
from tests.support.dag_runner import collect, load_dag, run_dag, set_connection

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def demo_api():
    """The project's demo API with its default limit, as `make run` starts it."""
    from include.demo_api import DEFAULT_BURST, DEFAULT_RATE_PER_S, make_server

    server = make_server("127.0.0.1", 0, rate=DEFAULT_RATE_PER_S, burst=DEFAULT_BURST)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    set_connection(f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


PERIODIC_ASSET = "network_request_periodic_responses"


def asset_events_of_run(asset_name: str, run_id: str) -> list:
    """The events a DAG run emitted for the Asset, as a consumer task receives them."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.sdk.api.datamodels._generated import AssetReferenceAssetEventDagRun
    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent, AssetModel).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == asset_name, AssetEvent.source_run_id == run_id)
        ).all()
        return [
            AssetEventDagRunReferenceResult(
                asset=AssetReferenceAssetEventDagRun(name=asset.name, uri=asset.uri, extra=asset.extra or {}),
                extra=event.extra, source_task_id=event.source_task_id, source_dag_id=event.source_dag_id,
                source_run_id=event.source_run_id, source_map_index=event.source_map_index, source_aliases=[],
                timestamp=event.timestamp,
            )
            for event, asset in rows
        ]


def installed_dag(name: str) -> Path:
    """dag.test() needs the DAG file inside the (test) dags folder."""
    target = TEST_DAGS_DIR / name
    shutil.copy(REPO_ROOT / "dags" / name, target)
    return target


def test_periodic_dag_waits_out_the_rate_limit_and_saves_every_endpoint(demo_api):
    import time

    started = time.monotonic()
    result = run_dag(installed_dag("network_request_periodic.py"), "network_request_periodic")
    elapsed = time.monotonic() - started

    fetches = [task for (task_id, _), task in result.tasks.items() if task_id == "fetch"]
    assert result.state == "success"
    assert len(fetches) == 6
    assert all(task.state == "success" for task in fetches)
    assert all(task.try_number == 1 for task in fetches), "rate limits must not spend retries"
    served = demo_api.stats.snapshot()
    assert served["responses_2xx"] == 6, "each endpoint fetched exactly once"
    # dag.test() runs the mapped tasks one after another, so each of the three beyond the
    # burst waits its 5 s turn at the shared gate (in-process, under the 5 s threshold) and
    # the gate's RateLimit-Remaining: 0 keeps them from ever meeting a 429.
    assert served["responses_429"] == 0
    beyond_burst = 6 - demo_api.bucket.burst
    assert elapsed >= beyond_burst / demo_api.bucket.rate_per_s - 1, "faster than the API allows"
    for task in fetches:
        saved = Path(task.xcom["path"])
        assert saved.is_file() and json.loads(saved.read_text())
        assert "network_request_periodic" in saved.parts
    # Each saved response is an event of the Asset the consumer DAG is scheduled on.
    events = asset_events_of_run(PERIODIC_ASSET, result.run_id)
    assert sorted(event.extra["path"] for event in events) == sorted(task.xcom["path"] for task in fetches)
    for event in events:
        saved = Path(event.extra["path"])
        assert event.extra == {"path": str(saved), "status_code": 200, "bytes": saved.stat().st_size,
                               "content_type": "application/json"}


def test_consumer_dag_summarizes_the_responses_the_periodic_run_saved(demo_api):
    """The consumer's task reads the extra of the events a periodic run emitted (the scheduler's part,
    handing them over as triggering_asset_events, is checked in the embedded stack: tests/e2e)."""
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    periodic = run_dag(installed_dag("network_request_periodic.py"), "network_request_periodic")
    consumer = load_dag(installed_dag("network_request_consumer.py"), "network_request_consumer")
    events = asset_events_of_run(PERIODIC_ASSET, periodic.run_id)

    summary = consumer.get_task("summarize").python_callable(
        triggering_asset_events=TriggeringAssetEventsAccessor.build(events))

    assert summary["responses"] == 6
    assert summary["status_codes"] == {"200": 6}
    assert summary["paths"] == sorted(event.extra["path"] for event in events)
    assert summary["bytes"] == sum(Path(path).stat().st_size for path in summary["paths"]) > 0


def test_consumer_dag_run_by_hand_summarizes_no_event(demo_api):
    dag = load_dag(installed_dag("network_request_consumer.py"), "network_request_consumer")

    dag_run = dag.test()

    task = collect("network_request_consumer", dag_run.run_id, str(dag_run.state)).task("summarize")
    assert task.state == "success"
    assert task.xcom == {"responses": 0, "bytes": 0, "status_codes": {}, "paths": []}


def test_once_dag_fetches_the_endpoint_given_in_conf(demo_api):
    dag = load_dag(installed_dag("network_request_once.py"), "network_request_once")

    dag_run = dag.test(run_conf={"endpoint": "/api/items/42"})

    result = collect("network_request_once", dag_run.run_id, str(dag_run.state))
    task = result.task("request")
    assert result.state == "success"
    saved = Path(task.xcom["path"])
    assert json.loads(saved.read_text())["item"]["id"] == 42


def test_once_dag_posts_a_json_body(demo_api):
    dag = load_dag(installed_dag("network_request_once.py"), "network_request_once")

    dag_run = dag.test(run_conf={"endpoint": "/api/echo", "method": "POST", "body": {"hello": "world"}})

    task = collect("network_request_once", dag_run.run_id, str(dag_run.state)).task("request")
    assert task.state == "success"
    assert "world" in Path(task.xcom["path"]).read_text()


@pytest.mark.parametrize(
    ("conf", "named_param"),
    [
        ({"endpoint": "https://evil.example/steal"}, "endpoint"),
        ({"endpoint": "//evil.example/steal"}, "endpoint"),
        ({"endpoint": "/api/../../etc/passwd"}, "endpoint"),
        ({"endpoint": "/api/users\r\nX-Injected: 1"}, "endpoint"),
        ({"method": "TRACE"}, "method"),
        ({"initial_delay_seconds": -5}, "initial_delay_seconds"),
        ({"body": "not an object"}, "body"),
    ],
)
def test_once_dag_refuses_bad_conf_before_any_request(demo_api, conf, named_param):
    from airflow.sdk.exceptions import ParamValidationError

    dag = load_dag(installed_dag("network_request_once.py"), "network_request_once")
    requests_before = demo_api.stats.snapshot()["requests_total"]

    with pytest.raises(ParamValidationError) as refused:
        dag.test(run_conf=conf)

    assert named_param in str(refused.value)
    assert demo_api.stats.snapshot()["requests_total"] == requests_before, "no request for a refused conf"
