"""``@network_request_task``: TaskFlow functions that return a request, sent by the operator (``dag.test()``)."""

from __future__ import annotations

import pytest

from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag, run_source, xcom_value
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

IMPORTS = "from network_requests.taskflow import network_request_task\n"


def test_a_returned_endpoint_is_sent_and_a_429_reschedules_without_spending_a_try(request, scripted_api):
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=2), ScriptedResponse(body={"id": 7}))
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        """
        @network_request_task(http_conn_id="network_request_api", retries=2, deferrable=False, in_process_wait_threshold=0)
        def user(user_id: int):
            return f"/api/users/{user_id}"

        user(7)
        """,
        imports=IMPORTS,
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    task = result.task("user")
    assert task.state == "success"
    assert task.try_number == 1 and task.reschedules == 1
    assert task.xcom == {"id": 7}
    assert [r.path for r in scripted_api.requests] == ["/api/users/7", "/api/users/7"]
    assert scripted_api.gaps()[0] >= 2.0
    assert xcom_value(dag_id, result.run_id, "user", "_link_ApiEndpointLink") == scripted_api.base_url + "/api/users/7"


def test_a_returned_request_dict_with_method_body_and_headers(request, scripted_api):
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        """
        @network_request_task(method="POST", headers={"X-Default": "1"})
        def create(order: dict):
            return {"endpoint": "/api/orders", "data": json.dumps(order),
                    "headers": {"Content-Type": "application/json", "X-Default": "1"}}

        create({"sku": "A-1", "qty": 2})
        """,
        imports="import json\n" + IMPORTS,
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    assert result.task("create").state == "success"
    (sent,) = scripted_api.requests
    assert sent.method == "POST" and sent.json() == {"sku": "A-1", "qty": 2}
    assert sent.header("Content-Type") == "application/json"


def test_mapping_over_returned_endpoints(request, scripted_api):
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        """
        @network_request_task
        def item(item_id):
            return f"/api/items/{item_id}"

        item.expand(item_id=[1, 2, 3])
        """,
        imports=IMPORTS,
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    assert sorted(t.state for t in result.tasks.values()) == ["success"] * 3
    assert sorted(r.path for r in scripted_api.requests) == ["/api/items/1", "/api/items/2", "/api/items/3"]


def test_a_function_returning_nonsense_fails_clearly(request, scripted_api):
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        """
        @network_request_task
        def bad():
            return 42

        bad()
        """,
        imports=IMPORTS,
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    assert result.task("bad").state == "failed"
    assert scripted_api.request_count == 0


def test_deferrable_comes_back_and_builds_the_request_again(request, scripted_api):
    """deferrable=True resumes in a new operator instance: the function runs again for the request."""
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": True}))
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        """
        @network_request_task(deferrable=True, in_process_wait_threshold=0)
        def report(name):
            return f"/api/reports/{name}"

        report("daily")
        """,
        imports=IMPORTS,
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    task = result.task("report")
    assert task.state == "success" and task.try_number == 1 and task.reschedules == 0
    assert [r.path for r in scripted_api.requests] == ["/api/reports/daily", "/api/reports/daily"]
    assert scripted_api.gaps()[0] >= 1.0
