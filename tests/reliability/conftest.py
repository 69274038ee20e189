"""One embedded stack (``make run``'s scripts/run_embedded.py, on a private AIRFLOW_HOME and free
ports) for the whole reliability session, with the test DAGs of tests/reliability/dag_sources.py
and the HTTP servers of tests/reliability/servers.py running in this process.

Selected with ``-m reliability`` (``make test-reliability``); a plain ``pytest tests/`` skips
these tests instead of starting the stack. The tests that restart the stack (test_07) run last
but one, and test_08 reads the output of every start.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.embedded_stack import EmbeddedStack
from tests.support.ports import free_port
from tests.support.scripted_api import ScriptedApi

from . import dag_sources
from .servers import RoutedApi, StreamingApi

MARKER = "reliability"
REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Case 9: the secrets of the Connection, looked for everywhere afterwards.
SECRET_LOGIN = "rel-user"
SECRET_PASSWORD = "p4ss-S3cret-9f2e"
SECRET_BEARER = "s3cr3t-token-7c1d"
SECRET_API_KEY = "k3y-S3cret-55ab"

# Case 7: endpoints that must never reach a server. "{evil}" is the evil server's host:port.
HOSTILE_ENDPOINTS = [
    "http://{evil}/steal",  # full URL
    "https://{evil}/steal",
    "//{evil}/steal",  # protocol-relative
    "/api@{evil}/steal",  # '@': user info / another host
    "/api/users\\..\\..\\admin",  # backslash
    "/api/users\r\nX-Injected: 1",  # CR/LF: header injection
    "/api/users\nHost: {evil}",
    "/api/../../admin",  # '..' segment
    "/api/%2e%2e/%2e%2e/admin",  # percent-encoded traversal
    "/api/%252e%252e/admin",  # double-encoded traversal
    "/%2F%2F{evil}/steal",  # encoded '//host'
    "/api/users?next=http://{evil}/",  # a URL in the query
    "api.{evil}/steal",  # no leading slash: 'base' + 'api.evil' would change the host
    "mailto:x@{evil}",  # another scheme
]
#: For a subclass that turned the endpoint check off and joins URLs with urljoin: another host.
LOOSE_ENDPOINT = "//{evil}/steal"

DAG_IDS = {
    "c1": "rel_scheduler_killed",
    "c2": "rel_task_killed",
    "c3": "rel_api_down",
    "c4": "rel_timeout",
    "c5_huge": "rel_huge_body",
    "c5_drip": "rel_drip_execution_timeout",
    "c6": "rel_stack_restart",
    "c6d": "rel_stack_restart_deferred",
    "c7": "rel_hostile_endpoints",
    "c8": "rel_odd_responses",
    "c9": "rel_secrets",
    "c11": "rel_idempotent_output",
    "c12": "rel_short_waits",
    "c13": "rel_deferred_short_waits",
}
PROJECT_DAGS = ("network_request_once",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = MARKER in (config.option.markexpr or "")
    skip = pytest.mark.skip(reason="starts the embedded stack for fault injection: run with -m reliability (make test-reliability)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(MARKER)
            if not selected:
                item.add_marker(skip)


@dataclass
class Servers:
    api: RoutedApi  # most cases, one path each
    kill_api: RoutedApi  # case 2 alone: its task process is the one connected to it
    stream_api: StreamingApi  # case 5
    down_port: int  # case 3: nothing listens there until the test starts a server
    evil: ScriptedApi  # case 7: must never see a request

    @property
    def evil_hostport(self) -> str:
        return f"127.0.0.1:{self.evil.port}"


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    api = RoutedApi().start()
    kill_api = RoutedApi().start()
    stream_api = StreamingApi().start()
    evil = ScriptedApi().start()
    try:
        yield Servers(api, kill_api, stream_api, free_port(), evil)
    finally:
        for server in (api, kill_api, stream_api, evil):
            server.stop()


def connections(servers: Servers) -> dict[str, str]:
    """``AIRFLOW_CONN_*`` of the stack: a Connection per case (the shared gate is per Connection)."""
    env = {f"AIRFLOW_CONN_REL_{case.upper()}": servers.api.base_url for case in ("c1", "c4", "c6", "c6d", "c7", "c8", "c11", "c12", "c13")}
    env["AIRFLOW_CONN_REL_C2"] = servers.kill_api.base_url
    env["AIRFLOW_CONN_REL_C3"] = f"http://127.0.0.1:{servers.down_port}"
    env["AIRFLOW_CONN_REL_C5"] = servers.stream_api.base_url
    env["AIRFLOW_CONN_REL_C5D"] = servers.stream_api.base_url
    env["AIRFLOW_CONN_REL_C9"] = json.dumps(
        {
            "conn_type": "http",
            "host": "127.0.0.1",
            "port": servers.api.port,
            "schema": "http",
            "login": SECRET_LOGIN,
            "password": SECRET_PASSWORD,
            "extra": {"Authorization": f"Bearer {SECRET_BEARER}", "X-Api-Key": SECRET_API_KEY},
        }
    )
    return env


def write_dags(folder: Path, servers: Servers) -> None:
    for name in PROJECT_DAGS:
        shutil.copy2(REPO_ROOT / "dags" / f"{name}.py", folder / f"{name}.py")
    evil = servers.evil_hostport
    sources = {
        DAG_IDS["c1"]: dag_sources.rate_limit_wait_dag(DAG_IDS["c1"], "rel_c1", "/c1/wait"),
        DAG_IDS["c2"]: dag_sources.kill_midrequest_dag(DAG_IDS["c2"], "rel_c2"),
        DAG_IDS["c3"]: dag_sources.api_down_dag(DAG_IDS["c3"], "rel_c3"),
        DAG_IDS["c4"]: dag_sources.timeout_dag(DAG_IDS["c4"], "rel_c4"),
        DAG_IDS["c5_huge"]: dag_sources.huge_body_dag(DAG_IDS["c5_huge"], "rel_c5"),
        DAG_IDS["c5_drip"]: dag_sources.drip_execution_timeout_dag(DAG_IDS["c5_drip"], "rel_c5d"),
        DAG_IDS["c6"]: dag_sources.rate_limit_wait_dag(DAG_IDS["c6"], "rel_c6", "/c6/wait"),
        DAG_IDS["c6d"]: dag_sources.rate_limit_wait_dag(DAG_IDS["c6d"], "rel_c6d", "/c6d/wait", deferrable=True),
        DAG_IDS["c7"]: dag_sources.hostile_endpoints_dag(
            DAG_IDS["c7"], "rel_c7", [e.format(evil=evil) for e in HOSTILE_ENDPOINTS], LOOSE_ENDPOINT.format(evil=evil)
        ),
        DAG_IDS["c8"]: dag_sources.responses_dag(DAG_IDS["c8"], "rel_c8"),
        DAG_IDS["c9"]: dag_sources.secrets_dag(DAG_IDS["c9"], "rel_c9"),
        DAG_IDS["c11"]: dag_sources.idempotent_dag(DAG_IDS["c11"], "rel_c11"),
        DAG_IDS["c12"]: dag_sources.short_waits_dag(DAG_IDS["c12"], "rel_c12"),
        DAG_IDS["c13"]: dag_sources.deferred_short_waits_dag(DAG_IDS["c13"], "rel_c13"),
    }
    for dag_id, source in sources.items():
        (folder / f"{dag_id}.py").write_text(source.lstrip())


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, servers: Servers) -> Iterator[EmbeddedStack]:
    """The embedded stack, started once; every DAG registered before the first test."""
    root = tmp_path_factory.mktemp("reliability")
    dags_folder = root / "dags"
    dags_folder.mkdir()
    write_dags(dags_folder, servers)
    stack = EmbeddedStack(root / "airflow-home", dags_folder=dags_folder, extra_env=connections(servers))

    def interrupt(signum, _frame):  # a CI timeout's SIGTERM must stop the stack too
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    begin = time.monotonic()
    stack.start()
    try:
        took = stack.wait_ready([*DAG_IDS.values(), *PROJECT_DAGS], timeout=300)
        sys.stderr.write(f"\n[reliability] stack ready in {took:.0f}s (AIRFLOW_HOME={stack.home})\n")
        yield stack
    finally:
        leftovers = stack.kill_everything()
        signal.signal(signal.SIGTERM, previous)
        sys.stderr.write(f"\n[reliability] stack stopped; session {time.monotonic() - begin:.0f}s; log {stack.log_path}\n")
    assert not leftovers, f"processes of the stack outlived it: {leftovers}"


@pytest.fixture(scope="session")
def api(servers: Servers) -> RoutedApi:
    return servers.api
