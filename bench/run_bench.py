#!/usr/bin/env python3
"""``make bench``: three ways to send N rate-limited requests, through a real Airflow scheduler.

Run it with the project's venv Python (the standard library and psutil, an Airflow dependency,
through scripts/process_tree.py; Airflow runs in its own processes)::

    .venv/bin/python bench/run_bench.py                       # token bucket, N=60, R=1/s
    .venv/bin/python bench/run_bench.py --shape both          # + the fixed-window API
    .venv/bin/python bench/run_bench.py --tasks 20 --strategies http_operator,urllib3_retry
    .venv/bin/python bench/run_bench.py --operator-kwargs '{"deferrable": true}'

What one run does, in order (bench/README.md has the details and how to read the table):

1. starts ``bench/rate_limited_server.py`` on 127.0.0.1 (a free port);
2. starts ONE Airflow stack in a fresh ``AIRFLOW_HOME`` under ``bench/runs/<stamp>/``
   (git-ignored): ``airflow db migrate``, then ``scheduler``, ``dag-processor``,
   ``triggerer`` and ``api-server`` (the same four components ``airflow standalone`` runs),
   LocalExecutor with ``--parallelism`` worker slots, SQLite, DAGs from ``bench/dags/``;
3. measures the idle stack for ``--idle-seconds``, then runs ``bench_warmup`` (no requests)
   once so the first strategy does not pay alone for the stack's first DAG run;
4. for each shape, for each strategy: resets the server (a full bucket / no window) and
   Airflow Variables (where the operator's shared gate keeps its state), triggers the
   strategy's DAG through the REST API, waits for the run to end (at most ``--timeout``
   seconds; then the run is marked failed and what finished is counted), waits for the
   worker slots to be idle again, and collects the server's records, the task instances
   and the process samples;
5. writes ``--out`` (JSON, shape documented in bench/README.md) and prints a table.

Everything it started is stopped on the way out, also on error, Ctrl-C or SIGTERM: each
component runs in its own session, the runner is a child subreaper (orphaned task processes
stay below it), and what is left after a grace period is killed. A second Ctrl-C kills at
once. Exit status: 0 when every run finished, 1 when one timed out or failed to run, 2 on
bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procstats import Sampler, read_proc  # noqa: E402
from bench.rate_limited_server import percentile  # noqa: E402
from scripts import process_tree  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent  # not resolved: it must stay the venv's bin/
STRATEGIES = ("network_request_operator", "http_operator", "urllib3_retry")
SHAPES = ("token_bucket", "fixed_window")
#: Keys of each strategy's block in results.json that a reader may rely on.
REQUIRED_METRICS = (
    "makespan_s",
    "successes",
    "failures",
    "responses_429",
    "early_requests",
    "slot_seconds_waiting",
    "busy_slot_seconds",
    "lateness_p95_s",
    "peak_rss_mb",
)
GRACE_SECONDS = 15  # SIGTERM -> SIGKILL
POLL_SECONDS = 1.0


class Interrupted(Exception):
    """A signal asked the runner to stop."""


class BenchError(Exception):
    """Something the runner cannot continue after (a component died, a start-up timed out)."""


# --------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# Never send 127.0.0.1 traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(method: str, url: str, body: Any = None, timeout: float = 15.0) -> tuple[int, Any]:
    """One JSON request; returns (status, parsed body or None). Connection errors raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        raw, status = error.read(), error.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def parse_time(value: str | None) -> float | None:
    """An ISO-8601 timestamp from the REST API as epoch seconds."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------
# The processes: rate-limited server and the Airflow stack.
# --------------------------------------------------------------------------


class Stack:
    """The server and the Airflow components; :meth:`stop` ends all of them and their children."""

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args = args
        self.run_dir = run_dir
        self.home = run_dir / "airflow_home"
        self.log_dir = run_dir / "logs"
        self.api_port = free_port()
        self.server_port: int | None = None
        self.server: subprocess.Popen | None = None
        self.components: dict[str, subprocess.Popen] = {}
        self._popen_pids: set[int] = set()
        self.env: dict[str, str] = {}
        self.force_kill = False  # set by a second Ctrl-C during stop()

    # -- start ----------------------------------------------------------------------------

    def start_server(self) -> None:
        ready = self.run_dir / "server-ready.json"
        cmd = [
            sys.executable, str(BENCH_DIR / "rate_limited_server.py"), "--host", "127.0.0.1", "--port", "0",
            "--rate", str(self.args.rate), "--burst", str(self.args.burst),
            "--window-limit", str(self.args.window_limit), "--window-seconds", str(self.args.window_seconds),
            "--ready-file", str(ready),
        ]  # fmt: skip
        self.server = self._spawn("rate_limited_server", cmd, os.environ.copy())
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the rate-limited server did not start; see {self.log_dir}/rate_limited_server.log")
            time.sleep(0.1)
        self.server_port = json.loads(ready.read_text())["port"]
        log(f"rate-limited server on http://127.0.0.1:{self.server_port}")

    def airflow_env(self) -> dict[str, str]:
        """Environment of every Airflow process. Inherited AIRFLOW_* settings are dropped so
        the stack is the same whoever starts it (pytest's conftest sets some, for one)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "BENCH_"))}
        port = self.api_port
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(BENCH_DIR / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
                # The triggerer imports triggers by class path; the warm-up's lives next to the Dags.
                "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR / "dags"), os.environ.get("PYTHONPATH")])),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                # LocalExecutor forks exactly this many worker processes (default 32).
                "AIRFLOW__CORE__PARALLELISM": str(self.args.parallelism),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
                # As make run (scripts/run_embedded.py): the task supervisor notices its task's
                # exit within 1 s instead of up to 5 s; the same for every strategy.
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
                "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "15",
                # As make run: this project's operators wait in the triggerer unless a task says
                # otherwise (Airflow ships false). The stock HttpOperator is pinned to its stock
                # deferrable=False in bench/dags/bench_strategies.py.
                "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "true",
                # The REST calls of this runner need no login: the stack listens on 127.0.0.1
                # only and lives for one benchmark.
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW_CONN_BENCH_API": f"http://127.0.0.1:{self.server_port}",
                "BENCH_TASKS": str(self.args.tasks),
                "BENCH_OPERATOR_KWARGS": json.dumps(self.args.operator_kwargs),
                "BENCH_WARMUP_TASKS": str(2 * self.args.parallelism),
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
                "PYTHONUNBUFFERED": "1",
            }
        )
        for section_key, value in self.args.airflow_settings.items():
            env[f"AIRFLOW__{section_key.upper()}"] = value
        return env

    def start_airflow(self) -> None:
        airflow = VENV_BIN / "airflow"
        if not airflow.exists():
            raise BenchError(f"{airflow} not found: run this with the project's venv Python (.venv/bin/python)")
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = self.airflow_env()
        log(f"AIRFLOW_HOME={self.home}; airflow db migrate")
        migrate = self._spawn("db-migrate", [str(airflow), "db", "migrate"], self.env)
        self._wait_exit(migrate, "airflow db migrate", timeout=300)
        # The scheduler's and triggerer's log servers would bind every interface (and fixed
        # ports 8793/8794, taken when `make run` is up); the API server reads the log files.
        commands = {
            "scheduler": ["scheduler", "--skip-serve-logs"],
            "dag-processor": ["dag-processor"],
            "triggerer": ["triggerer", "--skip-serve-logs"],
            "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port)],
        }
        for name, args in commands.items():
            self.components[name] = self._spawn(name, [str(airflow), *args], self.component_env(name))
        log(f"started {', '.join(commands)}; API on http://127.0.0.1:{self.api_port}")

    def component_env(self, name: str) -> dict[str, str]:
        """The environment of the component ``name``: :meth:`airflow_env`'s, the same for all
        (a subclass may add a probe to one component)."""
        return self.env

    def component_roots(self) -> dict[int, str]:
        """``{pid: name}`` of the Airflow components started so far (for the sampler)."""
        return {proc.pid: name for name, proc in self.components.items()}

    def check_alive(self) -> None:
        for name, proc in self.components.items():
            if proc.poll() is not None:
                raise BenchError(f"airflow {name} exited with {proc.returncode}; see {self.log_dir}/{name}.log")
        if self.server is not None and self.server.poll() is not None:
            raise BenchError(f"the rate-limited server exited with {self.server.returncode}")

    def excluded_from_stack(self) -> set[int]:
        """Pids whose subtrees are not Airflow (for the sampler): the server."""
        return {self.server.pid} if self.server is not None else set()

    def rss_by_component_mb(self) -> dict[str, float]:
        result = {}
        for name, proc in self.components.items():
            found = [read_proc(process.pid) for process in process_tree.tree(proc.pid)]
            result[name] = round(sum(p.rss_bytes for p in found if p is not None) / 2**20, 1)
        return result

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            # Own session: a terminal Ctrl-C reaches only the runner, which stops things in order.
            proc = subprocess.Popen(
                cmd, env=env, cwd=self.run_dir, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self._popen_pids.add(proc.pid)
        return proc

    def _wait_exit(self, proc: subprocess.Popen, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(f"{what} took more than {timeout:.0f}s")
            time.sleep(0.2)
        if proc.returncode != 0:
            raise BenchError(f"{what} failed with {proc.returncode}; see {self.log_dir}")

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every process below the runner (task processes have sessions of their own),
        again after 2 s (on the first SIGTERM the scheduler waits for its LocalExecutor workers:
        "signal again if you don't want to wait"); SIGKILL what is left after GRACE_SECONDS, or
        at once after a second Ctrl-C. Returns when nothing we started is left (bounded)."""
        started = [p for p in [*self.components.values(), self.server] if p is not None]
        processes = process_tree.descendants(os.getpid())
        if not processes:
            return
        log("stopping the Airflow stack and the server")
        components_gone_at: float | None = None

        def kill_now() -> bool:
            nonlocal components_gone_at
            if self.force_kill:
                return True
            if components_gone_at is None and all(p.poll() is not None for p in started):
                components_gone_at = time.monotonic()
            # The components are gone; what is left are orphans (LocalExecutor workers ignore
            # SIGTERM, they inherit the scheduler's handler): nothing to wait for.
            return components_gone_at is not None and time.monotonic() - components_gone_at > 1

        def announce(left: list) -> None:
            log("killing what is left: " + ", ".join(f"{p.pid} {process_tree.command_line(p)[:50]!r}" for p in left))

        left = process_tree.stop_processes(
            processes, timeout=GRACE_SECONDS, term_again_after=2, kill_now=kill_now, on_kill=announce
        )
        if left:
            log(f"could not stop: {[p.pid for p in left]}")
        for popen in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=1)
        process_tree.reap_children(keep=self._popen_pids)
        log("stopped")


# --------------------------------------------------------------------------
# Talking to Airflow and to the server.
# --------------------------------------------------------------------------


class Airflow:
    """The few REST calls the runner needs (API v2; no login, see airflow_env()).

    The API server has one worker and shares two cores with everything else, so a call may
    time out under load: each call is retried (bounded), and the calls that change state are
    idempotent (a DAG run is created under a run id of our choosing).
    """

    ATTEMPTS = 5
    TIMEOUT_S = 30.0

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,), **params: Any) -> Any:
        """The parsed body of a response whose status is in ``ok``; BenchError otherwise."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        error: Exception | None = None
        for attempt in range(self.ATTEMPTS):
            try:
                status, answer = http_json(method, f"{self.base}{path}{query}", body, timeout=self.TIMEOUT_S)
            except OSError as exc:  # refused, reset, timed out
                error = exc
                time.sleep(min(2**attempt, 5))
                continue
            if status in ok:
                return answer
            if status < 500:
                raise BenchError(f"{method} {path} -> {status}: {str(answer)[:300]}")
            error = BenchError(f"{method} {path} -> {status}: {str(answer)[:300]}")
            time.sleep(min(2**attempt, 5))
        raise BenchError(f"{method} {path} failed {self.ATTEMPTS} times: {error}")

    def healthy(self) -> bool:
        try:
            status, body = http_json("GET", f"{self.base}/api/v2/monitor/health", timeout=5)
        except OSError:
            return False
        if status != 200 or not isinstance(body, dict):
            return False
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all((body.get(part) or {}).get("status") == "healthy" for part in parts)

    def dag_ready(self, dag_id: str) -> bool:
        try:
            status, body = http_json("GET", f"{self.base}/api/v2/dags/{dag_id}", timeout=5)
        except OSError:
            return False
        return status == 200 and isinstance(body, dict) and not body.get("is_paused", True)

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> str:
        """Create the run ``run_id``; a retry after a lost answer finds it already there (409)."""
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", body, ok=(200, 201, 409))
        return run_id

    def _run_path(self, dag_id: str, run_id: str) -> str:
        return f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.call("GET", self._run_path(dag_id, run_id))

    def fail_dag_run(self, dag_id: str, run_id: str) -> None:
        self.call("PATCH", self._run_path(dag_id, run_id), {"state": "failed"})

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = self._run_path(dag_id, run_id) + "/taskInstances"
        found: list[dict[str, Any]] = []
        for _ in range(1000):  # pages of 100; bounded
            page = self.call("GET", path, limit=100, offset=len(found))
            found.extend(page["task_instances"])
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                break
        return found

    def clear_variables(self) -> int:
        """Delete every Variable (the operator's shared gate keeps its state in one)."""
        deleted = 0
        for _ in range(100):  # bounded
            page = self.call("GET", "/api/v2/variables", limit=100)
            if not page["variables"]:
                break
            for variable in page["variables"]:
                key = urllib.parse.quote(variable["key"], safe="")
                self.call("DELETE", f"/api/v2/variables/{key}", ok=(200, 204, 404))
                deleted += 1
        return deleted


class BenchServer:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/__bench"

    def reset(self, **config: Any) -> dict[str, Any]:
        status, body = http_json("POST", f"{self.base}/reset", config)
        if status != 200:
            raise BenchError(f"server reset -> {status}: {body}")
        return body["config"]

    def stats(self, records: bool = True) -> dict[str, Any]:
        status, body = http_json("GET", f"{self.base}/stats?records={int(records)}", timeout=30)
        if status != 200:
            raise BenchError(f"server stats -> {status}")
        return body


# --------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------


class Bench:
    """One benchmark session on one :class:`Stack`: start-up, idle, warm-up, strategy runs."""

    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.sampler: Sampler | None = None
        self.airflow: Airflow | None = None
        self.server: BenchServer | None = None
        self.problems: list[str] = []
        #: (dag_id, run_id, worker pickups, metrics) of each run: completed from the SQLite DB
        #: and the scheduler log once the stack has stopped (add_reschedule_latency() and
        #: add_scheduler_log_counts())
        self.finished_runs: list[tuple[str, str, list[tuple[str, float]], dict[str, Any]]] = []

    def start(self) -> dict[str, Any]:
        """Start everything and measure the idle stack; returns the idle measurements."""
        self.stack.start_server()
        self.server = BenchServer(self.stack.server_port)
        self.sampler = Sampler(
            os.getpid(), self.stack.excluded_from_stack, interval=self.args.sample_interval,
            components=self.stack.component_roots,
        )  # fmt: skip
        self.sampler.start()
        started = time.monotonic()
        self.stack.start_airflow()
        self.airflow = Airflow(self.stack.api_port)
        dag_ids = ["bench_warmup", *(f"bench_{name}" for name in self.args.strategies)]
        deadline = time.monotonic() + self.args.startup_timeout
        while not (self.airflow.healthy() and all(self.airflow.dag_ready(d) for d in dag_ids)):
            self.stack.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the stack was not healthy with {dag_ids} parsed after {self.args.startup_timeout}s; "
                    f"see {self.stack.log_dir}"
                )
            time.sleep(1)
        startup_s = time.monotonic() - started
        log(f"stack healthy, DAGs parsed after {startup_s:.0f}s; measuring it idle for {self.args.idle_seconds}s")
        self.sampler.begin("idle")
        time.sleep(self.args.idle_seconds)
        idle = self.sampler.end().as_dict()
        latest = self.sampler.latest
        rss_by_component = self.stack.rss_by_component_mb()
        if self.args.warmup:
            self.warm_up()
        return {
            "startup_s": round(startup_s, 1),
            "idle_rss_mb": idle["peak_rss_mb"],
            "idle_pss_mb": idle["peak_pss_mb"],
            "idle_rss_by_component_mb": rss_by_component,
            "worker_processes": latest.workers if latest else None,
            "stack_processes": len(latest.stack_pids) if latest else None,
        }

    def warm_up(self) -> None:
        """Run ``bench_warmup`` (no requests) once, so no strategy pays for the first DAG run."""
        run_id = self.airflow.trigger("bench_warmup", f"bench_warmup__{time.time():.0f}", {})
        deadline = time.monotonic() + self.args.startup_timeout
        while self.airflow.dag_run("bench_warmup", run_id)["state"] not in ("success", "failed"):
            self.stack.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"bench_warmup did not finish in {self.args.startup_timeout}s")
            time.sleep(POLL_SECONDS)
        self._wait_idle_slots(60)
        log("warm-up run done")

    def run_strategy(self, shape: str, strategy: str) -> dict[str, Any]:
        dag_id = f"bench_{strategy}"
        label = f"{shape}/{strategy}"
        self.airflow.clear_variables()
        self.server.reset(shape=shape)
        self._wait_idle_slots(30)
        self.sampler.begin(label)
        run_id = self.airflow.trigger(dag_id, f"bench__{shape}__{time.time():.0f}", {"shape": shape})
        log(f"{label}: triggered {run_id}")
        deadline = time.monotonic() + self.args.timeout
        timed_out = False
        tis_at_timeout: list[dict[str, Any]] | None = None
        next_progress = time.monotonic() + 15
        while True:
            self.stack.check_alive()
            state = self.airflow.dag_run(dag_id, run_id)["state"]
            if state in ("success", "failed"):
                break
            if time.monotonic() > deadline:
                timed_out = True
                log(f"{label}: still {state} after {self.args.timeout:.0f}s; marking the run failed")
                # Read the task states first: failing the run marks its task instances failed.
                tis_at_timeout = self.airflow.task_instances(dag_id, run_id)
                self.airflow.fail_dag_run(dag_id, run_id)
                self.problems.append(f"{label} timed out after {self.args.timeout:.0f}s")
                break
            if time.monotonic() > next_progress:
                summary = self.server.stats(records=False)["summary"]
                log(
                    f"{label}: {summary['clients_succeeded']}/{self.args.tasks} requests served, "
                    f"{summary['responses_429']} x 429 so far"
                )
                next_progress += 15
            time.sleep(POLL_SECONDS)
        # The slots stay busy for a moment after the run ends (the supervisor reports the end
        # state, the worker goes back to the queue): that is part of the strategy's cost.
        self._wait_idle_slots(60 if not timed_out else 120)
        phase_stats = self.sampler.end()
        phase = phase_stats.as_dict()
        run = self.airflow.dag_run(dag_id, run_id)
        stats = self.server.stats()
        # Every request the server saw, for a closer look later (bench/runs/ is git-ignored).
        write_json(self.stack.run_dir / f"requests-{shape}-{strategy}.json", stats)
        tis = tis_at_timeout if tis_at_timeout is not None else self.airflow.task_instances(dag_id, run_id)
        metrics = self._metrics(run, stats, tis, phase, timed_out)
        self.finished_runs.append((dag_id, run_id, phase_stats.pickups, metrics))
        log(
            f"{label}: {run['state']}, makespan {metrics['makespan_s']}s, {metrics['successes']} ok, "
            f"{metrics['failures']} failed, {metrics['responses_429']} x 429"
        )
        return metrics

    def _wait_idle_slots(self, timeout: float) -> None:
        """Until two samples in a row show no busy worker slot (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        idle_samples = 0
        while time.monotonic() < deadline:
            latest = self.sampler.latest
            idle_samples = idle_samples + 1 if latest is not None and latest.busy_workers == 0 else 0
            if idle_samples >= 2:
                return
            time.sleep(self.args.sample_interval)
        self.problems.append(f"worker slots still busy {timeout:.0f}s after a run ended")

    def _metrics(
        self, run: dict[str, Any], stats: dict[str, Any], tis: list[dict[str, Any]], phase: dict[str, Any], timed_out: bool
    ) -> dict[str, Any]:
        summary = stats["summary"]
        states = [ti.get("state") for ti in tis]
        run_start, run_end = parse_time(run.get("start_date")), parse_time(run.get("end_date"))
        queue_to_start = [
            parse_time(ti["start_date"]) - parse_time(ti["queued_when"])
            for ti in tis
            if ti.get("start_date") and ti.get("queued_when")
        ]
        first_request = summary["first_request_at"]
        launches = phase["task_processes_seen"]
        metrics = {
            # -- the required keys --
            # A run cut short has no makespan; see last_success_after_first_request_s.
            "makespan_s": None if timed_out else summary["makespan_s"],
            "successes": states.count("success"),
            "failures": states.count("failed"),
            "responses_429": summary["responses_429"],
            "early_requests": summary["early_requests"],
            "slot_seconds_waiting": phase["slot_seconds_waiting"],
            "busy_slot_seconds": phase["busy_slot_seconds"],
            "lateness_p95_s": summary["lateness_p95_s"],
            "peak_rss_mb": phase["peak_rss_mb"],
            # -- more --
            "dag_run_state": run.get("state"),
            "last_success_after_first_request_s": summary["makespan_s"],
            "timed_out": timed_out,
            "unfinished": len(states) - states.count("success") - states.count("failed"),
            "dagrun_duration_s": rounded(run_end - run_start) if run_start and run_end else None,
            "first_request_after_run_start_s": rounded(first_request - run_start) if first_request and run_start else None,
            "requests_total": summary["requests_total"],
            "responses_2xx": summary["responses_2xx"],
            "duplicate_successes": summary["duplicate_successes"],
            "early_requests_own": summary["early_requests_own"],
            "lateness_p50_s": summary["lateness_p50_s"],
            "lateness_max_s": summary["lateness_max_s"],
            "retries_after_429": summary["retries_after_429"],
            "wait_after_429_s": summary["wait_after_429_s"],
            "tries_total": sum(int(ti.get("try_number") or 0) for ti in tis),
            "extra_tries": sum(max(0, int(ti.get("try_number") or 1) - 1) for ti in tis),
            "task_process_launches": launches,
            "busy_slot_seconds_per_launch": rounded(phase["busy_slot_seconds"] / launches, 2) if launches else None,
            "ti_queued_to_start_p50_s": rounded(percentile(queue_to_start, 50)),
            "ti_queued_to_start_p95_s": rounded(percentile(queue_to_start, 95)),
            "peak_pss_mb": phase["peak_pss_mb"],
            "max_busy_slots": phase["max_busy_slots"],
            "max_stack_processes": phase["max_stack_processes"],
            "max_sample_gap_s": phase["max_sample_gap_s"],
            "stack_cpu_s": phase["stack_cpu_s"],
            "cpu_s_by_component": phase["cpu_s_by_component"],
            "peak_rss_mb_by_component": phase["peak_rss_mb_by_component"],
            "other_cpu_s": phase["other_cpu_s"],
            "system_cpu_busy_pct": phase["system_cpu_busy_pct"],
            "loadavg_1m_mean": phase["loadavg_1m_mean"],
            "task_wchan_seconds": phase["task_wchan_seconds"],
            "measured_window_s": phase["duration_s"],
        }
        assert set(REQUIRED_METRICS) <= metrics.keys()
        return metrics


# --------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------


def ideal_makespan(shape: str, args: argparse.Namespace) -> dict[str, float]:
    """``ideal_makespan_s`` = N / average rate (what the README's table calls ideal), and
    ``ideal_makespan_exact_s``: the least time from the first request to the last success
    the limit allows (the burst, or the first window, is served at once)."""
    n = args.tasks
    if shape == "token_bucket":
        rate = args.rate
        exact = max(0, n - args.burst) / rate
    else:
        rate = args.window_limit / args.window_seconds
        exact = (math.ceil(n / args.window_limit) - 1) * args.window_seconds  # minus <1 s of alignment
    return {"rate_per_s": round(rate, 6), "ideal_makespan_s": round(n / rate, 3), "ideal_makespan_exact_s": round(exact, 3)}


TABLE_COLUMNS = (
    ("strategy", "strategy", 24),
    ("makespan_s", "makespan_s", 10),
    ("successes", "ok", 4),
    ("failures", "fail", 4),
    ("responses_429", "429s", 5),
    ("early_requests", "early", 5),
    ("early_requests_own", "own", 4),
    ("slot_seconds_waiting", "slot_wait_s", 11),
    ("busy_slot_seconds", "busy_slot_s", 11),
    ("lateness_p95_s", "late_p95_s", 10),
    ("peak_rss_mb", "peak_rss_mb", 11),
    ("task_process_launches", "launches", 8),
    ("extra_tries", "xtries", 6),
    ("reschedule_wake_late_p95_s", "wake_p95_s", 10),
)


def format_table(results: dict[str, Any]) -> str:
    lines = []
    for shape, block in results["shapes"].items():
        if not block["strategies"]:
            continue  # interrupted before its first strategy finished
        lines.append(
            f"\n{shape}: N={results['tasks']}, rate {block['rate_per_s']}/s ({block['limit']}), "
            f"ideal {block['ideal_makespan_s']}s (exact {block['ideal_makespan_exact_s']}s), "
            f"idle RSS {results['idle_rss_mb']} MB"
        )
        lines.append("  ".join(f"{title:>{width}}" if i else f"{title:<{width}}" for i, (_, title, width) in enumerate(TABLE_COLUMNS)))
        for strategy, metrics in block["strategies"].items():
            cells = []
            for i, (key, _, width) in enumerate(TABLE_COLUMNS):
                value = strategy if key == "strategy" else metrics.get(key)
                text = "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))
                cells.append(f"{text:>{width}}" if i else f"{text:<{width}}")
            if metrics.get("timed_out"):
                cells.append("(timed out)")
            lines.append("  ".join(cells))
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A serialized-DAG value (``{"__type": ..., "__var": ...}``) as plain JSON."""
    if isinstance(value, dict) and "__type" in value and "__var" in value:
        return _plain(value["__var"])
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def task_settings(db_path: Path, strategies: list[str]) -> dict[str, Any]:
    """The arguments each strategy's mapped task was serialized with (timedeltas as seconds):
    what the scheduler and the tasks really used, read from the stopped stack's SQLite DB."""
    if not db_path.exists():
        return {}
    found: dict[str, Any] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        for name in strategies:
            row = db.execute(
                "SELECT data, data_compressed FROM serialized_dag WHERE dag_id = ? ORDER BY last_updated DESC LIMIT 1",
                (f"bench_{name}",),
            ).fetchone()
            if row is None:
                continue
            data = row[0] if row[0] is not None else zlib.decompress(row[1])
            data = json.loads(data) if isinstance(data, (str, bytes)) else data
            task = _plain(data["dag"]["tasks"][0])
            found[name] = {"task_type": task.get("task_type"), **task.get("partial_kwargs", {})}
    return found


def source_fingerprint() -> dict[str, Any]:
    """Which code was measured: git HEAD, and hashes of the operator package and the DAG file
    (the operator may have uncommitted changes)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "plugins" / "network_requests").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "plugins"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", []
    return {
        "git_head": head or None,
        "plugins_uncommitted": [line[3:] for line in dirty],
        "operator_package_sha256": digest.hexdigest()[:16],
        "dag_file_sha256": hashlib.sha256((BENCH_DIR / "dags" / "bench_strategies.py").read_bytes()).hexdigest()[:16],
    }


def _db_time(value: str) -> float:
    """A naive UTC timestamp as Airflow stores it in SQLite, as epoch seconds."""
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc).timestamp()


def add_reschedule_latency(db_path: Path, runs: list[tuple[str, str, list[tuple[str, float]], dict[str, Any]]]) -> None:
    """Add ``reschedules`` and ``reschedule_wake_late_p50_s/_p95_s/_max_s`` to each run's metrics.

    For every ``up_for_reschedule`` of the run's task instances (``task_reschedule`` rows,
    all tries), the delay from the time the task asked to run again (``reschedule_date``)
    to the moment a worker was next seen running that task instance (sampler, <= one
    sample interval late): what a reschedule costs on top of the wait itself.
    """
    if not db_path.exists():
        return
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        for dag_id, run_id, pickups, metrics in runs:
            rows = db.execute(
                """
                SELECT ti_id, end_date, reschedule_date FROM task_reschedule WHERE ti_id IN (
                    SELECT id FROM task_instance WHERE dag_id = ? AND run_id = ?
                    UNION SELECT task_instance_id FROM task_instance_history WHERE dag_id = ? AND run_id = ?)
                """,
                (dag_id, run_id, dag_id, run_id),
            ).fetchall()
            seen: dict[str, list[float]] = {}
            for workload, at in pickups:
                seen.setdefault(workload.replace("-", ""), []).append(at)
            late = []
            for ti_id, ended, allowed in rows:
                ended_at = _db_time(ended)
                resumed = min((t for t in seen.get(ti_id.replace("-", ""), []) if t > ended_at), default=None)
                if resumed is not None:
                    late.append(resumed - _db_time(allowed))
            metrics["reschedules"] = len(rows)
            metrics["reschedule_wake_late_p50_s"] = rounded(percentile(late, 50))
            metrics["reschedule_wake_late_p95_s"] = rounded(percentile(late, 95))
            metrics["reschedule_wake_late_max_s"] = rounded(max(late, default=None))


def add_scheduler_log_counts(log_path: Path, runs: list[tuple[str, str, list[tuple[str, float]], dict[str, Any]]]) -> None:
    """Add ``executor_state_mismatches`` to each run's metrics: how often the scheduler logged
    "Executor ... reported that the task instance ... finished with state success, but the
    task instance's state attribute is ..." for that run (Airflow then fails the try as if
    the task had been killed externally; a race that reschedules make likely)."""
    if not log_path.exists():
        return
    counts = dict.fromkeys((run_id for _, run_id, _, _ in runs), 0)
    with open(log_path, errors="replace") as handle:
        for line in handle:
            if "but the task instance's state attribute is" not in line:
                continue
            for run_id in counts:
                if f" {run_id} " in line:
                    counts[run_id] += 1
    for _, run_id, _, metrics in runs:
        metrics["executor_state_mismatches"] = counts[run_id]


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside (results carry no machine's paths)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark three ways of sending N rate-limited requests through Airflow (issue 3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tasks", type=int, default=60, help="requests = mapped task instances per strategy (N)")
    parser.add_argument("--rate", type=float, default=1.0, help="token bucket: requests per second (R)")
    parser.add_argument("--burst", type=int, default=5, help="token bucket: burst (B)")
    parser.add_argument("--window-limit", type=int, default=20, help="fixed window: requests per window")
    parser.add_argument("--window-seconds", type=int, default=20, help="fixed window: window length, whole seconds")
    parser.add_argument(
        "--parallelism", type=int, default=4,
        help="LocalExecutor worker slots (AIRFLOW__CORE__PARALLELISM); 4 = make run's value, 2 per core",
    )  # fmt: skip
    parser.add_argument(
        "--shape", choices=[*SHAPES, "both"], default="token_bucket",
        help="both shapes take ~2x as long: more than the 10 minutes `make bench` should take",
    )  # fmt: skip
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES),
        help=f"comma-separated, run in this order; any of {', '.join(STRATEGIES)}",
    )  # fmt: skip
    parser.add_argument(
        "--operator-kwargs", default="{}", metavar="JSON",
        help="JSON object merged over OPERATOR_KWARGS in bench/dags/bench_strategies.py",
    )  # fmt: skip
    parser.add_argument(
        "--airflow-setting", action="append", default=[], metavar="SECTION__KEY=VALUE",
        help="extra Airflow setting for the whole stack, e.g. workers__min_heartbeat_interval=1 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results.json", help="results file (JSON)")
    parser.add_argument("--run-dir", type=Path, help="AIRFLOW_HOME and logs go here (default bench/runs/<stamp>)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds one strategy run may take")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds for the stack to come up")
    parser.add_argument("--idle-seconds", type=float, default=10, help="how long the idle stack is measured")
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True,
        help="run bench_warmup (no requests) once before the first strategy",
    )  # fmt: skip
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between /proc samples")
    args = parser.parse_args(argv)

    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown or not args.strategies:
        parser.error(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    try:
        args.operator_kwargs = json.loads(args.operator_kwargs)
    except ValueError as error:
        parser.error(f"--operator-kwargs is not JSON: {error}")
    if not isinstance(args.operator_kwargs, dict):
        parser.error("--operator-kwargs must be a JSON object")
    args.airflow_settings = {}
    for setting in args.airflow_setting:
        section_key, sep, value = setting.partition("=")
        if not sep or "__" not in section_key.strip("_"):
            parser.error(f"--airflow-setting {setting!r}: expected SECTION__KEY=VALUE, e.g. workers__min_heartbeat_interval=1")
        args.airflow_settings[section_key] = value
    for name in ("tasks", "burst", "window_limit", "window_seconds", "parallelism"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.rate > 0:
        parser.error("--rate must be > 0")
    args.shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall_started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    run_dir = (args.run_dir or BENCH_DIR / "runs" / started_at.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint_at_start = source_fingerprint()
    process_tree.become_subreaper()
    stack = Stack(args, run_dir)
    interrupts = 0
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        # The first signal unwinds the benchmark to the `finally` that stops everything; a
        # signal during that stop (or a second one) only makes the stop kill at once.
        if interrupts == 1 and not stopping:
            raise Interrupted(signal.Signals(signum).name)
        stack.force_kill = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    bench = Bench(args, stack)
    shapes: dict[str, Any] = {}
    idle: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    code = 0
    try:
        idle = bench.start()
        for shape in args.shapes:
            limit = (
                f"{args.rate}/s, burst {args.burst}"
                if shape == "token_bucket"
                else f"{args.window_limit} per {args.window_seconds}s"
            )
            block: dict[str, Any] = {"limit": limit, **ideal_makespan(shape, args), "strategies": {}}
            shapes[shape] = block
            for strategy in args.strategies:
                block["strategies"][strategy] = bench.run_strategy(shape, strategy)
    except Interrupted as stop:
        log(f"{stop}: stopping")
        bench.problems.append(f"interrupted by {stop}")
        code = 130
    except BenchError as error:
        log(f"error: {error}")
        bench.problems.append(str(error))
        code = 1
    except Exception as error:  # noqa: BLE001 - still stop everything and write what we have
        log(f"unexpected error: {error!r}")
        bench.problems.append(f"unexpected error: {error!r}")
        code = 1
    finally:
        stopping = True
        if bench.sampler is not None:
            bench.sampler.stop()
        stack.stop()
    with contextlib.suppress(sqlite3.Error, KeyError, IndexError, ValueError, zlib.error):
        settings = task_settings(stack.home / "airflow.db", args.strategies)
    with contextlib.suppress(sqlite3.Error, ValueError):
        add_reschedule_latency(stack.home / "airflow.db", bench.finished_runs)
    with contextlib.suppress(OSError):
        add_scheduler_log_counts(stack.log_dir / "scheduler.log", bench.finished_runs)

    if code == 0 and any(m.get("timed_out") for b in shapes.values() for m in b["strategies"].values()):
        code = 1
    headline_shape = "token_bucket" if "token_bucket" in shapes else next(iter(shapes), None)
    headline = shapes.get(headline_shape, {})
    results = {
        "tasks": args.tasks,
        "rate_per_s": headline.get("rate_per_s", args.rate),
        "ideal_makespan_s": headline.get("ideal_makespan_s", round(args.tasks / args.rate, 3)),
        "strategies": headline.get("strategies", {}),
        "shape": headline_shape,
        "shapes": shapes,
        "idle_rss_mb": idle.get("idle_rss_mb"),
        "idle": idle,
        "complete": code == 0,
        "problems": bench.problems,
        "config": {
            "parallelism": args.parallelism,
            "burst": args.burst,
            "window_limit": args.window_limit,
            "window_seconds": args.window_seconds,
            "timeout_s": args.timeout,
            "sample_interval_s": args.sample_interval,
            "warmup": args.warmup,
            "operator_kwargs_override": args.operator_kwargs,
            "airflow_settings_override": args.airflow_settings,
            "task_settings": settings,
            "executor": "LocalExecutor",
            "database": "sqlite",
        },
        "environment": {
            **fingerprint_at_start,
            # Task processes import the operator afresh at every launch: if it changed
            # during the run, the results mix two versions.
            "operator_changed_during_run": (
                source_fingerprint()["operator_package_sha256"] != fingerprint_at_start["operator_package_sha256"]
            ),
            "cpus": os.cpu_count(),
            "loadavg_at_end": list(os.getloadavg()),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_time_s": round(time.monotonic() - wall_started, 1),
        "run_dir": shown_path(run_dir),
    }
    write_json(args.out, results)
    if shapes:
        print(format_table(results), flush=True)
    for problem in bench.problems:
        log(f"problem: {problem}")
    log(f"wrote {args.out} in {results['wall_time_s']}s of wall time")
    return code


if __name__ == "__main__":
    sys.exit(main())
