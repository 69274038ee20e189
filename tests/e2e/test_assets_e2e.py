"""End to end: a periodic run's saved responses are asset events that start the consumer DAG.

`make run`'s stack (scripts/run_embedded.py) on a private AIRFLOW_HOME: the scheduler runs
`network_request_periodic` (unpaused, its schedule is due at once); each fetch that saved a
response emits an event of the Asset `network_request_periodic_responses` whose extra
describes the file (REST `/api/v2/assets/events`); the scheduler then starts
`network_request_consumer`, whose task summarises the events it was handed. Takes a few minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.embedded_stack import EmbeddedStack
from tests.support.rest_client import quote

pytestmark = [pytest.mark.e2e, pytest.mark.stack]

PRODUCER, CONSUMER = "network_request_periodic", "network_request_consumer"
ASSET = "network_request_periodic_responses"
FETCHES = 6  # the periodic DAG's endpoints
START_TIMEOUT = 300  # every component healthy, both DAGs parsed
RUN_TIMEOUT = 300  # a periodic run at the demo API's pace (burst 3, then one per 5 s), then the consumer's


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(tmp_path / "airflow-home") as stack:
        yield stack


def producer_events(stack: EmbeddedStack, run_id: str) -> list[dict] | None:
    """The run's events of the Asset; None when the API server could not answer this time
    (the SQLite stack once answered this listing 500 while the scheduler was busy)."""
    answer = stack.rest("GET", f"/api/v2/assets/events?source_dag_id={PRODUCER}&source_run_id={quote(run_id)}&limit=100")
    if not answer.ok:
        return None
    return [event for event in answer.json()["asset_events"] if event["name"] == ASSET]


def first_successful_run(stack: EmbeddedStack, dag_id: str) -> dict | None:
    return next((run for run in stack.dag_runs(dag_id) if run["state"] == "success"), None)


def test_saved_responses_are_asset_events_that_start_the_consumer_dag(stack: EmbeddedStack):
    stack.wait_ready([PRODUCER, CONSUMER], timeout=START_TIMEOUT)

    producer_run = stack.wait_for(f"a {PRODUCER} run to succeed", lambda: first_successful_run(stack, PRODUCER),
                                  RUN_TIMEOUT, interval=3)

    events = stack.wait_for("the run's asset events to be listed",
                            lambda: producer_events(stack, producer_run["dag_run_id"]), 60, interval=2)
    assert len(events) == FETCHES, "one event per saved response"
    for event in events:
        extra = event["extra"]
        assert set(extra) == {"path", "status_code", "bytes", "content_type"}, extra
        saved = Path(extra["path"])
        assert saved.is_relative_to(stack.data_dir / PRODUCER), saved
        assert (extra["status_code"], extra["bytes"]) == (200, saved.stat().st_size)
        assert event["source_task_id"] == "fetch"

    consumer_run = stack.wait_for(f"a {CONSUMER} run to succeed", lambda: first_successful_run(stack, CONSUMER),
                                  RUN_TIMEOUT, interval=3)
    assert consumer_run["run_type"] == "asset_triggered"
    run_id = consumer_run["dag_run_id"]
    upstream = stack.rest_json("GET", f"/api/v2/dags/{CONSUMER}/dagRuns/{quote(run_id)}/upstreamAssetEvents")["asset_events"]
    assert upstream and {event["source_dag_id"] for event in upstream} == {PRODUCER}
    [summary] = [entry["value"] for entry in stack.xcom_entries(CONSUMER, run_id, "summarize")
                 if entry["key"] == "return_value"]
    assert summary["responses"] == len(upstream), "the task read every event that started its run"
    assert summary["paths"] == sorted(event["extra"]["path"] for event in upstream)
    assert summary["bytes"] == sum(event["extra"]["bytes"] for event in upstream)
    assert summary["status_codes"] == {"200": len(upstream)}
