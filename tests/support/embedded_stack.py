"""The embedded stack of ``make run`` (scripts/run_embedded.py) as a test fixture one can restart,
kill parts of, and give DAGs and Connections of its own.

Reuses the helpers of tests/e2e/test_embedded_stack.py (environment, process tree, clean-up).
What it adds:

* an optional private DAGs folder: the stack is then started through this file run as a
  script (``python tests/support/embedded_stack.py``), which loads scripts/run_embedded.py as a
  module and only changes ``[core] dags_folder`` (and adds ``RELIABILITY_EXTRA__<NAME>``
  settings); everything else is the script's own code;
* ``restart()`` on the same AIRFLOW_HOME and ports, with the output of every start appended
  to one log file (``stdout``/``stderr`` of ``make run``);
* a REST client (token, trigger, runs, task instances, tries, XComs, pause, clear) and the
  task log files;
* the processes of the stack: the tree below the launcher (it is a child subreaper, so
  orphans stay in it), who holds a TCP connection to a port, what listens where.

Run as a script it is the launcher, and needs nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "run_embedded.py"
DAGS_FOLDER_ENV = "RELIABILITY_DAGS_FOLDER"
EXTRA_PREFIX = "RELIABILITY_EXTRA__"
ADMIN_USER = "admin"
TERMINAL_RUN_STATES = ("success", "failed")


# --------------------------------------------------------------------------
# The launcher (this file run as a script): run_embedded.py with another DAGs folder.
# --------------------------------------------------------------------------


def load_run_embedded():
    """scripts/run_embedded.py as a module whose ``airflow_env`` honours ``RELIABILITY_*``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_embedded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    original = module.airflow_env

    def airflow_env(environ: dict[str, str] | None = None) -> dict[str, str]:
        env = original(environ)
        return apply_overrides(env)

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
# The fixture side (imports pytest and the e2e helpers lazily: the launcher must not).
# --------------------------------------------------------------------------


def _e2e():
    from tests.e2e import test_embedded_stack as e2e

    return e2e


@dataclass
class Response:
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


@dataclass(frozen=True)
class Listener:
    proto: str  # "tcp" / "udp"
    address: str  # "127.0.0.1:8080"
    pid: int
    process: str


class StackError(AssertionError):
    pass


