"""Case 2: the task process is SIGKILLed in the middle of a request (the server holds its answer).

The supervisor that forked it sees it die, reports the try as failed, and Airflow retries it;
the second try writes the output file, once and whole.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.support.scripted_api import ScriptedResponse

from .conftest import DAG_IDS
from .helpers import failure_summary

pytestmark = pytest.mark.reliability

SECOND_BODY = {"try": 2, "payload": "x" * 20000}


def test_a_task_process_killed_mid_request_is_retried_and_writes_its_output_once(stack, servers):
    kill_api = servers.kill_api
    dag_id = DAG_IDS["c2"]
    kill_api.route("/c2/slow", ScriptedResponse(body={"try": 1}, delay_s=60), ScriptedResponse(body=SECOND_BODY))

    run_id = stack.trigger(dag_id)
    kill_api.wait_for_path("/c2/slow", 1, timeout=90)
    # The task process is the one holding the connection to the server; its parent is the
    # supervisor (a child of a LocalExecutor worker), which stays alive to report.
    pids = stack.wait_for("the task process", lambda: stack.processes_connected_to(kill_api.port), 15, 0.1)
    assert len(pids) == 1, pids
    task_pid = pids[0]
    supervisor = psutil.Process(task_pid).parent()
    print(f"\n[case 2] killing task process {task_pid} ({stack.cmdline(task_pid)!r}); "
          f"supervisor {supervisor.pid} ({stack.cmdline(supervisor.pid)!r})")
    os.kill(task_pid, signal.SIGKILL)
    killed_at = time.time()

    run = stack.wait_for_run(dag_id, run_id, timeout=150)

    ti = stack.task_instance(dag_id, run_id, "request")
    tries = stack.tries(dag_id, run_id, "request")
    try_1_log = stack.task_log(dag_id, run_id, "request", 1)
    assert run["state"] == "success", failure_summary(stack.task_log(dag_id, run_id, "request", ti["try_number"]))
    assert ti["try_number"] == 2, "the killed try is detected and retried once"
    assert tries[0]["state"] in ("up_for_retry", "failed"), tries
    print(f"[case 2] try 1 ended {tries[0]['state']}; log says:\n{failure_summary(try_1_log) or try_1_log[-1500:]}")
    requests = kill_api.requests_for("/c2/slow")
    assert len(requests) == 2
    assert requests[1].received_at > killed_at

    # The output: written by try 2 only, complete, nothing else in its folder.
    xcom = {e["key"]: e["value"] for e in stack.xcom_entries(dag_id, run_id, "request")}["return_value"]
    if isinstance(xcom, str):
        xcom = json.loads(xcom)
    path = Path(xcom["path"])
    expected = json.dumps(SECOND_BODY).encode()
    assert path.read_bytes() == expected
    assert xcom["bytes"] == len(expected)
    assert path.is_relative_to(stack.data_dir / dag_id)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no partial or second file"
    assert path.stat().st_mtime >= killed_at
