"""A batch keeps to the rate a server announces: nothing sent before the allowed time, no 429
beyond the first. Through real Airflow (``dag.test()``) against the benchmark's rate-limited
server on 127.0.0.1 (bench/rate_limited_server.py), which judges every request against what
it announced to anyone before (``early_requests``), and against a scripted 429."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.conftest import TEST_DAGS_DIR  # first: importing it drops AIRFLOW_CONN_NETWORK_REQUEST_API
from tests.reliability.servers import RoutedApi
from tests.support.dag_runner import collect, load_dag, set_connection, write_dag_file
from tests.support.scripted_api import ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

SOURCE = '''
import pendulum
from airflow.sdk import DAG
from network_requests.batch import BatchRequestOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         default_args={{"retries": 0}}) as dag:
    BatchRequestOperator(task_id="batch", http_conn_id="network_request_api", requests={requests!r},
                         output_folder={folder!r}, max_in_flight=4)
'''


def _run_batch(request, requests: list[str], folder) -> dict:
    dag_id = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:200]
    path = write_dag_file(TEST_DAGS_DIR, dag_id, SOURCE.format(dag_id=dag_id, requests=requests, folder=str(folder)))
    run = load_dag(path, dag_id).test()
    task = collect(dag_id, run.run_id, str(run.state)).task("batch")
    assert task.state == "success", task
    return task.xcom


@pytest.fixture
def limited_api():
    from bench.rate_limited_server import LimiterConfig, make_server

    server = make_server(config=LimiterConfig())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    set_connection(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    "shape",
    [
        {"shape": "token_bucket", "rate": 5.0, "burst": 5},
        {"shape": "fixed_window", "window_limit": 5, "window_s": 2},
    ],
    ids=["token_bucket", "fixed_window"],
)
def test_a_batch_keeps_to_the_announced_limit(request, limited_api, tmp_path, shape):
    limited_api.reset(shape)
    requests = [f"/bench/items/{i}" for i in range(20)]

    summary = _run_batch(request, requests, tmp_path)

    stats = limited_api.stats()
    totals = stats["summary"]
    paths = Counter(record["path"] for record in stats["requests"] if record["status"] == 200)
    assert summary["succeeded"] == 20 and set(paths) == set(requests)
    assert max(paths.values()) == 1, "each request succeeded once"
    assert totals["early_requests"] == 0, "nothing sent before a time the server announced"
    assert totals["responses_429"] <= 1, "no 429 beyond the first"
    print(f"\n[pacing] {shape['shape']}: 20 requests in {totals['makespan_s']}s at "
          f"{stats['config']['average_rate']}/s, {totals['responses_429']} x 429, 0 early")


def test_a_429_holds_every_request_of_the_batch_until_the_time_it_names(request, tmp_path):
    with RoutedApi(default_response=ScriptedResponse(body={"ok": True})) as api:
        api.route("/items/0", ScriptedResponse.too_many_requests(retry_after=2))
        set_connection(api.base_url)

        summary = _run_batch(request, [f"/items/{i}" for i in range(6)], tmp_path)

    refused = api.requests[0]
    assert (refused.path, refused.response.status) == ("/items/0", 429), "the first request learns the limit"
    later = api.requests[1:]
    assert len(later) == 6 and summary["succeeded"] == 6
    assert min(r.received_at for r in later) >= refused.received_at + 2, "every request waited for the Retry-After"
