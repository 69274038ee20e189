"""A subclass hook behaves the same after a deferred wait as before it: its request is sent from a worker.

The triggerer runs only the operator's own behaviour. One small subclass per extension
point, each through real Airflow (``dag.test()``, which runs the trigger in-line) against a
scripted server that answers ``429, Retry-After: 1`` first: each waits in the triggerer,
then sends from a worker, where its hook runs, and the hook's effect shows on the request
sent after the wait. An operator that replaces nothing sends from the triggerer, and the
server cannot tell the two apart.
"""

from __future__ import annotations

import pytest

from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag, run_source
from tests.support.dag_runner import SendCounter
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

IMPORTS = """
from datetime import datetime, timedelta
from network_requests import NetworkRequestOperator, PermanentRequestError
from network_requests.rate_limit import Outcome, RateLimitWait, WaitSource, classify
"""

# name -> (subclass body, scripted answers after the first 429, what the second request or the XCom shows)
HOOKS = {
    "classify_response": (
        '''
    def classify_response(self, response):
        if response.ok and response.json().get("error") == "ratelimited":
            return Outcome.RATE_LIMITED
        return super().classify_response(response)
''',
        [ScriptedResponse(body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "1"}),
         ScriptedResponse(body={"ok": True})],
        lambda api, task: task.xcom == {"ok": True} and api.request_count == 3,
    ),
    "rate_limit_wait": (
        '''
    def rate_limit_wait(self, response, *, now, consecutive_waits):
        millis = response.headers.get("X-Retry-In-Ms")
        if millis is None:
            return super().rate_limit_wait(response, now=now, consecutive_waits=consecutive_waits)
        return RateLimitWait(int(millis) / 1000, WaitSource.BACKOFF, now + timedelta(milliseconds=int(millis)))
''',
        [ScriptedResponse(status=429, headers={"X-Retry-In-Ms": "1500"}), ScriptedResponse(body={"ok": True})],
        lambda api, task: 1.5 <= api.gaps()[1] < 60,
    ),
    "result_of": (
        '''
    def result_of(self, response, url):
        return {"status": response.status_code, "etag": response.headers.get("ETag")}
''',
        [ScriptedResponse(body="big body", headers={"ETag": '"v42"'})],
        lambda api, task: task.xcom == {"status": 200, "etag": '"v42"'},
    ),
    "request_kwargs": (
        '''
    def request_kwargs(self):
        kwargs = super().request_kwargs()
        kwargs["json"] = {"name": "widget"}
        return kwargs
''',
        [ScriptedResponse(body={"ok": True})],
        lambda api, task: api.requests[1].json() == {"name": "widget"},
    ),
    "request_headers": (
        '''
    def request_headers(self):
        return {**super().request_headers(), "X-Trace": "t-1"}
''',
        [ScriptedResponse(body={"ok": True})],
        lambda api, task: api.requests[1].header("X-Trace") == "t-1",
    ),
    "read_body": (
        '''
    def read_body(self, response, url):
        super().read_body(response, url)
        response._content = response.content.upper()
''',
        [ScriptedResponse(body="shout")],
        lambda api, task: task.xcom == "SHOUT",
    ),
    "refuse_redirect_to_another_origin": (
        '''
    def refuse_redirect_to_another_origin(self, response, *args, **kwargs):
        if response.is_redirect:  # stricter: no redirect at all, even on the same host
            raise PermanentRequestError("no redirects here", method=self.method, url=response.url)
''',
        [ScriptedResponse(status=302, headers={"Location": "/api/v2"})],
        lambda api, task: task.state == "failed" and api.request_count == 2,
    ),
    "checked_endpoint": (
        '''
    def checked_endpoint(self, endpoint):
        return super().checked_endpoint(endpoint).replace("/v1/", "/v2/")
''',
        [ScriptedResponse(body={"ok": True})],
        lambda api, task: [r.path for r in api.requests] == ["/v2/users", "/v2/users"],
    ),
    "check_output_path": (
        '''
    def check_output_path(self):
        print("checked the output path")  # a hook with a side effect only
        super().check_output_path()
''',
        [ScriptedResponse(body={"ok": True})],
        lambda api, task: task.xcom == {"ok": True},
    ),
    "send_request": (
        '''
    def send_request(self, endpoint, url):
        response, elapsed = super().send_request(endpoint, url)
        response.headers["X-Seen-By"] = "subclass"
        return response, elapsed
''',
        [ScriptedResponse(body={"ok": True})],
        lambda api, task: task.xcom == {"ok": True},
    ),
}


def _run_subclass(request, scripted_api, monkeypatch, body: str, task_kwargs: str = ""):
    dag_id = dag_id_for(request)
    source = IMPORTS + f"\nclass Hooked(NetworkRequestOperator):\n    pass\n{body}\n" + one_task_dag(
        dag_id, f"Hooked(task_id='t', endpoint='/v1/users'{task_kwargs})"
    )
    sends = SendCounter(monkeypatch)
    return run_source(dag_id, source, base_url=scripted_api.base_url).task("t"), sends


@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_subclass_hook_waits_in_the_triggerer_and_runs_on_the_worker(request, scripted_api, monkeypatch, hook):
    body, answers, shows = HOOKS[hook]
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), *answers)

    task, sends = _run_subclass(request, scripted_api, monkeypatch, body)

    assert (sends.worker, sends.triggerer) == (scripted_api.request_count, 0), "every request sent from a worker"
    assert scripted_api.gaps()[0] >= 1.0, "after waiting out the 429"
    assert shows(scripted_api, task), f"{hook}: the hook's effect on the request after the wait"


@pytest.mark.parametrize("method, data", [("GET", "{'page': 2, 'q': 'a b'}"), ("POST", "{'name': 'widget'}")])
def test_without_overrides_the_triggerer_sends_what_the_worker_would(request, scripted_api, monkeypatch, method, data):
    seen = {}
    for finish_in_triggerer in (True, False):
        scripted_api.clear()
        scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": 1}))
        kwargs = f", method={method!r}, data={data}, headers={{'X-Tenant': 'acme'}}, finish_in_triggerer={finish_in_triggerer}"
        task, sends = _run_subclass(request, scripted_api, monkeypatch, "", kwargs)
        assert sends.triggerer == (1 if finish_in_triggerer else 0)
        after_wait = scripted_api.requests[1]
        seen[finish_in_triggerer] = (
            task.state, task.xcom, after_wait.method, after_wait.path, after_wait.query, after_wait.body,
            {name: after_wait.header(name) for name in ("Content-Type", "X-Tenant", "Accept", "User-Agent")},
        )

    assert seen[True] == seen[False]
    assert seen[True][0] == "success"
