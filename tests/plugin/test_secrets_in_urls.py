"""A secret in an endpoint's query string (``?api_key=...``) never leaves the request (issue 10, item 7).

The request itself carries it to the server; every log line, event, wait-history entry
and metric shows ``api_key=***`` instead. The unit tests check each place that stores or
sends a URL; the DAG test runs a real ``NetworkRequestOperator`` through ``dag.test()``
against a scripted server on 127.0.0.1 that rate-limits it once, and looks everywhere.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from network_requests import events, metrics, wait_history
from network_requests.endpoints import sensitive_query_values
from network_requests.events import AttemptEvent, GateUpdateFailedEvent, WaitEvent, describe_error
from tests.integration_airflow.airflow_helpers import dag_id_for, delete_variable, one_task_dag, read_variable, run_source
from tests.support.scripted_api import ScriptedResponse

SECRET = "SECRETVALUE123"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


class StatsRecorder:
    """Stands in for the Task SDK's stats module: what ``metrics`` would send, names and tags."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, str]]] = []

    def incr(self, name: str, tags: dict[str, str] | None = None) -> None:
        self.sent.append(("incr", name, dict(tags or {})))

    def timing(self, name: str, delta: Any, tags: dict[str, str] | None = None) -> None:
        self.sent.append(("timing", name, dict(tags or {})))

    def text(self) -> str:
        return json.dumps(self.sent)


@pytest.fixture
def stats(monkeypatch) -> StatsRecorder:
    recorder = StatsRecorder()
    monkeypatch.setattr(metrics, "_stats", lambda: recorder)
    return recorder


def wait_event(url: str) -> WaitEvent:
    return WaitEvent(
        conn_id="api", url=url, seconds=1.0, source="Retry-After", mode="in_process",
        not_before=NOW, at=NOW, task="d.t",
    )  # fmt: skip


# -- Each place a URL is kept -------------------------------------------------------------------


def test_a_wait_history_entry_never_stores_a_query_secret_even_if_the_event_carried_one():
    entry = wait_history.entry_of(wait_event(f"http://h/items?api_key={SECRET}&page=2"))
    assert entry["url"] == "http://h/items?api_key=***&page=2"


def test_a_wait_history_entry_stored_by_an_older_version_is_shown_without_its_secret():
    old = json.dumps([{"at": 1.0, "until": 2.0, "url": f"http://u:pw@h/items?token={SECRET}"}])
    (shown,) = wait_history.parse(old)
    assert shown["url"] == "http://h/items?token=***"


def test_metrics_put_no_url_in_any_name_or_tag(stats):
    url = f"http://h/items?api_key={SECRET}"
    metrics.on_event(AttemptEvent("api", "GET", url, 429, "rate_limited", 0.1, NOW))
    metrics.on_event(wait_event(url))
    metrics.on_event(GateUpdateFailedEvent("api", "observe", f"ConnectionError: {url}", NOW))
    assert len(stats.sent) >= 6, "the recorder saw the metrics"
    assert SECRET not in stats.text() and "http" not in stats.text()


def test_a_gate_failures_error_text_is_short_and_has_its_urls_redacted():
    error = ConnectionError(f"GET https://user:pw@api.example.com/x?access_token={SECRET} failed " + "x" * 400)
    described = describe_error(error)
    assert described.startswith("ConnectionError: GET https://api.example.com/x?access_token=*** failed")
    assert SECRET not in described and "pw@" not in described
    assert len(described) <= events.MAX_ERROR_CHARS


def test_sensitive_query_values_are_the_values_redact_url_masks_raw_and_decoded():
    url = "/items?api_key=abc%2Bdef&page=2&Token=t0ken#access_token=frag"
    assert sensitive_query_values(url) == ["abc%2Bdef", "abc+def", "t0ken", "frag"]
    assert sensitive_query_values("/items?page=2") == []


def test_the_listener_has_airflows_masker_hide_the_endpoints_query_secrets_in_any_log_line():
    from airflow.sdk._shared.secrets_masker import redact

    # What the HTTP hook logs at DEBUG: the full URL, which does not go through redact_url.
    line = "Sending 'GET' to url: http://h/items?api_key=SECRETVALUE456&page=2"
    assert "SECRETVALUE456" in redact(line), "not masked before"

    metrics.mask_endpoint_secrets(SimpleNamespace(endpoint="/items?api_key=SECRETVALUE456&page=2"))

    assert redact(line) == "Sending 'GET' to url: http://h/items?api_key=***&page=2"


def test_the_listener_ignores_a_task_without_a_string_endpoint():
    metrics.mask_endpoint_secrets(SimpleNamespace(endpoint=None))
    metrics.mask_endpoint_secrets(object())


# -- Through real Airflow -----------------------------------------------------------------------

#: The three places a task waits out the 429: in the worker, rescheduled, in the triggerer.
WAIT_MODES = {
    "in_process": ", in_process_wait_threshold=60",
    "reschedule": ", deferrable=False, in_process_wait_threshold=0",
    "defer": ", deferrable=True, in_process_wait_threshold=0",
}


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("mode", sorted(WAIT_MODES))
def test_a_query_secret_reaches_the_server_and_nothing_else_when_the_task_is_rate_limited(
    request, scripted_api, caplog, capsys, stats, mode
):
    conn_id = "secret_query_api"
    history_key = wait_history.variable_key(conn_id)
    delete_variable(history_key)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", scripted_api.base_url)
    request.addfinalizer(monkeypatch.undo)
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": True}))
    seen: list[Any] = []
    events.subscribe(seen.append)
    request.addfinalizer(lambda: events.unsubscribe(seen.append))
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        f"NetworkRequestOperator(task_id='fetch', http_conn_id={conn_id!r}, "
        f"endpoint='/items?api_key={SECRET}&page=2'{WAIT_MODES[mode]})",
        imports="from network_requests import NetworkRequestOperator",
    )
    caplog.set_level(logging.INFO)

    result = run_source(dag_id, body)

    # The fault happened, and the secret really went out: the test is not vacuous.
    assert result.task("fetch").state == "success"
    assert [received.query for received in scripted_api.requests] == [f"api_key={SECRET}&page=2"] * 2
    waits = [event for event in seen if isinstance(event, WaitEvent)]
    attempts = [event for event in seen if isinstance(event, AttemptEvent)]
    assert waits and len(attempts) == 2
    history = read_variable(history_key)
    assert history and "api_key=***&page=2" in history
    # dag.test() prints the task's log lines (structlog) to stdout; stdlib records reach caplog.
    printed = capsys.readouterr()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "api_key=***&page=2" in printed.out, "the operator's log lines about the request were captured"
    assert stats.sent, "metrics were sent"

    # ... and nowhere else.
    assert SECRET not in logged
    assert SECRET not in printed.out and SECRET not in printed.err
    assert not [event for event in seen if SECRET in repr(event)]
    assert all(event.url.endswith("?api_key=***&page=2") for event in [*waits, *attempts])
    assert SECRET not in history
    assert SECRET not in stats.text()
