"""Case 9: the secrets of a Connection (a password, and an auth header and an API key in its
extra) never show up in what Airflow keeps of a run: task logs, XComs, rendered template fields.

The run has a 429 then a 200 (so the wait is logged too), and a second task whose DAG author
copied the API key of the Connection into a templated header.
"""

from __future__ import annotations

import base64
import json

import pytest

from tests.support.scripted_api import ScriptedResponse

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
