#!/usr/bin/env python3
"""Run the whole project on this machine: `airflow standalone` plus the demo API (`make run`).

Run it with the project's venv Python (`.venv/bin/python scripts/run_embedded.py`): the standard
library and psutil (an Airflow dependency), through scripts/process_tree.py.

* AIRFLOW_HOME defaults to <repo>/.airflow; the DAGs and plugins come from <repo>/dags and
  <repo>/plugins; task data goes to $AIRFLOW_HOME/data (NETWORK_REQUESTS_DATA_DIR).
* The UI/API server listens on http://127.0.0.1:$AIRFLOW_PORT (default 8080), user `admin`,
  whose password is generated into $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated
  (mode 0600) and never printed. Nothing listens on another address: see skip_log_servers()
  for the listeners that `airflow standalone` would otherwise bind to every interface.
* Unless AIRFLOW_CONN_NETWORK_REQUEST_API is already set, the demo API
  (include/demo_api.py) is started on 127.0.0.1:$DEMO_API_PORT (default 8090) and used as
  that connection.
* Ctrl-C or SIGTERM stops everything that was started, including the LocalExecutor workers
  and task processes that `airflow standalone` leaves behind when it is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from scripts import process_tree  # noqa: E402

VENV_BIN = Path(sys.executable).parent  # not resolved: it must stay the venv's bin/
GRACE_SECONDS = 15  # how long Airflow gets to stop after SIGTERM before SIGKILL
LOCAL_EXECUTOR_WORKER_TITLE = "airflow worker -- LocalExecutor"  # airflow/executors/local_executor.py


def airflow_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for every Airflow process of the embedded stack (also used by tests)."""
    env = dict(os.environ if environ is None else environ)
    home = Path(env.get("AIRFLOW_HOME") or REPO / ".airflow").resolve()
    port = env.get("AIRFLOW_PORT", "8080")
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # LocalExecutor forks exactly `parallelism` worker processes at start (default 32).
            "AIRFLOW__CORE__PARALLELISM": "4",
            # Only 127.0.0.1. Tasks reach the Execution API through the API server, so its URL
            # must follow the port too (the default assumes localhost:8080).
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": port,
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",  # off by default
            # A task's supervisor can miss its task's exit and only notice at its next wake-up,
            # up to min_heartbeat_interval (default 5 s) later, holding the worker slot that long.
            # 1 s measured 0.7 s of slot time per task launch instead of 1.95 s (make bench).
            # 15 failed heartbeats (1/s) keep the default tolerance of 3 x 5 s for an API outage.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "15",
            # Operators wait in the triggerer unless a task says otherwise (Airflow ships false).
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "true",
            # Pick up new DAG files within 30 s instead of 5 min.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "NETWORK_REQUESTS_DATA_DIR": str(home / "data"),
            # standalone starts its components as plain `airflow ...`, found on PATH.
            "PATH": os.pathsep.join([str(home / "bin"), str(VENV_BIN), env.get("PATH", "")]),
        }
    )
    return env


def skip_log_servers(home: Path) -> None:
    """Put an `airflow` wrapper first on PATH that adds --skip-serve-logs to scheduler/triggerer.

    In Airflow 3.3.2 the scheduler's and triggerer's log servers (ports 8793/8794) bind every
    interface: `host=""` is hard-coded in airflow/utils/serve_logs/core.py, with no setting.
    Here every component runs on one machine and writes its logs under $AIRFLOW_HOME/logs,
    which the API server reads directly, so those servers are not needed.
    """
    (home / "bin").mkdir(parents=True, exist_ok=True)
    wrapper = home / "bin" / "airflow"
    real = VENV_BIN / "airflow"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# Written by scripts/run_embedded.py: no log servers (they would bind 0.0.0.0).\n"
        'case "$1" in\n'
        f'  scheduler|triggerer) exec "{real}" "$@" --skip-serve-logs ;;\n'
        "esac\n"
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)


def password_file(env: dict[str, str]) -> Path:
    """Where the simple auth manager keeps the generated admin password (Airflow 3.3.2)."""
    return Path(
        env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
        or Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    )


def ensure_admin_password(path: Path) -> None:
    """Write a random `admin` password to the simple auth manager's file (mode 0600) unless
    the file exists. Airflow would otherwise make one itself and print it to the console."""
    if path.exists():
        return
    alphabet = "abcdefghkmnpqrstuvwxyzABCDEFGHKMNPQRSTUVWXYZ23456789"  # Airflow's own
    password = "".join(secrets.choice(alphabet) for _ in range(16))
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(json.dumps({"admin": password}) + "\n")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def airflow_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


POPEN_PIDS: set[int] = set()


