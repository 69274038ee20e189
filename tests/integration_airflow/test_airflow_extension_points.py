"""Each documented extension point of ``NetworkRequestOperator``, shown by a tiny subclass.

Every test is an example to copy: the subclass lives in the DAG file, overrides one method,
and runs through real Airflow (``dag.test()``) against a scripted server.
"""

from __future__ import annotations

import json

import pytest

from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag, run_source
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

IMPORTS = """
from datetime import datetime, timedelta
from network_requests import NetworkRequestOperator, PermanentRequestError
from network_requests.rate_limit import Outcome, RateLimitWait, WaitSource, classify
"""


def run_subclass(request, scripted_api, subclass: str, task: str):
    dag_id = dag_id_for(request)
    body = IMPORTS + subclass + one_task_dag(dag_id, task)
    return run_source(dag_id, body, base_url=scripted_api.base_url).task("t")


def test_request_kwargs_adds_a_json_body_and_a_header(request, scripted_api):
    """request_kwargs(): what goes to HttpHook.run, e.g. json= and extra headers."""
    subclass = '''
class CreateItemOperator(NetworkRequestOperator):
    def request_kwargs(self):
        kwargs = super().request_kwargs()
        kwargs["json"] = {"name": "widget"}
        kwargs["headers"] = {**kwargs["headers"], "Idempotency-Key": self.task_id}
        return kwargs
'''
    task = run_subclass(request, scripted_api, subclass, "CreateItemOperator(task_id='t', endpoint='/api/items', method='POST')")

    assert task.state == "success"
    (sent,) = scripted_api.requests
    assert sent.method == "POST" and sent.json() == {"name": "widget"}
    assert sent.header("Idempotency-Key") == "t"


def test_checked_endpoint_tightens_which_paths_are_allowed(request, scripted_api):
    """checked_endpoint(): refuse (or allow) endpoints before anything is sent."""
    subclass = '''
class V2OnlyOperator(NetworkRequestOperator):
    def checked_endpoint(self, endpoint):
        endpoint = super().checked_endpoint(endpoint)
        if not endpoint.startswith("/api/v2/"):
            raise PermanentRequestError(f"only /api/v2/ here, not {endpoint}", method=self.method, url=endpoint)
        return endpoint
'''
    task = run_subclass(request, scripted_api, subclass, "V2OnlyOperator(task_id='t', endpoint='/admin/users')")

    assert task.state == "failed" and task.try_number == 1
    assert scripted_api.request_count == 0


def test_classify_response_maps_an_apis_own_rate_limit_signal(request, scripted_api):
    """classify_response(): a Slack-style 200 {"ok": false, "error": "ratelimited"} is a rate limit."""
    scripted_api.script(
        ScriptedResponse(body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "1"}),
        ScriptedResponse(body={"ok": True, "channels": []}),
    )
    subclass = '''
class SlackApiOperator(NetworkRequestOperator):
    def classify_response(self, response):
        if response.ok and response.json().get("error") == "ratelimited":
            return Outcome.RATE_LIMITED
        return classify(response.status_code, response.headers)
'''
    task = run_subclass(request, scripted_api, subclass, "SlackApiOperator(task_id='t', endpoint='/api/conversations.list', deferrable=False, in_process_wait_threshold=0)")

    assert task.state == "success" and task.try_number == 1 and task.reschedules == 1
    assert task.xcom == {"ok": True, "channels": []}
    assert scripted_api.gaps()[0] >= 1.0


def test_rate_limit_wait_reads_a_provider_specific_header(request, scripted_api):
    """rate_limit_wait(): how long to wait, here from a made-up X-Retry-In-Ms header."""
    scripted_api.script(
        ScriptedResponse(status=429, headers={"X-Retry-In-Ms": "1500"}),
        ScriptedResponse(body={"ok": True}),
    )
    subclass = '''
class MillisecondsOperator(NetworkRequestOperator):
    def rate_limit_wait(self, response, *, now, consecutive_waits):
        millis = response.headers.get("X-Retry-In-Ms")
        if millis is None:
            return super().rate_limit_wait(response, now=now, consecutive_waits=consecutive_waits)
        seconds = int(millis) / 1000
        return RateLimitWait(seconds, WaitSource.BACKOFF, now + timedelta(seconds=seconds))
'''
    task = run_subclass(
        request, scripted_api, subclass, "MillisecondsOperator(task_id='t', endpoint='/api/x', retry_delay=timedelta(minutes=5))"
    )

    assert task.state == "success" and task.try_number == 1
    assert 1.5 <= scripted_api.gaps()[0] < 60, "waited the header's 1.5 s, not retry_delay"


def test_result_of_decides_what_the_xcom_holds(request, scripted_api):
    """result_of(): the XCom of a success, here the status and the ETag instead of the body."""
    scripted_api.script(ScriptedResponse(body="big body", headers={"ETag": '"v42"'}))
    subclass = '''
class EtagOperator(NetworkRequestOperator):
    def result_of(self, response, url):
        return {"status": response.status_code, "etag": response.headers.get("ETag")}
'''
    task = run_subclass(request, scripted_api, subclass, "EtagOperator(task_id='t', endpoint='/api/report')")

    assert task.state == "success"
    assert task.xcom == {"status": 200, "etag": '"v42"'}


def test_subclasses_keep_the_api_endpoint_link(request, scripted_api):
    subclass = '''
class PlainSubclass(NetworkRequestOperator):
    pass
'''
    dag_id = dag_id_for(request)
    body = IMPORTS + subclass + one_task_dag(dag_id, "PlainSubclass(task_id='t', endpoint='/api/sub')")
    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    from tests.integration_airflow.airflow_helpers import xcom_value

    assert xcom_value(dag_id, result.run_id, "t", "_link_ApiEndpointLink") == scripted_api.base_url + "/api/sub"
    assert json.dumps(result.task("t").xcom)  # a JSON XCom as usual
