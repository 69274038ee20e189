"""Test set-up: a private Airflow home with a SQLite metadata DB, and the plugin on sys.path.

The environment is set before anything imports Airflow, so the tests never touch a
developer's ``~/airflow`` or the ``make run`` state in ``.airflow/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DIR = REPO_ROOT / "plugins"
TESTS_DIR = Path(__file__).resolve().parent

# Test modules import this file again as `tests.conftest` (for the constants below); both
# imports must agree on one home, or Airflow's engine and the migrated DB part ways.
# A second session in the same process gets the same answer. Each pytest-xdist worker
# (`make test` runs two) has a home of its own: one SQLite file written by two processes
# would lock, and a DAG file of one worker's test would be parsed by the other's.
_HOME_MARKER = "NETWORK_REQUESTS_TEST_HOME" + (f"_{os.environ['PYTEST_XDIST_WORKER']}"
                                               if "PYTEST_XDIST_WORKER" in os.environ else "")
if _HOME_MARKER not in os.environ:
    os.environ[_HOME_MARKER] = tempfile.mkdtemp(prefix="network-requests-test-home-")
_TEST_HOME = Path(os.environ[_HOME_MARKER])
#: dag.test() in Airflow 3.3 needs the DAG in a file inside the dags folder, so tests
#: write their DAGs here (see tests/support/dag_runner.py).
TEST_DAGS_DIR = _TEST_HOME / "dags"
TEST_DAGS_DIR.mkdir(exist_ok=True)

os.environ.update(
    {
        "AIRFLOW_HOME": str(_TEST_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(TEST_DAGS_DIR),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_TEST_HOME / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # As every stack of the project (Airflow ships false): dag.test() runs tasks in this process.
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "true",
        "NETWORK_REQUESTS_DATA_DIR": str(_TEST_HOME / "data"),
    }
)
# Never let a developer's own connection leak into the tests.
os.environ.pop("AIRFLOW_CONN_NETWORK_REQUEST_API", None)

for path in (str(PLUGINS_DIR), str(REPO_ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="session", autouse=True)
def airflow_db() -> Path:
    """A migrated SQLite metadata DB, made once per test session before the first test."""
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return _TEST_HOME


@pytest.fixture
def scripted_api() -> Iterator:
    """A scripted HTTP server on 127.0.0.1 (see tests/support/scripted_api.py)."""
    from tests.support.scripted_api import scripted_api_fixture

    yield from scripted_api_fixture()
