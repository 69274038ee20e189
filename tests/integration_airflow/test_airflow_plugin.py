"""The AirflowPlugin through real Airflow 3.3: registration, the "API endpoint" link, the listener.

DAGs run with ``dag.test()`` on the test SQLite DB against a scripted server on 127.0.0.1;
the link is then read back the way the UI does, from the API server's REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PLUGINS_DIR, REPO_ROOT
from tests.integration_airflow.airflow_helpers import (
    api_client,
    dag_id_for,
    delete_variable,
    one_task_dag,
    read_variable,
    run_source,
    token,
    xcom_value,
)
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

LINK_XCOM_KEY = "_link_ApiEndpointLink"


def test_the_plugin_registers_its_link_listener_page_and_nav_entry():
    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    assert errors == {}
    (plugin,) = [p for p in plugins if p.name == "network_requests"]
    assert str(plugin.source) == "$PLUGINS_FOLDER/network_requests_plugin.py"
    assert [link.name for link in plugin.operator_extra_links] == ["API endpoint"]
    assert [listener.__name__ for listener in plugin.listeners] == ["network_requests.metrics"]
    (app,) = plugin.fastapi_apps
    assert app["url_prefix"] == "/network-requests"
    (view,) = plugin.external_views
    assert view == {
        "name": "Rate limits",
        "href": "/network-requests/",
        "url_route": "rate-limits",
        "destination": "nav",
        "category": "browse",
    }
    # What the UI asks for to build its menu.
    response = api_client().get("/api/v2/plugins", headers={"Authorization": f"Bearer {token()}"})
    assert response.status_code == 200
    listed = {p["name"]: p for p in response.json()["plugins"]}
    assert listed["network_requests"]["external_views"][0]["url_route"] == "rate-limits"


def test_api_endpoint_link_is_the_request_url_without_credentials(request, scripted_api):
    """A task that was rescheduled once: the link points at the rendered endpoint, no user:password."""
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": True}))
    dag_id = dag_id_for(request)
    credentials_url = scripted_api.base_url.replace("http://", "http://user:s3cr3t@")
    body = one_task_dag(
        dag_id,
        "NetworkRequestOperator(task_id='fetch', endpoint='/api/users/{{ dag_run.conf.get(\"id\", 7) }}?api_key=k3y&page=2', "
        "deferrable=False, in_process_wait_threshold=0)",
        imports="from network_requests import NetworkRequestOperator",
    )

    result = run_source(dag_id, body, base_url=credentials_url, run_conf={"id": 42})

    task = result.task("fetch")
    assert task.state == "success" and task.reschedules == 1
    expected = f"{scripted_api.base_url}/api/users/42?api_key=***&page=2"
    assert xcom_value(dag_id, result.run_id, "fetch", LINK_XCOM_KEY) == expected
    # The UI reads it through the API server, which only has the serialized DAG.
    response = api_client().get(
        f"/api/v2/dags/{dag_id}/dagRuns/{result.run_id}/taskInstances/fetch/links",
        headers={"Authorization": f"Bearer {token()}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["extra_links"] == {"API endpoint": expected}
    assert "s3cr3t" not in response.text and "k3y" not in response.text


def test_mapped_tasks_each_get_their_own_link(request, scripted_api):
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        "NetworkRequestOperator.partial(task_id='fetch').expand(endpoint=['/api/a', '/api/b'])",
        imports="from network_requests import NetworkRequestOperator",
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    assert {key: task.state for key, task in result.tasks.items()} == {("fetch", 0): "success", ("fetch", 1): "success"}
    headers = {"Authorization": f"Bearer {token()}"}
    for map_index, path in ((0, "/api/a"), (1, "/api/b")):
        response = api_client().get(
            f"/api/v2/dags/{dag_id}/dagRuns/{result.run_id}/taskInstances/fetch/links",
            params={"map_index": map_index},
            headers=headers,
        )
        assert response.json()["extra_links"] == {"API endpoint": scripted_api.base_url + path}


def test_the_listener_records_rate_limit_waits_in_the_wait_history(request, scripted_api):
    """on_task_instance_running subscribes the history; the wait lands in network_requests.waits.<conn>."""
    conn_id = "history_api"
    key = f"network_requests.waits.{conn_id}"
    delete_variable(key)
    os.environ["AIRFLOW_CONN_HISTORY_API"] = scripted_api.base_url
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": True}))
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        f"NetworkRequestOperator(task_id='fetch', http_conn_id={conn_id!r}, endpoint='/api/orders', deferrable=False, in_process_wait_threshold=0)",
        imports="from network_requests import NetworkRequestOperator",
    )

    result = run_source(dag_id, body)

    assert result.task("fetch").state == "success"
    (wait,) = json.loads(read_variable(key))
    assert wait["source"] == "Retry-After"
    assert wait["seconds"] == pytest.approx(1.0, abs=0.2)
    assert wait["mode"] == "reschedule"
    assert wait["task"] == f"{dag_id}.fetch"
    assert wait["url"] == f"{scripted_api.base_url}/api/orders"
    # "until" is counted from the response, "at" is when the wait was recorded: on a busy
    # machine a little of the second has gone by then, never more than the whole.
    assert 0 < wait["until"] - wait["at"] <= wait["seconds"] + 0.01


def test_a_failing_history_write_never_fails_the_task(request, scripted_api, monkeypatch):
    from network_requests import wait_history

    def broken(event):
        raise RuntimeError("the Variable API is down")

    monkeypatch.setattr(wait_history, "record", broken)
    scripted_api.script(ScriptedResponse.too_many_requests(retry_after=1), ScriptedResponse(body={"ok": True}))
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        "NetworkRequestOperator(task_id='fetch', endpoint='/api/users')",
        imports="from network_requests import NetworkRequestOperator",
    )

    result = run_source(dag_id, body, base_url=scripted_api.base_url)

    assert result.task("fetch").state == "success"
    assert scripted_api.request_count == 2


DOUBLE_REGISTRATION_PROBE = textwrap.dedent(
    """
    import json, sys
    from airflow import plugins_manager
    from airflow.sdk import plugins_manager as sdk_plugins_manager
    core, core_errors = plugins_manager._get_plugins()
    sdk, sdk_errors = sdk_plugins_manager._get_plugins()
    print(json.dumps({
        "core": [[p.name, str(p.source)] for p in core], "core_errors": core_errors,
        "sdk": [[p.name, str(p.source)] for p in sdk], "sdk_errors": sdk_errors,
    }))
    """
)


@pytest.mark.parametrize("installed", [False, True], ids=["plugins-folder-only", "also-installed"])
def test_registered_once_whether_or_not_the_package_is_also_installed(tmp_path: Path, installed: bool):
    """Installed (entry point) *and* in the plugins folder: one plugin, no "already registered" error."""
    site = tmp_path / "site"
    site.mkdir()
    if installed:
        dist_info = site / "network_requests_airflow-0.0.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: network-requests-airflow\nVersion: 0.0.0\n")
        (dist_info / "entry_points.txt").write_text(
            "[airflow.plugins]\nnetwork_requests = network_requests_plugin:NetworkRequestsPlugin\n"
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGINS_DIR), str(REPO_ROOT)])}
    result = subprocess.run(
        [sys.executable, "-c", DOUBLE_REGISTRATION_PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    ours_core = [source for name, source in found["core"] if name == "network_requests"]
    ours_sdk = [source for name, source in found["sdk"] if name == "network_requests"]
    assert len(ours_core) == 1 and len(ours_sdk) == 1
    assert found["core_errors"] == {} and found["sdk_errors"] == {}
    if installed:
        assert ours_core[0].startswith("network-requests-airflow==0.0.0: ")
    else:
        assert ours_core[0] == "$PLUGINS_FOLDER/network_requests_plugin.py"


def test_the_api_server_reads_the_link_the_task_stored():
    """Deserialized (as on the API server), the plugin's link class serves NetworkRequestOperator and
    reads the XCom; subclasses keep Airflow's XComOperatorLink for the inherited class attribute."""
    import pendulum
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    from network_requests import NetworkRequestOperator
    from network_requests.github import GitHubApiOperator
    from network_requests.links import ApiEndpointLink

    with DAG("link_serialization", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
        NetworkRequestOperator(task_id="plain", endpoint="/x")
        NetworkRequestOperator.partial(task_id="mapped").expand(endpoint=["/a"])
        GitHubApiOperator(task_id="github", endpoint="/repos")

    encoded = DagSerialization.to_dict(dag)
    assert encoded["dag"]["tasks"][0]["__var"]["_operator_extra_links"] == {"API endpoint": "_link_ApiEndpointLink"}
    deserialized = DagSerialization.from_dict(encoded)
    links = {task.task_id: type(task.operator_extra_link_dict["API endpoint"]).__name__ for task in deserialized.tasks}
    assert links == {"plain": "ApiEndpointLink", "mapped": "ApiEndpointLink", "github": "XComOperatorLink"}
    # On the API server the link gets the serialized operator: no Connection is read there.
    plain = deserialized.get_task("plain")
    assert not isinstance(plain, NetworkRequestOperator)
    assert ApiEndpointLink().xcom_key == LINK_XCOM_KEY


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@api.example.com/v1/items", "https://api.example.com/v1/items"),
        ("https://api.example.com/v1/items?page=2", "https://api.example.com/v1/items?page=2"),
        ("https://api.example.com/v1?api_key=abc&page=2", "https://api.example.com/v1?api_key=***&page=2"),
        ("https://api.example.com/v1?access_token=t&sig=s", "https://api.example.com/v1?access_token=***&sig=***"),
    ],
)
def test_link_urls_never_show_credentials(url, shown):
    from network_requests.links import public_url

    assert public_url(url) == shown


def test_no_link_for_an_endpoint_the_task_refused():
    from network_requests import NetworkRequestOperator
    from network_requests.links import endpoint_url

    assert endpoint_url(NetworkRequestOperator(task_id="t", endpoint="https://evil.example/x")) == ""
    assert endpoint_url(NetworkRequestOperator(task_id="u", endpoint="/ok", http_conn_id="no_such_conn")) == ""
