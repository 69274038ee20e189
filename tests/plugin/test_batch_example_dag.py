"""The shipped example dags/network_request_batch.py, through real Airflow (``dag.test()``)
against the real demo API on 127.0.0.1 (faster than its default, so the test takes seconds)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TEST_DAGS_DIR  # first: importing it drops AIRFLOW_CONN_NETWORK_REQUEST_API
from tests.support.dag_runner import collect, load_dag, set_connection

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def demo_api():
    from include.demo_api import make_server

    server = make_server("127.0.0.1", 0, rate=20, burst=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    set_connection(f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


def test_the_batch_example_fetches_every_item_once_in_mapped_chunks_and_reports_them(demo_api):
    target = TEST_DAGS_DIR / "network_request_batch.py"
    shutil.copy(REPO_ROOT / "dags" / "network_request_batch.py", target)
    dag = load_dag(target, "network_request_batch")

    run = dag.test(run_conf={"count": 25, "chunk_size": 10})

    result = collect("network_request_batch", run.run_id, str(run.state))
    assert result.state == "success"
    batches = [task for (task_id, _), task in sorted(result.tasks.items()) if task_id == "fetch_items"]
    assert [task.xcom["total"] for task in batches] == [10, 10, 5]
    assert result.task("report").xcom["fetched"] == 25
    served = demo_api.stats.snapshot()
    assert served["responses_2xx"] == 25, "each item fetched once"
    assert served["responses_429"] <= 1
    folder = Path(batches[0].xcom["output_folder"])
    saved = sorted(folder.glob("item-*.json"))
    assert len(saved) == 25
    assert json.loads((folder / "item-7.json").read_text())["item"]["id"] == 7
