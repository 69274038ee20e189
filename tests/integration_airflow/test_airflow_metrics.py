"""Metrics through Airflow's own Stats: a StatsD listener on 127.0.0.1 receives them when a DAG meets a 429.

The DAG runs with ``dag.test()`` in a fresh Python process configured like a worker with
``[metrics] statsd_on``, so the Task SDK's stats module is set up from that config, as in
a real task process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import PLUGINS_DIR, REPO_ROOT, TEST_DAGS_DIR
from tests.integration_airflow.airflow_helpers import dag_id_for, one_task_dag
from tests.support.dag_runner import write_dag_file
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

# Airflow's StatsD logger imports the `statsd` client package ([metrics] statsd_on needs it).
pytest.importorskip("statsd", reason="the StatsD metrics test needs the statsd package (requirements-dev.txt)")


class StatsdListener:
    """Collects StatsD lines sent to a UDP socket on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.extend(line for line in data.decode(errors="replace").splitlines() if line)

    def __enter__(self) -> StatsdListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def metrics(self) -> dict[str, list[str]]:
        """name -> values with type (``"1|c"``, ``"1000.0|ms"``)."""
        found: dict[str, list[str]] = {}
        for line in self.lines:
            name, _, value = line.partition(":")
            found.setdefault(name, []).append(value)
        return found


RUNNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.support.dag_runner import run_dag
    result = run_dag(Path(sys.argv[1]), sys.argv[2])
    print("RESULT", result.state, result.task("fetch").state, result.task("fetch").try_number)
    """
)


def test_statsd_receives_request_and_wait_metrics_from_a_429(request, scripted_api):
    scripted_api.script(
        ScriptedResponse.too_many_requests(retry_after=1),
        # The second answer spends the quota: the gate then holds the next request back.
        ScriptedResponse(body={"ok": 1}, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"}),
        ScriptedResponse(body={"ok": 2}),
    )
    dag_id = dag_id_for(request)
    body = one_task_dag(
        dag_id,
        """
        first = NetworkRequestOperator(task_id='fetch', http_conn_id='metrics.api', endpoint='/api/users')
        second = NetworkRequestOperator(task_id='again', http_conn_id='metrics.api', endpoint='/api/users')
        first >> second
        """,
        imports="from network_requests import NetworkRequestOperator",
    )
    path = write_dag_file(TEST_DAGS_DIR, dag_id, "from datetime import timedelta\nimport pendulum\nfrom airflow.sdk import DAG\n" + body)

    with StatsdListener() as statsd:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PLUGINS_DIR), str(REPO_ROOT)]),
            # conn id "metrics.api": a dot, to check it becomes "_" in the per-connection names.
            "AIRFLOW_CONN_METRICS.API": scripted_api.base_url,
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
            # As make run: a deferral may be due 1 s from now, so the gate's wait below is
            # the 2 s the server asked, not stretched to the 5 s of Airflow's default.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        }
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", RUNNER, str(path), dag_id],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=240,
        )
        time.sleep(0.5)  # the last UDP datagrams
    assert result.returncode == 0, result.stderr[-4000:]
    assert "RESULT success success 1" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    elapsed = time.monotonic() - started
    metrics = statsd.metrics()

    # Requests by status class, tagged (name) and namespaced by the connection.
    assert metrics["airflow.network_requests.requests.4xx"] == ["1|c"]
    assert metrics["airflow.network_requests.requests.2xx"] == ["1|c", "1|c"]
    assert metrics["airflow.network_requests.conn.metrics_api.requests.4xx"] == ["1|c"]
    assert metrics["airflow.network_requests.conn.metrics_api.requests.2xx"] == ["1|c", "1|c"]
    assert metrics["airflow.network_requests.requests.rate_limited"] == ["1|c"]
    assert len(metrics["airflow.network_requests.request_duration"]) == 3
    # The 429's wait, by source, and its length (StatsD timers are in ms).
    assert metrics["airflow.network_requests.rate_limit.waits.retry_after"] == ["1|c"]
    (retry_after_ms,) = metrics["airflow.network_requests.rate_limit.wait_seconds.retry_after"]
    assert retry_after_ms.endswith("|ms") and float(retry_after_ms.split("|")[0]) == pytest.approx(1000, abs=150)
    # The second task was stopped by the shared gate before sending (quota spent): a guard hit.
    assert metrics["airflow.network_requests.gate.guard_hits"] == ["1|c"]
    assert metrics["airflow.network_requests.conn.metrics_api.gate.guard_hits"] == ["1|c"]
    assert metrics["airflow.network_requests.rate_limit.waits.shared_gate"] == ["1|c"]
    (gate_ms,) = metrics["airflow.network_requests.gate.wait_seconds"]
    assert 0 < float(gate_ms.split("|")[0]) <= 2500
    # Airflow's own task metrics go to the same place: it is the same Stats.
    assert any(name.startswith("airflow.ti.finish") for name in metrics)
    assert elapsed < 120
    assert scripted_api.request_count == 3
    assert scripted_api.gaps()[1] >= 2.0, "the gate let a request through before the quota reset"


GATE_FAILURE_EMITTER = textwrap.dedent(
    """
    from datetime import datetime, timezone
    from airflow.sdk.configuration import conf
    from airflow.sdk.observability.metrics import stats_utils
    from airflow.sdk._shared.observability.metrics import stats
    from network_requests import events, metrics
    from network_requests.events import GateUpdateFailedEvent

    # As the task runner does before a task runs (task_runner.main).
    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))
    metrics.install()
    events.emit(GateUpdateFailedEvent(
        conn_id="metrics.api", operation="observe",
        error="ConnectionError: redis://:hunter2@127.0.0.1:1/0 refused", at=datetime.now(timezone.utc),
    ))
    print("EMITTED")
    """
)


def test_statsd_counts_a_gate_update_failure_tagged_by_connection_without_the_error_text():
    with StatsdListener() as statsd:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PLUGINS_DIR), str(REPO_ROOT)]),
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
            # Tags in the StatsD lines, so the test sees what a tagging backend would get.
            "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
        }
        result = subprocess.run(
            [sys.executable, "-c", GATE_FAILURE_EMITTER], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120
        )
        time.sleep(0.5)  # the last UDP datagrams
    assert result.returncode == 0 and "EMITTED" in result.stdout, result.stderr[-4000:]
    metrics = statsd.metrics()
    assert metrics["airflow.network_requests.conn.metrics_api.gate_update_failed"] == ["1|c"]
    (tagged,) = [name for name in metrics if name.startswith("airflow.network_requests.gate_update_failed")]
    assert "conn_id=metrics.api" in tagged and "operation=observe" in tagged
    assert metrics[tagged] == ["1|c"]
    # The error text (which may quote a URL) stays out of every metric.
    assert not any("hunter2" in line or "redis" in line for line in statsd.lines), statsd.lines
