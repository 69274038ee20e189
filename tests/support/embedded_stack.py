"""The embedded stack of ``make run`` (scripts/run_embedded.py) as a test fixture: the one the e2e,
UI and reliability suites start, restart, kill parts of, and give DAGs and Connections of their own.

* a private AIRFLOW_HOME and free 127.0.0.1 ports; none of the test session's Airflow settings;
* an optional private DAGs folder and extra Airflow settings: the stack is then started through
  this file run as a script (``python tests/support/embedded_stack.py``), which loads
  scripts/run_embedded.py as a module and only changes ``[core] dags_folder`` (and adds
  ``EMBEDDED_STACK_EXTRA__<NAME>`` settings); everything else is the script's own code;
* ``restart()`` on the same AIRFLOW_HOME and ports, with the output of every start appended
  to one log file (``stdout``/``stderr`` of ``make run``);
* the REST API (tests/support/rest_client.py: the stack *is* a client of its own API), the CLI
  and the task log files;
* the processes of the stack (scripts/process_tree.py): the tree below the launcher (it is a
  child subreaper, so orphans stay in it), who holds a TCP connection to a port, what listens
  where; and a clean-up that stops whatever is left, also processes that escaped the tree,
  found by a marker in their environment or their AIRFLOW_HOME on their command line.

Use it as a context manager (started on entry, everything stopped on exit)::

    with EmbeddedStack(tmp_path / "airflow-home") as stack:
        stack.wait_ready(["network_request_once"])
        run_id = stack.trigger("network_request_once")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as the launcher script
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from scripts.process_tree import alive, command_line, processes_with_env, stop_processes, tree  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.rest_client import ADMIN_USER, AirflowRestClient, ApiError  # noqa: E402

SCRIPT = REPO / "scripts" / "run_embedded.py"
DAGS_FOLDER_ENV = "EMBEDDED_STACK_DAGS_FOLDER"
EXTRA_PREFIX = "EMBEDDED_STACK_EXTRA__"
#: Every process of one stack inherits this variable with a value of its own (see process_tree).
MARKER_ENV = "EMBEDDED_STACK_ID"
SIGINT_STOP_SECONDS = 90  # run_embedded.py stops everything after SIGINT within its own grace periods


# --------------------------------------------------------------------------
# The launcher (this file run as a script): run_embedded.py with another DAGs folder.
# --------------------------------------------------------------------------


def load_run_embedded():
    """scripts/run_embedded.py as a module whose ``airflow_env`` honours ``EMBEDDED_STACK_*``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_embedded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    original = module.airflow_env

    def airflow_env(environ: dict[str, str] | None = None) -> dict[str, str]:
        return apply_overrides(original(environ))

    module.airflow_env = airflow_env
    return module


def apply_overrides(env: dict[str, str]) -> dict[str, str]:
    folder = env.get(DAGS_FOLDER_ENV)
    if folder:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = folder
    for key, value in list(env.items()):
        if key.startswith(EXTRA_PREFIX):
            env[key[len(EXTRA_PREFIX):]] = value
    return env


# --------------------------------------------------------------------------
# The fixture side.
# --------------------------------------------------------------------------


