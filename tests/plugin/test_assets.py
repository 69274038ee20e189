"""A task that saved a response describes the file in its Assets' events (issue 11, item 4).

The pure part (which ``extra``, on which outlets), then real Airflow: ``dag.test()`` against
a scripted server on 127.0.0.1, reading the asset events Airflow stored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from network_requests.output_assets import output_event_extra, record_output_events
from tests.conftest import TEST_DAGS_DIR
from tests.support.dag_runner import SendCounter, run_dag, set_connection, write_dag_file
from tests.support.scripted_api import ScriptedResponse

SAVED = {"path": "/data/run/users.json", "status_code": 200, "bytes": 12, "content_type": "application/json"}


# -- which extra ----------------------------------------------------------------------------


def test_the_extra_of_a_saved_response_is_its_description():
    assert output_event_extra(SAVED) == SAVED


def test_the_extra_keeps_the_page_count_of_a_paged_file_and_drops_other_keys():
    paged = {"path": "/data/all.json", "pages": 3, "bytes": 90, "content_type": "application/json", "x": 1}

    assert output_event_extra(paged) == {"path": "/data/all.json", "pages": 3, "bytes": 90,
                                         "content_type": "application/json"}


@pytest.mark.parametrize("result", [None, [SAVED], "text", {"users": [1, 2]}], ids=["none", "list", "text", "json"])
def test_a_result_that_names_no_saved_file_gives_no_extra(result):
    assert output_event_extra(result) is None


def test_each_asset_outlet_gets_the_extra_and_keeps_what_a_callback_set():
    from airflow.sdk import Asset, AssetAlias
    from airflow.sdk.execution_time.context import OutletEventAccessors

    saved, other, alias = Asset("saved"), Asset("other"), AssetAlias("by_alias")
    events = OutletEventAccessors()
    events[other].extra["note"] = "set by a callback"

    record_output_events(events, [saved, other, alias], SAVED)

    assert events[saved].extra == SAVED
    assert events[other].extra == {"note": "set by a callback", **SAVED}
    assert events[alias].extra == {} and events[alias].asset_alias_events == [], "an alias is left to the author"


def test_nothing_is_recorded_for_a_result_without_a_saved_file():
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import OutletEventAccessors

    events = OutletEventAccessors()

    assert record_output_events(events, [Asset("saved")], {"users": []}) is None
    assert len(events) == 0


# -- where the request is sent ----------------------------------------------------------


def test_a_task_with_outlets_sends_from_a_worker_because_the_triggerer_emits_no_asset_event():
    from airflow.sdk import Asset

    from network_requests import NetworkRequestOperator
    from network_requests.operators import _WORKER_ONLY
    from network_requests.request_spec import TaskRef
    from network_requests.where_to_send import why_send_from_worker

    plain = NetworkRequestOperator(task_id="plain", endpoint="/api/users", deferrable=True)
    with_outlets = NetworkRequestOperator(task_id="with_outlets", endpoint="/api/users", deferrable=True,
                                          outlets=[Asset("users")])

    assert plain.finishes_in_triggerer(), "the baseline: a plain GET may end in the triggerer"
    assert not with_outlets.finishes_in_triggerer()
    reason = why_send_from_worker(with_outlets, NetworkRequestOperator,
                                  lambda: with_outlets.request_spec(TaskRef("d", "r", "with_outlets")),
                                  worker_only=_WORKER_ONLY)
    assert reason is not None and "outlets" in reason


# -- through Airflow ----------------------------------------------------------------------


def asset_dag_source(dag_id: str, output_path: str, *, asset: str) -> str:
    return f'''
from datetime import timedelta
import pendulum
from airflow.sdk import DAG, Asset
from network_requests import NetworkRequestOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         default_args={{"retries": 1, "retry_delay": timedelta(seconds=1)}}) as dag:
    NetworkRequestOperator(task_id="request", http_conn_id="network_request_api", endpoint="/api/users",
                           output_path={output_path!r}, outlets=[Asset({asset!r})], deferrable=True)
'''


def stored_asset_events(asset_name: str) -> list[dict]:
    """The events Airflow stored for the Asset, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == asset_name).order_by(AssetEvent.id)
        ).all()
        return [{"extra": row.extra, "source_dag_id": row.source_dag_id, "source_run_id": row.source_run_id,
                 "source_task_id": row.source_task_id} for row in rows]


def run_asset_dag(request, scripted_api, tmp_path: Path):
    dag_id = request.node.name.replace("[", "_").replace("]", "")
    asset = f"saved_{dag_id}"
    set_connection(scripted_api.base_url)
    path = write_dag_file(TEST_DAGS_DIR, dag_id, asset_dag_source(dag_id, str(tmp_path / "users.json"), asset=asset))
    return run_dag(path, dag_id), asset


@pytest.mark.usefixtures("airflow_db")
def test_a_saved_response_emits_an_asset_event_whose_extra_describes_the_file(request, scripted_api, tmp_path):
    scripted_api.script(ScriptedResponse(body={"users": [1, 2]}))

    result, asset = run_asset_dag(request, scripted_api, tmp_path)

    task = result.task("request")
    assert task.state == "success"
    events = stored_asset_events(asset)
    assert len(events) == 1
    assert events[0]["extra"] == task.xcom, "the extra is the task's description of the saved file"
    assert set(events[0]["extra"]) == {"path", "status_code", "bytes", "content_type"}
    assert events[0]["extra"]["status_code"] == 200
    assert events[0]["extra"]["bytes"] == Path(events[0]["extra"]["path"]).stat().st_size
    assert (events[0]["source_dag_id"], events[0]["source_run_id"], events[0]["source_task_id"]) == (
        result.dag_id, result.run_id, "request")


@pytest.mark.usefixtures("airflow_db")
def test_after_a_deferred_rate_limit_wait_the_worker_sends_and_the_event_carries_the_extra(
        request, scripted_api, tmp_path, monkeypatch):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"users": [1]}))
    sends = SendCounter(monkeypatch)

    result, asset = run_asset_dag(request, scripted_api, tmp_path)

    task = result.task("request")
    assert task.state == "success" and task.try_number == 1
    assert task.reschedules == 0, "the wait was deferred, not rescheduled"
    assert scripted_api.request_count == 2, "the 429, then the request after the wait"
    assert (sends.worker, sends.triggerer) == (2, 0), "a task with outlets is sent from a worker"
    events = stored_asset_events(asset)
    assert [event["extra"] for event in events] == [task.xcom]
    assert events[0]["extra"]["bytes"] == Path(events[0]["extra"]["path"]).stat().st_size > 0


@pytest.mark.usefixtures("airflow_db")
def test_a_failed_request_emits_no_asset_event(request, scripted_api, tmp_path):
    scripted_api.script(ScriptedResponse(status=404))

    result, asset = run_asset_dag(request, scripted_api, tmp_path)

    assert result.task("request").state == "failed"
    assert scripted_api.request_count == 1, "the 404 was answered (not retried: permanent)"
    assert stored_asset_events(asset) == []
