"""Case 3: the API refuses connections for a whole run of a periodic DAG, then comes back.

``rel_api_down`` runs every 60 s with retries=3, retry_delay=2 s, retry_exponential_backoff=2.
Its first run must spend every try with the backoff Airflow promises (the n-th retry waits at
least retry_delay * 2**(n-1): 2, 4, 8 s; Airflow adds up to as much again as jitter), then fail
with a message that names the URL and says it could not connect. Once a server listens on the
Connection's port again, the next scheduled run succeeds with nobody doing anything.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.support.scripted_api import ScriptedResponse

from . import dag_sources
from .conftest import DAG_IDS
from .helpers import assert_clear_failure, parse_time
from .servers import RoutedApi

pytestmark = pytest.mark.reliability


def test_api_down_for_a_whole_periodic_run_then_back(stack, servers):
    dag_id = DAG_IDS["c3"]
    port = servers.down_port
    url = f"http://127.0.0.1:{port}/c3/periodic"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the 'down' port must refuse connections"

    api_back: RoutedApi | None = None
    stack.set_paused(dag_id, False)
    try:
        failed_run = stack.wait_for(
            "a run to fail",
            lambda: next((r for r in stack.dag_runs(dag_id) if r["state"] == "failed"), None),
            timeout=150,
            interval=0.5,
        )
        # The API is back: a server on the Connection's port. Nobody touches Airflow.
        api_back = RoutedApi(port=port).start()
        api_back.route_default("/c3/periodic", ScriptedResponse(body={"back": True}))
        back_at = time.time()

        def next_run_finished():
            later = [
                r for r in stack.dag_runs(dag_id)
                if r["run_after"] > failed_run["run_after"] and r["state"] in ("success", "failed")
            ]
            return later[0] if later else None

        outcome = stack.wait_for("the next scheduled run to finish", next_run_finished, timeout=150, interval=1)
    finally:
        stack.set_paused(dag_id, True)
        if api_back is not None:
            api_back.stop()

    # The failed run: every try spent, with the configured backoff between them.
    run_id = failed_run["dag_run_id"]
    tries = stack.tries(dag_id, run_id, "request")
    assert [t["try_number"] for t in tries] == list(range(1, dag_sources.API_DOWN_RETRIES + 2))
    assert tries[-1]["state"] == "failed"
    gaps = [
        (parse_time(later["start_date"]) - parse_time(earlier["end_date"])).total_seconds()
        for earlier, later in zip(tries, tries[1:])
    ]
    minimums = [
        dag_sources.API_DOWN_RETRY_DELAY_S * dag_sources.API_DOWN_MULTIPLIER**n for n in range(len(gaps))
    ]
    print(f"\n[case 3] gaps between tries {[f'{g:.1f}s' for g in gaps]}, configured minimum {minimums}")
    for n, (gap, minimum) in enumerate(zip(gaps, minimums), start=1):
        assert gap >= minimum, f"retry {n} came {gap:.1f}s after the failure, before the {minimum}s backoff"
        # Airflow waits between 1x and 2x the backoff; the rest is scheduling and process start.
        assert gap < 2 * minimum + 20, f"retry {n} waited {gap:.1f}s for a {minimum}s backoff"

    last_log = stack.task_log(dag_id, run_id, "request", tries[-1]["try_number"])
    message = assert_clear_failure(last_log, "TransientRequestError", f"GET {url}", "could not connect")
    print(f"[case 3] final error: {message}")
    assert "could not connect" in stack.rest_log(dag_id, run_id, "request", tries[-1]["try_number"])

    # The next run, started by the schedule once the API was back.
    assert outcome["state"] == "success", f"the run after the outage failed too: {outcome}"
    assert parse_time(outcome["end_date"]).timestamp() > back_at
    next_tries = stack.tries(dag_id, outcome["dag_run_id"], "request")
    print(f"[case 3] next run {outcome['dag_run_id']} succeeded on try {next_tries[-1]['try_number']}")