class Stack:
    def __init__(self) -> None:
        self.env = airflow_env()
        self.home = Path(self.env["AIRFLOW_HOME"])
        self.port = int(self.env["AIRFLOW__API__PORT"])
        self.demo_port = int(self.env.get("DEMO_API_PORT", "8090"))
        self.airflow: subprocess.Popen | None = None
        self.demo: subprocess.Popen | None = None
        self.signals = 0

    def on_signal(self, signum, _frame) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"\n[run] {signal.Signals(signum).name}: stopping (again to kill at once)", flush=True)

    def start(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        skip_log_servers(self.home)
        ensure_admin_password(password_file(self.env))
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is taken: set AIRFLOW_PORT")

        if "AIRFLOW_CONN_NETWORK_REQUEST_API" not in os.environ:
            if not port_free(self.demo_port):
                raise RuntimeError(f"port {self.demo_port} on 127.0.0.1 is taken: set DEMO_API_PORT")
            cmd = [sys.executable, str(REPO / "include" / "demo_api.py"),
                   "--host", "127.0.0.1", "--port", str(self.demo_port)]  # fmt: skip
            print(f"[run] starting the demo API on http://127.0.0.1:{self.demo_port}", flush=True)
            self.demo = subprocess.Popen(cmd, env=self.env, start_new_session=True)
            POPEN_PIDS.add(self.demo.pid)
            self.env["AIRFLOW_CONN_NETWORK_REQUEST_API"] = f"http://127.0.0.1:{self.demo_port}"
            deadline = time.monotonic() + 30
            while not port_open(self.demo_port):
                if self.demo.poll() is not None or time.monotonic() > deadline or self.signals:
                    raise RuntimeError("the demo API did not start")
                time.sleep(0.2)

        print(f"[run] starting airflow standalone, AIRFLOW_HOME={self.home}", flush=True)
        # Own session: the terminal's Ctrl-C reaches only this script, which then stops
        # the components in order.
        self.airflow = subprocess.Popen(["airflow", "standalone"], env=self.env, start_new_session=True)
        POPEN_PIDS.add(self.airflow.pid)

    def banner(self) -> None:
        print(
            "\n[run] Airflow is up: http://127.0.0.1:%d  (user: admin)\n"
            "[run] the admin password is stored in %s\n"
            "[run] Ctrl-C stops everything.\n" % (self.port, password_file(self.env)),
            flush=True,
        )

    def wait(self) -> int:
        """Until a signal arrives or a component dies; returns the exit code to use."""
        shown = False
        while not self.signals:
            for name, proc in (("airflow standalone", self.airflow), ("demo API", self.demo)):
                if proc is not None and proc.poll() is not None:
                    print(f"[run] {name} exited with {proc.returncode}", flush=True)
                    return 1
            if not shown and airflow_healthy(self.port):
                self.banner()
                shown = True
            process_tree.reap_children(keep=POPEN_PIDS)  # orphans re-parented to us, once they exit
            time.sleep(1)
        return 0

    def stop(self) -> None:
        """Stop Airflow (everything below this script but the demo API), then the demo API.

        Why not just signal `airflow standalone`: on SIGTERM it dies alone and leaves its
        components and LocalExecutor workers running; on SIGINT it SIGTERMs its components but
        the scheduler then waits for running tasks to finish. And task processes run in sessions
        of their own. So every process below this script (a child subreaper: orphans stay
        below it) is stopped: SIGTERM, then SIGKILL after GRACE_SECONDS or at the next Ctrl-C.
        """
        demo = set(process_tree.tree(self.demo.pid)) if self.demo else set()
        if self.airflow:
            self.stop_processes([p for p in process_tree.descendants(os.getpid()) if p not in demo])
        if self.demo:
            self.stop_processes(demo)
        for proc in (self.airflow, self.demo):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)  # reaped (it is gone: stop_processes waited for that)
        process_tree.reap_children(keep=POPEN_PIDS)
        print("[run] stopped", flush=True)

    def stop_processes(self, processes) -> None:
        force_at = self.signals + 1

        def announce(left) -> None:
            names = ", ".join(f"{p.pid} {process_tree.command_line(p)[:60]!r}" for p in left)
            print(f"[run] killing what is left: {names}", flush=True)

        process_tree.stop_processes(
            processes,
            timeout=GRACE_SECONDS,
            kill_now=lambda: self.signals >= force_at,
            on_kill=announce,
            ignores_sigterm=orphaned_local_executor_worker,
        )


def orphaned_local_executor_worker(process) -> bool:
    """A LocalExecutor worker whose scheduler is gone (it was re-parented to this script, e.g.
    after the scheduler was killed). It ignores SIGTERM: it inherited the scheduler's handler,
    which acts in the scheduler only (SchedulerJobRunner._exit_gracefully), and no scheduler is
    left to tell it to stop. Without this, stopping after a scheduler crash waits GRACE_SECONDS."""
    try:
        return process.ppid() == os.getpid() and process_tree.command_line(process).startswith(LOCAL_EXECUTOR_WORKER_TITLE)
    except psutil.Error:
        return False


def main() -> int:
    process_tree.become_subreaper()
    stack = Stack()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stack.on_signal)
    code = 1
    try:
        stack.start()
        code = stack.wait()
    except RuntimeError as exc:
        print(f"[run] {exc}", flush=True)
    finally:
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
