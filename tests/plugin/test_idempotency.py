"""The Idempotency-Key (network_requests.idempotency): one key per task instance's request, on every send of it.

Through real Airflow (``dag.test()``, a scripted server on 127.0.0.1) and the pure parts directly.
"""

from __future__ import annotations

import uuid

import pytest

from network_requests.idempotency import header_value, idempotency_key, with_idempotency_key
from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag, run_source
from tests.support.dag_runner import SendCounter, run_operator_task
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_a_post_keeps_one_key_across_rate_limits_a_deferral_a_server_error_and_a_retry(request, scripted_api, monkeypatch):
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=1),
        ScriptedResponse.too_many_requests(retry_after=1),
        ScriptedResponse(status=500, body={"error": "boom"}),
        ScriptedResponse(status=201, body={"id": 42}),
    )
    sends = SendCounter(monkeypatch)

    result = run_operator_task(request, scripted_api.base_url, "endpoint='/api/orders', method='POST', data='{\"sku\": 1}'",
                               "{'retries': 1, 'retry_delay': timedelta(seconds=1)}")

    task = result.task("request")
    assert (task.state, task.try_number, task.xcom) == ("success", 2, {"id": 42})
    assert sends.triggerer >= 1 and sends.worker >= 2, "sent from the worker and from the triggerer"
    keys = [r.header("Idempotency-Key") for r in scripted_api.requests]
    assert len(keys) == 4
    expected = header_value(idempotency_key(result.dag_id, result.run_id, "request", -1))
    assert keys == [expected] * 4, "the same key on every send, across waits, a deferral and an Airflow retry"


def test_a_get_carries_no_key_by_default(request, scripted_api):
    result = run_operator_task(request, scripted_api.base_url, "endpoint='/api/users'")

    assert result.task("request").state == "success"
    assert scripted_api.requests[0].header("Idempotency-Key") is None


@pytest.mark.parametrize(
    "operator_kwargs, header, expected",
    [
        ("method='POST', headers={'idempotency-key': 'mine'}", "Idempotency-Key", "mine"),
        ("method='POST', idempotency_key=False", "Idempotency-Key", None),
        ("method='PUT', idempotency_key_methods=['PUT'], idempotency_key_header='X-Request-Id'", "X-Request-Id", "derived"),
        ("method='PATCH'", "Idempotency-Key", "derived"),
    ],
    ids=["user_header_wins", "switched_off", "other_name_and_method", "patch"],
)
def test_the_key_is_configurable(request, scripted_api, operator_kwargs, header, expected):
    result = run_operator_task(request, scripted_api.base_url, f"endpoint='/api/orders', {operator_kwargs}")

    assert result.task("request").state == "success"
    if expected == "derived":
        expected = header_value(idempotency_key(result.dag_id, result.run_id, "request", -1))
    assert scripted_api.requests[0].header(header) == expected


def test_mapped_tasks_get_one_key_each(request, scripted_api):
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        "NetworkRequestOperator.partial(task_id='post', http_conn_id='network_request_api', method='POST')"
        ".expand(endpoint=['/a', '/b'])",
        imports="from network_requests import NetworkRequestOperator",
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    by_path = {r.path: r.header("Idempotency-Key") for r in scripted_api.requests}
    assert by_path == {
        "/a": header_value(idempotency_key(dag_id, result.run_id, "post", 0)),
        "/b": header_value(idempotency_key(dag_id, result.run_id, "post", 1)),
    }


# -- the pure parts -------------------------------------------------------------------------------


def test_the_key_depends_only_on_the_task_instance():
    key = idempotency_key("dag", "run", "task", 3)

    assert key == idempotency_key("dag", "run", "task", 3), "deterministic: nothing in memory"
    assert uuid.UUID(key).version == 5
    assert len({key, idempotency_key("dag", "run2", "task", 3), idempotency_key("dag", "run", "task", 4),
                idempotency_key("dag", "run", "other", 3), idempotency_key("dag2", "run", "task", 3)}) == 5
    assert idempotency_key("a|b", "c", "d", -1) != idempotency_key("a", "b|c", "d", -1), "no ambiguous joins"


def test_the_header_is_an_rfc_8941_string_as_the_draft_asks():
    assert header_value("8e03978e-40d5-43e8-bc93-6894a57f9324") == '"8e03978e-40d5-43e8-bc93-6894a57f9324"'


@pytest.mark.parametrize(
    "method, headers, added",
    [("POST", {}, True), ("post", {}, True), ("PATCH", {}, True), ("GET", {}, False), ("PUT", {}, False),
     ("DELETE", {}, False), ("POST", {"IDEMPOTENCY-KEY": "x"}, False)],
)
def test_only_keyed_methods_get_a_key_and_a_users_header_wins(method, headers, added):
    result = with_idempotency_key(headers, method=method, key="k", header="Idempotency-Key", methods=("POST", "PATCH"))

    assert ("Idempotency-Key" in result) is added
    assert all(result[name] == value for name, value in headers.items())
