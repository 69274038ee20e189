"""End to end: `make run`'s main job (scripts/run_embedded.py) on a private AIRFLOW_HOME.

Starts the whole stack (airflow standalone + the demo API) on free ports, triggers
`network_request_once` with the CLI, waits for the run to succeed, checks that a refused
conf is refused at trigger time, then stops the job with SIGINT and checks that no
process of that AIRFLOW_HOME is left. Takes about a minute.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "run_embedded.py"
DAG_ID = "network_request_once"

START_TIMEOUT = 240  # API server healthy and the DAG parsed
RUN_TIMEOUT = 240  # a triggered run reaches a final state
STOP_TIMEOUT = 60  # run_embedded.py stops everything after SIGINT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_run_embedded():
    spec = importlib.util.spec_from_file_location("run_embedded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_environ(home: Path) -> dict[str, str]:
    """os.environ without any Airflow setting (tests/conftest.py sets some for unit tests)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW_", "AIRFLOW__")) and key != "NETWORK_REQUESTS_DATA_DIR"
    }
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW_PORT=str(_free_port()),
        DEMO_API_PORT=str(_free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """{pid: (ppid, start time, state)} of every live process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path("/proc", entry, "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return table


def _tree(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of `root` and all its live descendants."""
    table = _proc_table()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.add((pid, table[pid][1]))
            todo.extend(child for child, (ppid, _, _) in table.items() if ppid == pid)
    return found


def _still_alive(processes: set[tuple[int, str]]) -> list[int]:
    table = _proc_table()
    return sorted(pid for pid, started in processes if pid in table and table[pid][1] == started)


def _processes_of(home: Path) -> list[str]:
    """Live processes (other than this one) whose command line or environment names `home`.

    Not enough on its own: processes that set their title (api-server, LocalExecutor
    workers, task processes) overwrite the memory /proc shows as their environment.
    """
    needle = str(home).encode()
    found = []
    for pid in _proc_table():
        if pid == os.getpid():
            continue
        try:
            cmdline = Path("/proc", str(pid), "cmdline").read_bytes()
            environ = Path("/proc", str(pid), "environ").read_bytes()
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {command}")
    return found


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


class Stack:
    def __init__(self, home: Path):
        self.home = home
        self.env = _clean_environ(home)
        self.cli_env = _load_run_embedded().airflow_env(self.env)
        self.port = int(self.env["AIRFLOW_PORT"])
        self.log_path = home.parent / "run_embedded.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT)],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"run_embedded.py exited with {self.proc.returncode}:\n{self.log_tail()}")

    def airflow(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.port}/api/v2/monitor/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def dag_ids(self) -> set[str]:
        result = self.airflow("dags", "list", "-o", "json")
        if result.returncode != 0:
            return set()
        return {dag["dag_id"] for dag in _json_rows(result.stdout)}

    def runs(self) -> dict[str, str]:
        result = self.airflow("dags", "list-runs", DAG_ID, "-o", "json")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return {run["run_id"]: run["state"] for run in _json_rows(result.stdout)}

    def stop(self, sig: int = signal.SIGINT) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll()

    def kill_everything(self) -> None:
        """The test's own clean-up, whatever the assertions said."""
        assert self.proc is not None
        if self.proc.poll() is None:
            processes = _tree(self.proc.pid)
            if self.stop(signal.SIGINT) is None:
                for pid in _still_alive(processes):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        for line in _processes_of(self.home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        self.log.close()


def _wait_for(what: str, condition, timeout: float, stack: Stack, interval: float = 2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        stack.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{stack.log_tail()}")
        time.sleep(interval)


@pytest.fixture
def stack(tmp_path: Path):
    stack = Stack(tmp_path / "airflow-home")
    stack.start()
    try:
        yield stack
    finally:
        stack.kill_everything()


def test_embedded_stack_runs_a_triggered_request_and_stops_cleanly(stack: Stack):
    started = time.monotonic()
    _wait_for("the API server to be healthy", stack.healthy, START_TIMEOUT, stack, interval=1)
    print(f"API server healthy after {time.monotonic() - started:.1f}s")
    # The admin password: in its file only (not world-readable), not printed; it logs in.
    password_file = stack.home / "simple_auth_manager_passwords.json.generated"
    assert password_file.stat().st_mode & 0o077 == 0
    password = json.loads(password_file.read_text())["admin"]
    assert password not in stack.log_path.read_text(errors="replace")
    login = urllib.request.Request(
        f"http://127.0.0.1:{stack.port}/auth/token",
        data=json.dumps({"username": "admin", "password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(login, timeout=30) as response:
        assert "access_token" in json.loads(response.read())

    _wait_for(f"{DAG_ID} to be parsed", lambda: DAG_ID in stack.dag_ids(), START_TIMEOUT, stack)

    # A good conf: the run succeeds and saves the response under NETWORK_REQUESTS_DATA_DIR.
    run_id = f"e2e__{uuid.uuid4().hex[:12]}"
    result = stack.airflow(
        "dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps({"endpoint": "/api/users"})
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def run_finished() -> bool:
        return stack.runs().get(run_id) in ("success", "failed")

    _wait_for(f"run {run_id} to finish", run_finished, RUN_TIMEOUT, stack, interval=3)
    assert stack.runs()[run_id] == "success", stack.log_tail()
    response = stack.home / "data" / DAG_ID / run_id / "response"
    assert response.is_file(), f"no saved response at {response}"

    # A conf with a full URL as endpoint is refused when triggered, with a message that says why.
    refused = stack.airflow("dags", "trigger", DAG_ID, "--conf", json.dumps({"endpoint": "https://evil.example/x"}))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-3000:]
    assert "param endpoint" in output, output[-3000:]  # "Invalid input for param endpoint: ..."
    assert set(stack.runs()) == {run_id}, "the refused conf must not create a run"

    # Ctrl-C stops everything it started: every process below run_embedded.py just before
    # (it is a child subreaper, so orphans stay below it), and anything else of that home.
    processes = _tree(stack.proc.pid)
    assert len(processes) >= 8, f"the stack looks incomplete: {sorted(processes)}"
    assert stack.stop(signal.SIGINT) == 0, stack.log_tail()
    assert _still_alive(processes) == []
    assert _processes_of(stack.home) == []
    for port in (stack.port, int(stack.env["DEMO_API_PORT"])):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