class EmbeddedStack:
    """``make run`` on a private AIRFLOW_HOME and free ports, started from this process."""

    def __init__(
        self,
        home: Path,
        *,
        dags_folder: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        airflow_settings: Mapping[str, str] | None = None,
    ) -> None:
        e2e = _e2e()
        self.home = home
        self.env = e2e._clean_environ(home)
        self.env.update(extra_env or {})
        if dags_folder is not None:
            self.env[DAGS_FOLDER_ENV] = str(dags_folder)
        for name, value in (airflow_settings or {}).items():
            self.env[EXTRA_PREFIX + name] = value
        self.uses_launcher = dags_folder is not None or bool(airflow_settings)
        self.cli_env = apply_overrides(e2e._load_run_embedded().airflow_env(self.env))
        self.port = int(self.env["AIRFLOW_PORT"])
        self.demo_port = int(self.env["DEMO_API_PORT"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = home.parent / "run_embedded.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._log = None
        self._token: str | None = None
        #: (pid, start time) of every process seen in the stack, for the final clean-up.
        self._seen: set[tuple[int, str]] = set()

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
        self._token = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise StackError(f"the stack exited ({code}):\n{self.log_tail()}")

    def healthy(self, *, components: bool = True) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/api/v2/monitor/health", timeout=5) as answer:
                health = json.loads(answer.read())
        except (OSError, ValueError):
            return False
        if not components:
            return True
        return all(
            (health.get(name) or {}).get("status") == "healthy"
            for name in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        )

    def wait_ready(self, dag_ids: Iterable[str] = (), timeout: float = 240) -> float:
        """Until every component is healthy and each of ``dag_ids`` is registered; seconds taken."""
        begin = time.monotonic()
        self.wait_for("the stack to be healthy", lambda: self.healthy(), timeout, interval=0.5)
        pending = set(dag_ids)

        def registered() -> bool:
            for dag_id in sorted(pending):
                if self.rest("GET", f"/api/v2/dags/{quote(dag_id)}").ok:
                    pending.discard(dag_id)
            return not pending

        remaining = max(timeout - (time.monotonic() - begin), 10)
        try:
            self.wait_for(f"DAGs {sorted(pending)} to be registered", registered, remaining, interval=1)
        except StackError:
            errors = self.rest("GET", "/api/v2/importErrors").text[:4000]
            raise StackError(f"DAGs not registered: {sorted(pending)}; import errors: {errors}") from None
        self.note_processes()
        return time.monotonic() - begin

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> int | None:
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
        """The final clean-up, whatever happened: SIGINT, then SIGKILL what is left. Returns leftovers."""
        e2e = _e2e()
        if self.proc is not None and self.proc.poll() is None:
            self.note_processes()
            if self.stop(signal.SIGINT, timeout=60) is None:
                for pid in e2e._still_alive(self._seen):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        leftovers = e2e._processes_of(self.home) + [str(pid) for pid in e2e._still_alive(self._seen)]
        for line in e2e._processes_of(self.home):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        for pid in e2e._still_alive(self._seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return leftovers

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.log_tail(3000)}")
            time.sleep(interval)

    # -- processes -----------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The launcher and every live process below it."""
        if self.proc is None:
            return []
        return sorted(pid for pid, _ in _e2e()._tree(self.proc.pid))

    def note_processes(self) -> None:
        if self.proc is not None:
            self._seen |= _e2e()._tree(self.proc.pid)

    @staticmethod
    def cmdline(pid: int) -> str:
        try:
            return Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return ""

    def find_processes(self, needle: str) -> list[int]:
        """Processes of the stack whose command line (or title) contains ``needle``."""
        return [pid for pid in self.pids() if needle in self.cmdline(pid)]

    def processes_connected_to(self, port: int) -> list[int]:
        """Processes of the stack holding an established TCP connection to 127.0.0.1:``port``."""
        import psutil

        found = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED:
                        found.append(pid)
                        break
        return found

    def listeners(self) -> list[Listener]:
        """Every listening TCP socket and bound UDP socket of the stack's processes, from ``ss``."""
        import re

        pids = set(self.pids())
        found = []
        for proto, flags in (("tcp", "-ltnpH"), ("udp", "-lunpH")):
            output = subprocess.run(["ss", flags], capture_output=True, text=True, check=True).stdout
            for line in output.splitlines():
                fields = line.split()
                if len(fields) < 5:
                    continue
                address = fields[3]  # State Recv-Q Send-Q Local-Address:Port Peer-Address:Port Process
                for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
                    if int(pid) in pids:
                        found.append(Listener(proto, address, int(pid), name))
        return found

    # -- REST ----------------------------------------------------------------------------

    def password(self) -> str:
        path = Path(
            self.cli_env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
            or self.home / "simple_auth_manager_passwords.json.generated"
        )
        return json.loads(path.read_text())[ADMIN_USER]

    def token(self, *, refresh: bool = False) -> str:
        if self._token and not refresh:
            return self._token
        answer = self.rest("POST", "/auth/token", {"username": ADMIN_USER, "password": self.password()}, auth=False)
        if not answer.ok:
            raise StackError(f"POST /auth/token answered {answer.status}: {answer.text[:500]}")
        self._token = answer.json()["access_token"]
        return self._token

    def rest(self, method: str, path: str, body: Any = None, *, auth: bool = True, timeout: float = 30) -> Response:
        for attempt in (1, 2):
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            if auth:
                headers["Authorization"] = f"Bearer {self.token(refresh=attempt == 2)}"
            request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    response = Response(answer.status, answer.read())
            except urllib.error.HTTPError as error:
                response = Response(error.code, error.read())
            except OSError as error:
                response = Response(0, str(error).encode())
            if response.status == 401 and auth and attempt == 1:
                continue
            return response
        return response

    def rest_json(self, method: str, path: str, body: Any = None) -> Any:
        answer = self.rest(method, path, body)
        if not answer.ok:
            raise StackError(f"{method} {path} answered {answer.status}: {answer.text[:2000]}")
        return answer.json()

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
        if run_id:
            body["dag_run_id"] = run_id
        return self.rest_json("POST", f"/api/v2/dags/{quote(dag_id)}/dagRuns", body)["dag_run_id"]

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.rest_json("PATCH", f"/api/v2/dags/{quote(dag_id)}", {"is_paused": paused})

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.rest_json("GET", f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}")

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.rest_json("GET", f"/api/v2/dags/{quote(dag_id)}/dagRuns?limit=100&order_by=run_after")["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 180, interval: float = 1) -> dict[str, Any]:
        def finished():
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in TERMINAL_RUN_STATES else None

        try:
            return self.wait_for(f"{dag_id}/{run_id} to finish", finished, timeout, interval)
        except StackError as error:
            states = [(ti["task_id"], ti["state"], ti["try_number"]) for ti in self.task_instances(dag_id, run_id)]
            raise StackError(f"{error}\ntasks: {states}") from None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances?limit=1000"
        return sorted(self.rest_json("GET", path)["task_instances"], key=lambda ti: (ti["task_id"], ti["map_index"]))

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        suffix = f"/{map_index}" if map_index >= 0 else ""
        return self.rest_json("GET", f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}{suffix}")

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        suffix = f"/{map_index}" if map_index >= 0 else ""
        path = f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}{suffix}/tries"
        return sorted(self.rest_json("GET", path)["task_instances"], key=lambda t: t["try_number"])

    def xcom_entries(self, dag_id: str, run_id: str, task_id: str = "~") -> list[dict[str, Any]]:
        """Every XCom of the run (``task_id="~"``) or of one task, each with its value."""
        path = f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}/xcomEntries?limit=1000"
        entries = self.rest_json("GET", path)["xcom_entries"]
        for entry in entries:
            value_path = (
                f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(entry['task_id'])}"
                f"/xcomEntries/{quote(entry['key'])}?map_index={entry['map_index']}&stringify=false"
            )
            entry["value"] = self.rest_json("GET", value_path).get("value")
        return entries

    def clear_task(self, dag_id: str, run_id: str, task_ids: list[str]) -> Any:
        return self.rest_json(
            "POST",
            f"/api/v2/dags/{quote(dag_id)}/clearTaskInstances",
            {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False, "reset_dag_runs": True},
        )

    def rest_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        path = (
            f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}/logs/{try_number}"
            f"?full_content=true&map_index={map_index}"
        )
        return self.rest("GET", path).text

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
        return subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


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