def clean_environ(home: Path) -> dict[str, str]:
    """os.environ without any Airflow setting (tests/conftest.py sets some for unit tests), with
    ``home`` as AIRFLOW_HOME, free ports for the API server and the demo API, and a marker."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW_", "AIRFLOW__")) and key != "NETWORK_REQUESTS_DATA_DIR"
    }
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW_PORT=str(free_port()),
        DEMO_API_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
        **{MARKER_ENV: uuid.uuid4().hex},
    )
    return env


@dataclass(frozen=True)
class Listener:
    proto: str  # "tcp" / "udp"
    address: str  # "127.0.0.1:8080", "[::1]:8080"
    pid: int
    process: str


class StackError(ApiError):
    pass


class EmbeddedStack(AirflowRestClient):
    """``make run`` on a private AIRFLOW_HOME and free ports, started from this process."""

    def __init__(
        self,
        home: Path,
        *,
        dags_folder: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        airflow_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.home = home
        self.env = clean_environ(home)
        self.env.update(extra_env or {})
        if dags_folder is not None:
            self.env[DAGS_FOLDER_ENV] = str(dags_folder)
        for name, value in (airflow_settings or {}).items():
            self.env[EXTRA_PREFIX + name] = value
        self.uses_launcher = dags_folder is not None or bool(airflow_settings)
        #: The environment of the stack's Airflow processes, for CLI commands against it.
        self.cli_env = load_run_embedded().airflow_env(dict(self.env))
        self.port = int(self.env["AIRFLOW_PORT"])
        self.demo_port = int(self.env["DEMO_API_PORT"])
        self.marker = (MARKER_ENV, self.env[MARKER_ENV])
        super().__init__(f"http://127.0.0.1:{self.port}", self.password)
        self.log_path = home.parent / "run_embedded.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        #: What the final clean-up found still running ("pid: command line").
        self.leftovers: list[str] = []
        self._log = None
        #: Every process seen in the stack, for the final clean-up.
        self._seen: set[psutil.Process] = set()

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.leftovers = self.kill_everything()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve() if self.uses_launcher else SCRIPT)]

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.starts += 1
        self._log.write(f"\n===== test: start #{self.starts} =====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.forget_token()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def describe(self) -> str:
        return self.log_tail(3000)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise StackError(f"the stack exited ({code}):\n{self.log_tail()}")

    def wait_ready(self, dag_ids: Iterable[str] = (), timeout: float = 240) -> float:
        """Until every component is healthy and each of ``dag_ids`` is registered; seconds taken."""
        begin = time.monotonic()
        self.wait_for("the stack to be healthy", self.healthy, timeout, interval=0.5)
        self.wait_for_dags(dag_ids, max(timeout - (time.monotonic() - begin), 10))
        self.note_processes()
        return time.monotonic() - begin

    def stop(self, sig: int = signal.SIGINT, timeout: float = SIGINT_STOP_SECONDS) -> int | None:
        """Signal the launcher (Ctrl-C of ``make run``) and wait for it to exit; its exit code."""
        if self.proc is None:
            return None
        self.note_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        return self.proc.poll()

    def restart(self, dag_ids: Iterable[str] = (), timeout: float = 240) -> float:
        """Stop with SIGINT, start again on the same AIRFLOW_HOME and ports; seconds taken."""
        begin = time.monotonic()
        code = self.stop(signal.SIGINT)
        if code != 0:
            raise StackError(f"the stack did not stop cleanly on SIGINT ({code}):\n{self.log_tail()}")
        self.start()
        self.wait_ready(dag_ids, timeout)
        return time.monotonic() - begin

    def kill_everything(self) -> list[str]:
        """The final clean-up, whatever happened: SIGINT to the launcher, then SIGTERM and
        SIGKILL to whatever of the stack is left. Returns what was left ("pid: command line")."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGINT, timeout=60)
        left = self.leftover_processes()
        described = [f"{process.pid}: {command_line(process)}" for process in left]
        stop_processes(left, timeout=5, marker=self.marker)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return described

    # -- processes -----------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The launcher and every live process below it."""
        return [] if self.proc is None else [process.pid for process in tree(self.proc.pid)]

    def note_processes(self) -> None:
        if self.proc is not None:
            self._seen.update(tree(self.proc.pid))

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes of this stack still alive: seen below the launcher, carrying its marker,
        or naming its AIRFLOW_HOME on their command line (the marker is lost to setproctitle)."""
        home = str(self.home)
        by_command = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.pid != os.getpid() and home in command_line(process):
                    by_command.append(process)
        return alive([*self._seen, *processes_with_env(*self.marker), *by_command])

    @staticmethod
    def cmdline(pid: int) -> str:
        return command_line(pid)

    def find_processes(self, needle: str) -> list[int]:
        """Processes of the stack whose command line (or title) contains ``needle``."""
        return [pid for pid in self.pids() if needle in self.cmdline(pid)]

    def processes_connected_to(self, port: int) -> list[int]:
        """Processes of the stack holding an established TCP connection to 127.0.0.1:``port``."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED:
                        found.append(pid)
                        break
        return found

    def listeners(self) -> list[Listener]:
        """Every listening TCP socket and bound (unconnected) UDP socket of the stack's processes."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                for conn in process.net_connections(kind="inet"):
                    tcp = conn.type == socket.SOCK_STREAM
                    if (tcp and conn.status == psutil.CONN_LISTEN) or (not tcp and not conn.raddr):
                        ip = f"[{conn.laddr.ip}]" if ":" in conn.laddr.ip else conn.laddr.ip
                        found.append(Listener("tcp" if tcp else "udp", f"{ip}:{conn.laddr.port}", pid, process.name()))
        return found

    # -- REST ----------------------------------------------------------------------------

    def password(self) -> str:
        path = Path(
            self.cli_env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
            or self.home / "simple_auth_manager_passwords.json.generated"
        )
        return json.loads(path.read_text())[ADMIN_USER]

    # -- files ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return Path(self.cli_env["NETWORK_REQUESTS_DATA_DIR"])

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def log_files(self, dag_id: str, run_id: str | None = None) -> list[Path]:
        base = self.logs_dir / f"dag_id={dag_id}"
        if run_id is not None:
            base = base / f"run_id={run_id}"
        return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        folder = self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        path = folder / f"attempt={try_number}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- CLI -----------------------------------------------------------------------------

    def airflow(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """``airflow <args>`` against the stack's metadata DB and settings."""
        return subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON lines of an Airflow 3 task log file (other lines are skipped)."""
    events = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


if __name__ == "__main__":
    sys.exit(load_run_embedded().main())
