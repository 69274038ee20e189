#!/usr/bin/env python3
"""The CeleryExecutor topology of docker-compose.yaml, run natively on this machine.

Used by ``make test-distributed`` (tests/distributed/) and usable by hand:

    .venv/bin/python scripts/distributed_stack.py                 # up until Ctrl-C
    .venv/bin/python scripts/distributed_stack.py -- airflow dags list   # run one command in it

What it does (docs/distributed.md has the mapping to the Compose services):

* makes sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer, starting them
  if they do not, and stops at the end only what it started;
* creates a fresh database ``network_requests_dist_<random>`` (dropped at the end) and
  claims an empty Redis database number (flushed at the end), so it never touches another
  stack's state;
* writes a private ``AIRFLOW_HOME`` (temporary directory) with a generated Fernet key,
  JWT secret, API secret key and admin password, runs ``airflow db migrate``, then starts
  ``api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` and two
  ``airflow celery worker`` processes (``worker-a``, ``worker-b``; the workers once the API
  server answers, as in Compose), each in its own session and process group under a small
  supervisor, with output in ``$AIRFLOW_HOME/stack-logs/<name>.log``;
* gives every component its own ``TMPDIR`` (``$AIRFLOW_HOME/tmp/<name>``), as separate
  containers have: nothing may rely on a file lock shared between the workers and the
  triggerer. The shared rate-limit gate is the Redis store
  (``AIRFLOW__NETWORK_REQUESTS__GATE_STORE=redis``, Connection ``redis_default`` on the
  stack's Redis database), as in docker-compose.yaml;
* waits until ``/api/v2/monitor/health`` reports every component healthy and both Celery
  workers answer a ping;
* at exit sends SIGTERM to each component (workers first), SIGKILL after a grace period. The
  supervisor of each component is a child subreaper, so task processes (which Airflow puts
  into process groups of their own) and orphans end up below it and are stopped too; the
  stack then checks that no process it ever saw is still running. Processes are found with
  psutil through ``scripts/process_tree.py``.

The ``DistributedStack`` object gives tests what they need: ``token()``, ``rest()``, ``cli()``,
``wait_for_run()``, ``task_instances()``, ``celery_control()``...

Everything listens on 127.0.0.1 only, except the Celery workers' log servers: Airflow 3.3.2
binds them to every interface (``host=""`` is hard-coded in airflow/utils/serve_logs/core.py).
Each worker gets its own free port for it (``[logging] worker_log_server_port``). The
scheduler and the triggerer run with ``--skip-serve-logs``: with the CeleryExecutor they
serve no task logs, and their servers would clash on the same default ports.

Stdlib and psutil (``scripts/process_tree.py``) at import time; ``scripts/distributed_hostname.py``
is stdlib only. psycopg2, redis and celery come from the project's venv and are imported when
needed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import process_tree

REPO = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO / "scripts"
VENV_BIN = Path(sys.executable).parent  # not resolved: it must stay the venv's bin/

#: Set in the environment of every process of one stack; how stop() finds all of them.
STACK_ID_ENV = "NETWORK_REQUESTS_DIST_STACK_ID"
#: Read by scripts/distributed_hostname.py: what a worker records as ti.hostname.
HOSTNAME_ENV = "NETWORK_REQUESTS_HOSTNAME"
#: Marks the Redis database number a stack has claimed.
REDIS_OWNER_KEY = "network_requests_dist:owner"

#: argv[1] of this file that runs ``supervise`` (how every component is started).
SUPERVISE_COMMAND = "_supervise"

ADMIN_USER = "admin"
DEFAULT_WORKERS: dict[str, str] = {"worker-a": "default", "worker-b": "default"}
TERMINAL_RUN_STATES = frozenset({"success", "failed"})
HEALTH_COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")


class StackError(RuntimeError):
    """The stack could not start, or a component of it died."""


def log(message: str) -> None:
    print(f"[distributed-stack] {message}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def check_celery_compatible(python: str = sys.executable, env: Mapping[str, str] | None = None) -> None:
    """Fail fast, with the fix, when the installed Celery cannot run the Celery provider.

    apache-airflow-providers-celery 3.26.0 imports ``retry`` from ``celery.backends.database``,
    which Celery 5.7.0 removed: with that pair every ``airflow celery worker`` (and the
    scheduler, when it loads the CeleryExecutor) dies at import. Checked in a child process
    so that the answer is the one the stack's processes (same PYTHONPATH) will get.
    """
    probe = "import celery; from celery.backends.database import retry; print(celery.__version__)"
    result = subprocess.run(
        [python, "-c", probe], env=dict(env or os.environ), capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        version = subprocess.run(
            [python, "-c", "import celery; print(celery.__version__)"],
            env=dict(env or os.environ), capture_output=True, text=True, timeout=60,
        ).stdout.strip()  # fmt: skip
        raise StackError(
            f"celery {version or '?'} cannot run apache-airflow-providers-celery 3.26.0 (it imports "
            "celery.backends.database.retry, removed in celery 5.7.0): install celery<5.7, "
            "e.g. `pip install celery==5.6.3` (and pin it in constraints.txt)"
        )


# --------------------------------------------------------------------------
# Processes. Every component runs under a small supervisor (``supervise`` below, this
# same file) that is a child subreaper: task processes, which Airflow puts in process
# groups of their own, and orphans of the component are re-parented to it, so it can
# stop all of them. (An environment marker alone cannot find them: setproctitle, which
# Airflow and Celery use, overwrites /proc/<pid>/environ.)
# --------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _prctl(option: int, value: int) -> bool:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap() -> dict[int, int]:
    """Reap every exited child without blocking: {pid: exit code}."""
    reaped = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = os.waitstatus_to_exitcode(status)


def supervise(command: list[str], grace: float, owner: int | None = None) -> int:
    """Run ``command`` as a child; on SIGTERM/SIGINT/SIGHUP (or when ``owner`` dies) pass
    SIGTERM on, SIGKILL it ``grace`` seconds later. Once it has exited, stop everything
    that is still below this process (SIGTERM, SIGKILL 5 s later) and return its exit code."""
    process_tree.become_subreaper()
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    stop_requested: list[float] = []

    def on_signal(_signum: int, _frame: Any) -> None:
        if not stop_requested:
            stop_requested.append(time.monotonic())

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if owner is not None and os.getppid() != owner:
        return 1  # the stack is gone already
    child = os.fork()
    if child == 0:  # the component
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    code: int | None = None
    forwarded = killed = False
    me = os.getpid()
    while code is None:
        reaped = _reap()
        if child in reaped:
            code = reaped[child]
            break
        if stop_requested and not forwarded:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
            forwarded = True
        if stop_requested and not killed and time.monotonic() - stop_requested[0] > grace:
            process_tree.signal_all(process_tree.descendants(me), signal.SIGKILL)
            killed = True
        time.sleep(0.1)
    rest = process_tree.descendants(me)
    if rest:
        process_tree.signal_all(rest, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while process_tree.descendants(me) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.1)
        while rest := process_tree.descendants(me):
            process_tree.signal_all(rest, signal.SIGKILL)
            _reap()
            time.sleep(0.1)
    _reap()
    return code


@dataclass
class Component:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.text[:300]!r})"


# --------------------------------------------------------------------------
# The stack.
# --------------------------------------------------------------------------


class DistributedStack:
    """A native CeleryExecutor deployment: ``with DistributedStack() as stack: ...``."""

    def __init__(
        self,
        dags_folder: str | os.PathLike | None = None,
        *,
        workers: Mapping[str, str] | None = None,
        concurrency: int = 2,
        extra_env: Mapping[str, str] | None = None,
        pg_host: str = "127.0.0.1",
        pg_port: int = 5432,
        pg_user: str | None = None,
        redis_host: str = "127.0.0.1",
        redis_port: int = 6379,
        redis_db: int | None = None,
        keep_home: bool = False,
        startup_timeout: float = 300.0,
        stop_grace: float = 20.0,
    ) -> None:
        self.dags_folder = Path(dags_folder or REPO / "dags").resolve()
        self.workers = dict(workers or DEFAULT_WORKERS)
        self.concurrency = concurrency
        self.extra_env = dict(extra_env or {})
        self.pg_host, self.pg_port = pg_host, pg_port
        self.pg_user = pg_user or os.environ.get("PGUSER") or "postgres"
        self.redis_host, self.redis_port = redis_host, redis_port
        self.redis_db = redis_db
        self.keep_home = keep_home
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace

        self.stack_id = secrets.token_hex(6)
        self.db_name = f"network_requests_dist_{self.stack_id}"
        self.password = secrets.token_urlsafe(18)
        self.home: Path | None = None
        self.api_port: int | None = None
        self.env: dict[str, str] = {}
        self.components: dict[str, Component] = {}
        self.timings: dict[str, float] = {}
        self.worker_nodes: dict[str, str] = {}  # worker-a -> worker-a@<host> (Celery node name)

        self._started_postgres: str | None = None  # cluster version we started
        self._started_redis = False
        self._db_created = False
        self._redis_claimed = False
        self._token: str | None = None
        self._celery_app: Any = None
        self._stopped = False
        self.leftover_processes: list[int] = []
        self._seen: set[psutil.Process] = set()  # every process of the stack seen (pid + start time)

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> DistributedStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> DistributedStack:
        begin = time.monotonic()
        check_celery_compatible()
        self._ensure_postgres()
        self._ensure_redis()
        self._create_database()
        self._claim_redis_db()
        self._write_home()
        self.timings["prepare"] = time.monotonic() - begin

        step = time.monotonic()
        result = self.cli("db", "migrate", timeout=600)
        if result.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        self.timings["db_migrate"] = time.monotonic() - step

        step = time.monotonic()
        self._start_components()
        self.wait_healthy(self.startup_timeout)
        self.timings["components_healthy"] = time.monotonic() - step
        self.timings["start_total"] = time.monotonic() - begin
        log(
            "up in %.0fs (db migrate %.0fs): %s, user %s, AIRFLOW_HOME=%s"
            % (self.timings["start_total"], self.timings["db_migrate"], self.base_url, ADMIN_USER, self.home)
        )
        return self

    def stop(self) -> None:
        """Stop every process of the stack, then drop its database and flush its Redis DB."""
        if self._stopped:
            return
        self._stopped = True
        begin = time.monotonic()
        if self._celery_app is not None:
            with contextlib.suppress(Exception):
                self._celery_app.close()
        self._stop_processes()
        if self._db_created:
            with contextlib.suppress(Exception):
                self._drop_database()
        if self._redis_claimed:
            with contextlib.suppress(Exception):
                self._redis(self.redis_db).flushdb()
        if self._started_redis:
            log("stopping the Redis this stack started")
            with contextlib.suppress(Exception):
                self._redis(0).shutdown(nosave=True)
        if self._started_postgres:
            log("stopping the PostgreSQL this stack started")
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", self._started_postgres, "main", "stop"],
                check=False,
            )
        if self.home is not None and not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)
        elif self.home is not None:
            log(f"kept AIRFLOW_HOME {self.home}")
        self.timings["stop"] = time.monotonic() - begin

    # -- infrastructure ------------------------------------------------------------------

    def _pg_connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host=self.pg_host, port=self.pg_port, user=self.pg_user, dbname=dbname, connect_timeout=3
        )

    def _pg_ready(self) -> bool:
        try:
            self._pg_connect().close()
            return True
        except Exception:
            return False

    def _ensure_postgres(self) -> None:
        if self._pg_ready():
            return
        if self.pg_host not in ("127.0.0.1", "localhost") or not Path("/etc/postgresql").is_dir():
            raise StackError(f"PostgreSQL at {self.pg_host}:{self.pg_port} does not answer")
        versions = sorted(os.listdir("/etc/postgresql"))
        if not versions:
            raise StackError("PostgreSQL does not answer and no cluster is configured in /etc/postgresql")
        version = versions[-1]
        log(f"PostgreSQL does not answer: starting cluster {version}/main")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
        self._started_postgres = version
        deadline = time.monotonic() + 60
        while not self._pg_ready():
            if time.monotonic() > deadline:
                raise StackError("PostgreSQL did not come up within 60 s")
            time.sleep(0.5)

    def _redis(self, db: int | None):
        import redis

        return redis.Redis(host=self.redis_host, port=self.redis_port, db=db or 0, socket_timeout=5)

    def _redis_ready(self) -> bool:
        try:
            return bool(self._redis(0).ping())
        except Exception:
            return False

    def _ensure_redis(self) -> None:
        if self._redis_ready():
            return
        if self.redis_host not in ("127.0.0.1", "localhost"):
            raise StackError(f"Redis at {self.redis_host}:{self.redis_port} does not answer")
        log("Redis does not answer: starting redis-server on 127.0.0.1")
        redis_dir = Path("/var/lib/redis")
        log_dir = Path("/var/log/redis")
        redis_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_name = "ci.log" if self.redis_port == 6379 else f"ci-{self.redis_port}.log"
        subprocess.run(
            ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1",
             "--port", str(self.redis_port), "--save", "", "--appendonly", "no",
             "--dir", str(redis_dir), "--logfile", str(log_dir / log_name)],
            check=True,
        )  # fmt: skip
        self._started_redis = True
        deadline = time.monotonic() + 30
        while not self._redis_ready():
            if time.monotonic() > deadline:
                raise StackError("Redis did not come up within 30 s")
            time.sleep(0.2)

    def _create_database(self) -> None:
        connection = self._pg_connect()
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{self.db_name}"')
        finally:
            connection.close()
        self._db_created = True

    def _drop_database(self) -> None:
        connection = self._pg_connect()
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                # WITH (FORCE) (PostgreSQL 13+) ends sessions a killed process may have left behind.
                cursor.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        finally:
            connection.close()

    def _claim_redis_db(self) -> None:
        """Take an empty Redis database number (1..15; 0 is what Compose and others use)."""
        candidates = [self.redis_db] if self.redis_db is not None else list(range(1, 16))
        for number in candidates:
            client = self._redis(number)
            try:
                if client.dbsize() == 0 and client.set(REDIS_OWNER_KEY, self.stack_id, nx=True):
                    self.redis_db = number
                    self._redis_claimed = True
                    return
            finally:
                client.close()
        raise StackError(f"no empty Redis database among {candidates}")

    # -- configuration -------------------------------------------------------------------

    @property
    def sql_alchemy_conn(self) -> str:
        return f"postgresql+psycopg2://{self.pg_user}@{self.pg_host}:{self.pg_port}/{self.db_name}"

    @property
    def broker_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def gate_redis_uri(self) -> str:
        """The ``redis_default`` Connection of the Redis gate store: the stack's own Redis database."""
        return f"redis://{self.redis_host}:{self.redis_port}/?db={self.redis_db}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def tmpdir(self, component: str) -> Path:
        """The component's own TMPDIR, as a container of its own would have."""
        assert self.home is not None
        return self.home / "tmp" / component

    @property
    def data_dir(self) -> Path:
        assert self.home is not None
        return self.home / "data"

    @property
    def logs_dir(self) -> Path:
        assert self.home is not None
        return self.home / "logs"

    @property
    def airflow_command(self) -> list[str]:
        executable = VENV_BIN / "airflow"
        return [str(executable)] if executable.exists() else [sys.executable, "-m", "airflow"]

    def _write_home(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix=f"network-requests-dist-{self.stack_id}-"))
        (self.home / "stack-logs").mkdir()
        self.data_dir.mkdir()
        passwords = self.home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: self.password}))
        passwords.chmod(0o600)
        self.api_port = free_port()

        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))
            and key not in ("AIRFLOW_HOME", "AIRFLOW_CONFIG", "NETWORK_REQUESTS_DATA_DIR", HOSTNAME_ENV)
        }
        python_path = [str(SCRIPTS_DIR), inherited.get("PYTHONPATH", "")]
        self.env = {
            **inherited,
            "PATH": os.pathsep.join([str(VENV_BIN), inherited.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(p for p in python_path if p),
            "PYTHONUNBUFFERED": "1",
            STACK_ID_ENV: self.stack_id,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            # Distinct ti.hostname per worker although both run on this machine.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "distributed_hostname.hostname",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{self.pg_user}@{self.pg_host}:{self.pg_port}/{self.db_name}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.concurrency),
            # As make run (scripts/run_embedded.py): a task's supervisor notices its exit within
            # 1 s, not up to 5 s, and frees the slot; 15 failures keep 15 s of API outage tolerance.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "15",
            # Silences the provider's warning; tasks here never run for a day.
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # Operators wait in the triggerer unless a task says otherwise (Airflow ships false).
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "true",
            # New DAG files are noticed within 10 s (default 5 min).
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "NETWORK_REQUESTS_DATA_DIR": str(self.data_dir),
            # The shared rate-limit gate in Redis, atomic across the workers and the triggerer
            # (the Variable store is correct on one host only; docs/distributed.md).
            "AIRFLOW__NETWORK_REQUESTS__GATE_STORE": "redis",
            "AIRFLOW_CONN_REDIS_DEFAULT": self.gate_redis_uri,
            **self.extra_env,
        }

    def _start_components(self) -> None:
        """Start the components in Compose's order: api-server, scheduler, dag-processor and
        triggerer at once; the workers once the API server answers (in docker-compose.yaml
        airflow-worker waits for a healthy airflow-apiserver: tasks talk to its Execution API)."""
        assert self.home is not None
        for name, args in (
            ("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port)]),
            ("scheduler", ["scheduler", "--skip-serve-logs"]),
            ("dag-processor", ["dag-processor"]),
            ("triggerer", ["triggerer", "--skip-serve-logs"]),
        ):
            self._spawn(name, args, {})
        deadline = time.monotonic() + self.startup_timeout
        while self.health() is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"the API server did not answer within {self.startup_timeout:.0f}s\n{self.tail_logs(20)}")
            time.sleep(0.5)
        for name, queues in self.workers.items():
            self._spawn(
                name,
                ["celery", "worker", "--celery-hostname", f"{name}@%h",
                 "--queues", queues, "--concurrency", str(self.concurrency)],  # fmt: skip
                {HOSTNAME_ENV: name, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())},
            )

    def _spawn(self, name: str, args: list[str], extra_env: Mapping[str, str]) -> Component:
        assert self.home is not None
        self.tmpdir(name).mkdir(parents=True, exist_ok=True)
        component = Component(
            name=name,
            args=[sys.executable, str(Path(__file__).resolve()), SUPERVISE_COMMAND,
                  "--grace", str(self.stop_grace), "--owner", str(os.getpid()),
                  "--", *self.airflow_command, *args],  # fmt: skip
            env={**self.env, "TMPDIR": str(self.tmpdir(name)), **extra_env},
            log_path=self.home / "stack-logs" / f"{name}.log",
        )
        with open(component.log_path, "ab") as output:
            component.proc = subprocess.Popen(
                component.args,
                env=component.env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group
            )
        with contextlib.suppress(psutil.Error):
            self._seen.add(psutil.Process(component.proc.pid))
        self.components[name] = component
        return component

    def _check_alive(self) -> None:
        for component in self.components.values():
            if not component.alive():
                code = component.proc.returncode if component.proc else None
                raise StackError(
                    f"{component.name} exited with {code}; last lines of {component.log_path}:\n"
                    f"{tail(component.log_path)}"
                )

    def health(self) -> dict[str, Any] | None:
        try:
            response = self.rest("GET", "/api/v2/monitor/health", auth=False, timeout=5)
        except OSError:
            return None
        return response.json() if response.ok else None

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            self._check_alive()
            health = self.health()
            last = health
            if health and all(
                (health.get(name) or {}).get("status") == "healthy" for name in HEALTH_COMPONENTS
            ):
                missing = set(self.workers) - set(self._ping_workers())
                if not missing:
                    return
                last = {"health": health, "workers not answering": sorted(missing)}
            if time.monotonic() > deadline:
                raise StackError(f"stack not healthy within {timeout:.0f}s: {last}\n{self.tail_logs(20)}")
            time.sleep(1)

    def _ping_workers(self) -> list[str]:
        """Stack worker names (worker-a, ...) whose Celery node answers a ping."""
        try:
            replies = self.celery_control().ping(timeout=1.0) or []
        except Exception:
            return []
        answered = []
        for reply in replies:
            for node in reply:
                name = node.split("@", 1)[0]
                if name in self.workers:
                    self.worker_nodes[name] = node
                    answered.append(name)
        return answered

    def _note_processes(self) -> None:
        """Remember every process now below a component (for the no-orphans check at the end)."""
        for component in self.components.values():
            if component.proc is not None:
                self._seen.update(process_tree.descendants(component.proc.pid))

    def _stop_processes(self) -> None:
        """Stop the components, workers first; no process of the stack may outlive this.

        Each component's supervisor gets SIGTERM and passes it on (a Celery worker then shuts
        down warmly, finishing its running tasks); it SIGKILLs the component after
        ``stop_grace`` seconds, then stops whatever is left below it, task processes and
        orphans included. A supervisor that has not exited 15 s after that is killed with its
        whole tree. Finally every process ever seen in the stack is checked to be gone.
        """
        self._note_processes()
        order = [n for n in self.workers if n in self.components] + [
            n for n in ("triggerer", "dag-processor", "scheduler", "api-server") if n in self.components
        ]
        procs = [self.components[n].proc for n in order if self.components[n].proc is not None]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        deadline = asked + self.stop_grace + 15
        self.stop_durations: dict[str, float] = {}

        def note_stopped() -> None:
            for name in order:
                proc = self.components[name].proc
                if proc is not None and proc.poll() is not None and name not in self.stop_durations:
                    self.stop_durations[name] = round(time.monotonic() - asked, 1)

        while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
            self._note_processes()
            note_stopped()
            time.sleep(0.2)
        note_stopped()
        for proc in procs:
            if proc.poll() is None:
                log(f"supervisor {proc.pid} did not stop: killing its process tree")
                process_tree.signal_all(process_tree.tree(proc.pid), signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        leftovers = process_tree.alive([*self._seen, *process_tree.processes_with_env(STACK_ID_ENV, self.stack_id)])
        if leftovers:
            log(f"killing {len(leftovers)} process(es) that outlived their supervisor: {[p.pid for p in leftovers]}")
            process_tree.signal_all(leftovers, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_tree.alive(leftovers) and time.monotonic() < deadline:
                time.sleep(0.2)
        self.leftover_processes = [process.pid for process in leftovers]
        self.processes_seen = len(self._seen)

    def stop_component(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop one component (its process group) and wait for it; returns its exit code."""
        proc = self.components[name].proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        self._note_processes()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process_tree.signal_all(process_tree.tree(proc.pid), signal.SIGKILL)
            return proc.wait(timeout=10)

    def tail_logs(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {c.name} ({c.log_path}) -----\n{tail(c.log_path, lines)}" for c in self.components.values()
        )

    # -- helpers for tests ---------------------------------------------------------------

    def token(self, *, refresh: bool = False) -> str:
        """A Bearer token for the admin user (``POST /auth/token``)."""
        if self._token and not refresh:
            return self._token
        response = self.rest(
            "POST", "/auth/token", {"username": ADMIN_USER, "password": self.password}, auth=False
        )
        if not response.ok:
            raise StackError(f"POST /auth/token answered {response.status}: {response.text[:500]}")
        self._token = response.json()["access_token"]
        return self._token

    def rest(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        auth: bool = True,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """One request to the API server; any status comes back as a Response (never raises on 4xx/5xx)."""
        for attempt in (1, 2):
            request_headers = {"Accept": "application/json", **(headers or {})}
            data = None
            if json_body is not None:
                data = json.dumps(json_body).encode()
                request_headers["Content-Type"] = "application/json"
            if auth:
                request_headers["Authorization"] = f"Bearer {self.token(refresh=attempt == 2)}"
            request = urllib.request.Request(
                self.base_url + path, data=data, method=method.upper(), headers=request_headers
            )
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    response = Response(answer.status, answer.read(), dict(answer.headers))
            except urllib.error.HTTPError as error:
                response = Response(error.code, error.read(), dict(error.headers or {}))
            if response.status == 401 and auth and attempt == 1:
                continue  # the token expired: get a new one once
            return response
        return response

    def cli(self, *args: str, timeout: float = 300.0, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """``airflow <args>`` with the stack's environment; output captured as text."""
        return subprocess.run(
            [*self.airflow_command, *args],
            env={**self.env, **(env or {})},
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    @staticmethod
    def quote(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        response = self.rest("GET", f"/api/v2/dags/{self.quote(dag_id)}/dagRuns/{self.quote(run_id)}")
        if not response.ok:
            raise StackError(f"GET dag run {dag_id}/{run_id}: {response}")
        return response.json()

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        response = self.rest("GET", f"/api/v2/dags/{self.quote(dag_id)}/dagRuns?limit=100&order_by=run_after")
        if not response.ok:
            raise StackError(f"GET dag runs of {dag_id}: {response}")
        return response.json()["dag_runs"]

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None, **extra: Any) -> Response:
        """``POST /api/v2/dags/{dag_id}/dagRuns`` for a manual run without a logical date."""
        body = {"logical_date": None, "conf": dict(conf or {}), **extra}
        return self.rest("POST", f"/api/v2/dags/{self.quote(dag_id)}/dagRuns", body)

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 180.0) -> None:
        """Until the DAG processor has parsed and the API server knows every one of ``dag_ids``."""
        pending = set(dag_ids)
        deadline = time.monotonic() + timeout
        while pending:
            self._check_alive()
            for dag_id in sorted(pending):
                response = self.rest("GET", f"/api/v2/dags/{self.quote(dag_id)}/details")
                if response.ok:
                    pending.discard(dag_id)
            if not pending:
                return
            if time.monotonic() > deadline:
                errors = self.rest("GET", "/api/v2/importErrors").text[:3000]
                raise StackError(f"DAGs not registered within {timeout:.0f}s: {sorted(pending)}; import errors: {errors}")
            time.sleep(1)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0, *, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the run is success or failed; return the run (REST shape)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                states = [(ti["task_id"], ti["map_index"], ti["state"]) for ti in self.task_instances(dag_id, run_id, tries=False)]
                raise TimeoutError(f"{dag_id}/{run_id} still {run['state']} after {timeout:.0f}s; tasks: {states}")
            self._check_alive()
            time.sleep(poll)

    def task_instances(self, dag_id: str, run_id: str, *, tries: bool = True) -> list[dict[str, Any]]:
        """The run's task instances (REST shape: task_id, map_index, state, hostname, try_number, ...),
        each with ``tries``: the ``/tries`` entries (one per try, with its hostname and state)."""
        base = f"/api/v2/dags/{self.quote(dag_id)}/dagRuns/{self.quote(run_id)}/taskInstances"
        instances: list[dict[str, Any]] = []
        while True:
            # The API answers at most [api] maximum_page_limit (100) per page: read every page.
            response = self.rest("GET", f"{base}?limit=100&offset={len(instances)}&order_by=id")
            if not response.ok:
                raise StackError(f"GET {base}: {response}")
            page = response.json()
            instances.extend(page["task_instances"])
            if not page["task_instances"] or len(instances) >= page["total_entries"]:
                break
        if tries:
            for ti in instances:
                suffix = f"/{ti['map_index']}" if ti["map_index"] >= 0 else ""
                answer = self.rest("GET", f"{base}/{self.quote(ti['task_id'])}{suffix}/tries")
                ti["tries"] = answer.json()["task_instances"] if answer.ok else []
        return sorted(instances, key=lambda ti: (ti["task_id"], ti["map_index"]))

    def redis(self):
        """A redis-py client on the stack's own Redis database (the broker's and the gate's)."""
        return self._redis(self.redis_db)

    def celery_control(self):
        """``celery.app.control.Control`` on this stack's broker (ping, add_consumer, cancel_consumer...)."""
        if self._celery_app is None:
            from celery import Celery

            self._celery_app = Celery("network-requests-dist-control", broker=self.broker_url)
        return self._celery_app.control

    def node(self, worker: str) -> str:
        """The Celery node name of a stack worker, e.g. ``worker-a@myhost``."""
        if worker not in self.worker_nodes:
            self._ping_workers()
        return self.worker_nodes[worker]

    def active_queues(self) -> dict[str, list[str]]:
        """{worker name: [queue names]} as the workers report them."""
        replies = self.celery_control().inspect(timeout=2.0).active_queues() or {}
        return {node.split("@", 1)[0]: sorted(q["name"] for q in queues) for node, queues in replies.items()}

    def process_count(self) -> int:
        """How many processes run below the components now (supervisors included)."""
        return sum(len(process_tree.tree(c.proc.pid)) for c in self.components.values() if c.alive())


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the CeleryExecutor topology natively (PostgreSQL, Redis, api-server, scheduler, "
        "dag-processor, triggerer, two Celery workers).",
        epilog="With a command after '--', run it in the stack's environment and stop; else run until Ctrl-C.",
    )
    parser.add_argument("--dags-folder", default=str(REPO / "dags"))
    parser.add_argument("--concurrency", type=int, default=2, help="per worker (default 2)")
    parser.add_argument("--worker-a-queues", default="default")
    parser.add_argument("--worker-b-queues", default="default")
    parser.add_argument("--redis-db", type=int, default=None, help="default: the first empty one of 1..15")
    parser.add_argument("--keep-home", action="store_true", help="keep AIRFLOW_HOME (logs) at the end")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signals: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    stack = DistributedStack(
        args.dags_folder,
        workers={"worker-a": args.worker_a_queues, "worker-b": args.worker_b_queues},
        concurrency=args.concurrency,
        redis_db=args.redis_db,
        keep_home=args.keep_home,
    )
    code = 0
    try:
        stack.start()
        print(
            f"\nAPI/UI:    {stack.base_url}  (user {ADMIN_USER}, password {stack.password})\n"
            f"home:      {stack.home}\ndatabase:  {stack.sql_alchemy_conn}\nbroker:    {stack.broker_url}\n"
            f"logs:      {stack.home}/stack-logs/\n",
            flush=True,
        )
        if args.command:
            env = {**stack.env, "AIRFLOW_API_URL": stack.base_url, "AIRFLOW_ADMIN_PASSWORD": stack.password}
            code = subprocess.run(args.command, env=env, check=False).returncode
        else:
            print("Ctrl-C stops everything.", flush=True)
            while True:
                stack._check_alive()
                time.sleep(2)
    except KeyboardInterrupt:
        code = 130 if signals and signals[0] == signal.SIGINT else 143
    except StackError as error:
        log(str(error))
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
    return code


def supervise_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"distributed_stack.py {SUPERVISE_COMMAND}")
    parser.add_argument("--grace", type=float, default=20.0)
    parser.add_argument("--owner", type=int, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return supervise(command, args.grace, args.owner)


if __name__ == "__main__":
    if sys.argv[1:2] == [SUPERVISE_COMMAND]:
        sys.exit(supervise_main(sys.argv[2:]))
    sys.exit(main())
