"""End to end: `make run`'s main job (scripts/run_embedded.py) on a private AIRFLOW_HOME.

Starts the whole stack (airflow standalone + the demo API) on free ports, triggers
`network_request_once` with the CLI, waits for the run to succeed, checks that a refused
conf is refused at trigger time, then stops the job with SIGINT and checks that no
process of that AIRFLOW_HOME is left. Takes about a minute.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.process_tree import alive, tree
from tests.support.embedded_stack import EmbeddedStack
from tests.support.ports import accepts_connections

pytestmark = [pytest.mark.e2e, pytest.mark.stack]

DAG_ID = "network_request_once"

START_TIMEOUT = 240  # API server healthy and the DAG parsed
RUN_TIMEOUT = 240  # a triggered run reaches a final state
STOP_TIMEOUT = 60  # run_embedded.py stops everything after SIGINT


def _json_rows(text: str) -> list[dict]:
    """The rows a CLI command printed with `-o json`: its last line that parses as JSON
    (warnings come before it); none when it printed "No data found" instead."""
    for line in reversed(text.splitlines()):
        if line.startswith("["):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return []


def dag_ids(stack: EmbeddedStack) -> set[str]:
    result = stack.airflow("dags", "list", "-o", "json", timeout=120)
    if result.returncode != 0:
        return set()
    return {dag["dag_id"] for dag in _json_rows(result.stdout)}


def runs(stack: EmbeddedStack) -> dict[str, str]:
    result = stack.airflow("dags", "list-runs", DAG_ID, "-o", "json", timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {run["run_id"]: run["state"] for run in _json_rows(result.stdout)}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(tmp_path / "airflow-home") as stack:
        yield stack


def test_embedded_stack_runs_a_triggered_request_and_stops_cleanly(stack: EmbeddedStack):
    started = time.monotonic()
    stack.wait_for("the API server to be healthy", lambda: stack.healthy(components=False), START_TIMEOUT, interval=1)
    print(f"API server healthy after {time.monotonic() - started:.1f}s")
    # The admin password: in its file only (not world-readable), not printed; it logs in.
    password_file = stack.home / "simple_auth_manager_passwords.json.generated"
    assert password_file.stat().st_mode & 0o077 == 0
    password = json.loads(password_file.read_text())["admin"]
    assert password not in stack.log_text()
    assert stack.token()  # POST /auth/token with it answered an access token

    stack.wait_for(f"{DAG_ID} to be parsed", lambda: DAG_ID in dag_ids(stack), START_TIMEOUT, interval=2)

    # A good conf: the run succeeds and saves the response under NETWORK_REQUESTS_DATA_DIR.
    run_id = f"e2e__{uuid.uuid4().hex[:12]}"
    result = stack.airflow(
        "dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps({"endpoint": "/api/users"})
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def run_finished() -> bool:
        return runs(stack).get(run_id) in ("success", "failed")

    stack.wait_for(f"run {run_id} to finish", run_finished, RUN_TIMEOUT, interval=3)
    assert runs(stack)[run_id] == "success", stack.log_tail()
    response = stack.home / "data" / DAG_ID / run_id / "response"
    assert response.is_file(), f"no saved response at {response}"

    # A conf with a full URL as endpoint is refused when triggered, with a message that says why.
    refused = stack.airflow("dags", "trigger", DAG_ID, "--conf", json.dumps({"endpoint": "https://evil.example/x"}))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-3000:]
    assert "param endpoint" in output, output[-3000:]  # "Invalid input for param endpoint: ..."
    assert set(runs(stack)) == {run_id}, "the refused conf must not create a run"

    # Ctrl-C stops everything it started: every process below run_embedded.py just before
    # (it is a child subreaper, so orphans stay below it), and anything else of that home.
    processes = tree(stack.proc.pid)
    assert len(processes) >= 8, f"the stack looks incomplete: {processes}"
    assert stack.stop(signal.SIGINT, timeout=STOP_TIMEOUT) == 0, stack.log_tail()
    assert alive(processes) == []
    assert stack.leftover_processes() == []
    for port in (stack.port, stack.demo_port):
        assert not accepts_connections(port), f"port {port} still answers"
