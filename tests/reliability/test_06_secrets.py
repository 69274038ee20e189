"""Case 9: the secrets of a Connection (a password, and an auth header and an API key in its
extra) never show up in what Airflow keeps of a run: task logs, XComs, rendered template fields.

The run has a 429 then a 200 (so the wait is logged too), and a second task whose DAG author
copied the API key of the Connection into a templated header.

Case 9q: an API key in the endpoint's query string (``?api_key=...``), rate limited once,
shows up nowhere but at the server: not in the task log, the stack's other logs, the output
of ``make run``, the Rate limits page or the "API endpoint" link.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.support.embedded_stack import DAGS_FOLDER_ENV
from tests.support.scripted_api import ScriptedResponse

from . import dag_sources
from .conftest import DAG_IDS, SECRET_API_KEY, SECRET_BEARER, SECRET_LOGIN, SECRET_PASSWORD

pytestmark = pytest.mark.reliability


def _carries_credentials(authorization: str) -> bool:
    scheme, _, value = authorization.partition(" ")
    if scheme == "Basic":
        return base64.b64decode(value).decode(errors="replace") == f"{SECRET_LOGIN}:{SECRET_PASSWORD}"
    return scheme == "Bearer" and value == SECRET_BEARER


def test_connection_secrets_appear_in_no_log_xcom_or_rendered_field(stack, api):
    dag_id = DAG_IDS["c9"]
    api.route("/c9/data", ScriptedResponse.too_many_requests(retry_after=3), ScriptedResponse(body={"ok": True}))
    api.route_default("/c9/templated", ScriptedResponse(body={"ok": "templated"}))

    run_id = stack.trigger(dag_id)
    run = stack.wait_for_run(dag_id, run_id, timeout=180)
    assert run["state"] == "success"

    # The secrets were really used (so not finding them below means something).
    sent = api.requests_for("/c9/data") + api.requests_for("/c9/templated")
    assert len(api.requests_for("/c9/data")) == 2
    assert any(_carries_credentials(r.header("Authorization") or "") for r in sent), [r.headers for r in sent]
    assert any(r.header("X-Api-Key") == SECRET_API_KEY for r in sent)

    secrets = {
        "password": SECRET_PASSWORD,
        "bearer token": SECRET_BEARER,
        "API key": SECRET_API_KEY,
        "basic auth header": base64.b64encode(f"{SECRET_LOGIN}:{SECRET_PASSWORD}".encode()).decode(),
    }
    places: dict[str, str] = {}
    for path in stack.log_files(dag_id, run_id):
        places[f"log file {path.relative_to(stack.logs_dir)}"] = path.read_text(errors="replace")
    tis = stack.task_instances(dag_id, run_id)
    for ti in tis:
        places[f"rendered fields of {ti['task_id']}"] = json.dumps(ti.get("rendered_fields"))
        for number in range(1, ti["try_number"] + 1):
            places[f"REST log of {ti['task_id']} try {number}"] = stack.rest_log(dag_id, run_id, ti["task_id"], number)
    for entry in stack.xcom_entries(dag_id, run_id):
        places[f"XCom {entry['task_id']}.{entry['key']}"] = json.dumps(entry["value"])
    # Beyond the brief: every other log of the stack, and what `make run` printed.
    for path in sorted(p for p in stack.logs_dir.rglob("*") if p.is_file()):
        places.setdefault(f"log file {path.relative_to(stack.logs_dir)}", path.read_text(errors="replace"))
    places["output of make run"] = stack.log_text()

    assert len([p for p in places if p.startswith("log file dag_id=")]) >= 3
    assert any(p.startswith("XCom") for p in places)
    leaks = [f"{name} in {place}" for place, text in places.items() for name, secret in secrets.items() if secret in text]
    templated = next(ti for ti in tis if ti["task_id"] == "templated_header")["rendered_fields"]
    print(f"\n[case 9] searched {len(places)} places for {len(secrets)} secrets; "
          f"rendered headers of templated_header: {templated.get('headers')}")
    assert not leaks, leaks


# -- Case 9q: a secret in the query string ---------------------------------------------------

QUERY_SECRET = "q53cr3t-ApiKey-81d4"
QUERY_DAG_ID = "rel_query_secret"
QUERY_PATH = "/c9q/items"


def _query_secret_dag() -> str:
    # Written by this test into the stack's DAGs folder: the Connection of case 9 (its
    # credentials must stay hidden too) and a literal key in the endpoint's query string.
    return dag_sources._dag(
        QUERY_DAG_ID,
        f"""
        NetworkRequestOperator(
            task_id="query_key", http_conn_id="rel_c9", endpoint="{QUERY_PATH}?api_key={QUERY_SECRET}&page=2",
        )
        """,
    )


def test_a_query_string_secret_appears_in_no_log_page_or_link(stack, api):
    (Path(stack.env[DAGS_FOLDER_ENV]) / f"{QUERY_DAG_ID}.py").write_text(_query_secret_dag().lstrip())
    stack.wait_for_dags([QUERY_DAG_ID], timeout=150)  # the DAG processor looks for new files every 30 s
    stack.set_paused(QUERY_DAG_ID, False)
    api.route(QUERY_PATH, ScriptedResponse.too_many_requests(retry_after=3), ScriptedResponse(body={"ok": True}))

    run_id = stack.trigger(QUERY_DAG_ID)
    run = stack.wait_for_run(QUERY_DAG_ID, run_id, timeout=180)
    assert run["state"] == "success", stack.log_tail()

    # The key really went to the server, twice (a 429, then the 200): the search below means something.
    received = api.requests_for(QUERY_PATH)
    assert [request.query for request in received] == [f"api_key={QUERY_SECRET}&page=2"] * 2

    places: dict[str, str] = {}
    task_logs = stack.log_files(QUERY_DAG_ID, run_id)
    for path in sorted(p for p in stack.logs_dir.rglob("*") if p.is_file()):
        places[f"log file {path.relative_to(stack.logs_dir)}"] = path.read_text(errors="replace")
    ti = stack.task_instance(QUERY_DAG_ID, run_id, "query_key")
    for number in range(1, ti["try_number"] + 1):
        places[f"REST log of try {number}"] = stack.rest_log(QUERY_DAG_ID, run_id, "query_key", number)
    places["output of make run"] = stack.log_text()
    page = stack.rest("GET", "/network-requests/")
    page_json = stack.rest("GET", "/network-requests/api/connections")
    places["Rate limits page"] = page.text
    places["Rate limits JSON"] = page_json.text
    places["wait history Variable"] = stack.variable("network_requests.waits.rel_c9") or ""
    links = stack.rest_json("GET", f"/api/v2/dags/{QUERY_DAG_ID}/dagRuns/{run_id}/taskInstances/query_key/links")
    places["API endpoint link"] = json.dumps(links)

    # Each place was really looked at, with the request in it, shown safely.
    assert task_logs and any("api_key=***&page=2" in places[f"log file {p.relative_to(stack.logs_dir)}"] for p in task_logs)
    assert page.ok and page_json.ok and "/c9q/items?api_key=***&amp;page=2" in page.text
    assert "c9q/items?api_key=***&page=2" in places["wait history Variable"]
    assert links["extra_links"]["API endpoint"] == f"{api.base_url}{QUERY_PATH}?api_key=***&page=2"
    leaks = [place for place, text in places.items() if QUERY_SECRET in text]
    # Not one of this case's promises: Airflow stores the rendered endpoint as written (the
    # Rendered Template tab) unless the operator registers the value with the masker first.
    rendered = json.dumps(ti.get("rendered_fields"))
    print(f"\n[case 9q] searched {len(places)} places; the secret in the rendered fields: {QUERY_SECRET in rendered}")
    assert not leaks, leaks
