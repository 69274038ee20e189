"""Case 7: hostile input.

* Endpoints that leave the Connection's host or path, given in a trigger conf through the real
  ``airflow dags trigger`` CLI: refused at trigger time, no run created, no request sent.
* The same endpoints hard-coded in a DAG: every task fails at run time, at once (no retry),
  with the reason, and no request reaches any server; a subclass that turned the endpoint
  check off is still stopped by the same-origin check.
* ``output_path`` templates that would escape the data folder: ``network_requests.safe_paths``
  (unit-tested here) and the operator's ``output_root`` guard that uses it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import DAG_IDS, HOSTILE_ENDPOINTS
from .helpers import assert_clear_failure

pytestmark = pytest.mark.reliability

ONCE = "network_request_once"


def _runs_of(stack, dag_id: str) -> set[str]:
    return {run["dag_run_id"] for run in stack.dag_runs(dag_id)}


def test_hostile_endpoints_in_a_trigger_conf_are_refused_by_the_cli(stack, servers):
    endpoints = [e.format(evil=servers.evil_hostport) for e in HOSTILE_ENDPOINTS]
    runs_before = _runs_of(stack, ONCE)

    def trigger(endpoint: str):
        return endpoint, stack.airflow("dags", "trigger", ONCE, "--conf", json.dumps({"endpoint": endpoint}))

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(trigger, endpoints))

    accepted = []
    for endpoint, result in results:
        output = result.stdout + result.stderr
        if result.returncode == 0 or "param endpoint" not in output:
            accepted.append((endpoint, result.returncode, output[-1500:]))
    assert not accepted, f"accepted or refused without naming the param: {accepted}"
    print(f"\n[case 7] {len(endpoints)} hostile endpoints refused by `airflow dags trigger`, e.g.: "
          f"{next(line for line in (results[0][1].stdout + results[0][1].stderr).splitlines() if 'param endpoint' in line)}")
    assert _runs_of(stack, ONCE) == runs_before, "a refused conf must not create a run"
    assert servers.evil.request_count == 0


def test_hostile_endpoints_hard_coded_in_a_dag_fail_at_run_time_without_a_request(stack, servers):
    dag_id = DAG_IDS["c7"]
    api, evil = servers.api, servers.evil
    sent_before = api.request_count

    run_id = stack.trigger(dag_id)
    run = stack.wait_for_run(dag_id, run_id, timeout=240)

    tis = {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id)}
    assert run["state"] == "failed"
    assert len(tis) == len(HOSTILE_ENDPOINTS) + 1
    not_failed_at_once = {t: (ti["state"], ti["try_number"]) for t, ti in tis.items() if (ti["state"], ti["try_number"]) != ("failed", 1)}
    assert not not_failed_at_once, f"every task must fail on its first try (retries=2 unused): {not_failed_at_once}"
    reasons = {}
    for task_id in tis:
        log = stack.task_log(dag_id, run_id, task_id, 1)
        reasons[task_id] = assert_clear_failure(log, "PermanentRequestError")
    loose = reasons.pop("loose_subclass")
    assert "outside the Connection's" in loose, loose
    assert f"127.0.0.1:{evil.port}" in loose
    for task_id, message in reasons.items():
        assert "endpoint" in message, f"{task_id}: {message}"
    print("\n[case 7] run-time refusals:\n" + "\n".join(f"  {t}: {m}" for t, m in sorted(reasons.items())) + f"\n  loose_subclass: {loose}")
    assert evil.request_count == 0, evil.requests
    assert api.request_count == sent_before, [r.path for r in api.requests[sent_before:]]


# -- output_path ------------------------------------------------------------------------


def test_a_run_id_cannot_carry_a_path_traversal_into_the_output_folder(stack):
    """network_request_once saves to <data>/network_request_once/<run id>/response; Airflow 3.3.2
    refuses a run id with '..' (and allowed_run_id_pattern has no '/'), so a run id cannot climb out."""
    runs_before = _runs_of(stack, ONCE)
    result = stack.airflow("dags", "trigger", ONCE, "--run-id", "..", "--conf", json.dumps({"endpoint": "/api/users"}))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "must not contain '..'" in output, output[-2000:]
    assert _runs_of(stack, ONCE) == runs_before


def test_safe_paths_keeps_writes_inside_the_data_folder(tmp_path):
    from network_requests.safe_paths import UnsafeOutputPathError, checked_output_path

    root = tmp_path / "data"
    (root / "dag").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "dag" / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "dag" / "link-in").symlink_to(root / "dag", target_is_directory=True)

    allowed = [
        f"{root}/dag/run_1/response.json",
        f"{root}/dag/../other-dag/x.json",  # '..' that stays inside
        f"{root}/dag/link-in/x.json",  # a symlink that stays inside
        f"file://{root}/dag/x.json",
        f"file://{root}/dag/caf%C3%A9.json",
    ]
    for path in allowed:
        assert checked_output_path(path, root) == path, path

    refused = [
        f"{root}/../outside/x.json",
        f"{root}/dag/../../outside/x.json",
        f"{root}/dag/link-out/x.json",  # a symlink that leads out
        f"{root}",  # the folder itself
        f"{root}/",
        f"{root}-sibling/x.json",  # a prefix is not a parent
        "/etc/cron.d/x",
        "relative/x.json",  # relative to the working directory, not the data folder
        f"file://{root}/../outside/x.json",
        f"file://{root}/%2e%2e/outside/x.json",  # percent-encoded '..' in a file:// URI
        "s3://bucket/data/x.json",  # object storage with a local root
        f"{root}/dag/x\0.json",
    ]
    for path in refused:
        with pytest.raises(UnsafeOutputPathError):
            checked_output_path(path, root)

    assert checked_output_path("s3://bucket/data/dag/x.json", "s3://bucket/data") == "s3://bucket/data/dag/x.json"
    for path in (
        "s3://bucket/data/../secrets/x",
        "s3://bucket/data/%2e%2e/secrets/x",
        "s3://other/data/x",
        "gs://bucket/data/x",
        "s3://bucket/database/x",
        f"{root}/x",
    ):
        with pytest.raises(UnsafeOutputPathError):
            checked_output_path(path, "s3://bucket/data")
    assert checked_output_path("/anywhere/x", None) == "/anywhere/x", "no root: no check"


def test_an_output_path_outside_output_root_is_refused_before_any_request(request, scripted_api, tmp_path):
    from tests.conftest import TEST_DAGS_DIR
    from tests.support.dag_runner import operator_dag_source, run_dag, set_connection, write_dag_file

    root = tmp_path / "data"
    root.mkdir()
    dag_id = "reliability_output_root_guard"
    set_connection(scripted_api.base_url)
    kwargs = (
        f"endpoint='/api/users', method='POST', output_root={str(root)!r}, "
        f"output_path={str(root)!r} + '/{{{{ dag_run.conf[\"name\"] }}}}.json'"
    )
    path = write_dag_file(TEST_DAGS_DIR, dag_id, operator_dag_source(dag_id, kwargs, "{'retries': 2, 'retry_delay': timedelta(seconds=1)}"))
    result = run_dag(path, dag_id, run_conf={"name": "../outside/escaped"})

    assert not (tmp_path / "outside" / "escaped.json").exists(), "written outside output_root"
    assert result.state == "failed"
    assert result.task("request").try_number == 1, "a path outside the root can never become valid: no retry"
    assert scripted_api.request_count == 0, "refused before the request (a POST must not be sent for nothing)"

    # And inside the root it writes as before.
    result = run_dag(path, dag_id, run_conf={"name": "inside"})
    assert result.state == "success"
    assert (root / "inside.json").is_file()
