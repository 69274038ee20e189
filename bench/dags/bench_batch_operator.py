"""
### Benchmark DAG (issue 12): N rate-limited GETs as ONE batch task

`bench_batch_operator` sends the same workload as the DAGs in `bench_strategies.py` (`BENCH_TASKS`
GET requests to `/bench/items/<i>` behind the `bench_api` Connection), but as one task of
the batch mode (`network_requests.batch.BatchRequestOperator`, issue 12 item 1): one worker
launch writes the request list and defers; the triggerer sends the list, up to
`max_in_flight` at once, paced by the Connection's shared gate, and ends the task there.
`bench/run_scale.py` (`make bench-scale`) measures it as the strategy `batch_operator`.

Like the mapped operator's XCom bodies, each small JSON body is kept as a value in the
batch's checkpoint (`write_bodies=False`), not in a file per request.

Environment: `BENCH_TASKS` (number of requests, default 60) and `BENCH_BATCH_KWARGS`, a JSON
object merged over `BATCH_KWARGS` (e.g. `{"max_in_flight": 8}`), to try a variant without
editing this file.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from network_requests.batch import BatchRequestOperator

#: The same Connection and endpoints as bench_strategies.py (each item its own path, so the
#: server can tell the requests apart).
CONN_ID = "bench_api"
N_TASKS = int(os.environ.get("BENCH_TASKS", "60"))
ENDPOINTS = [f"/bench/items/{i}" for i in range(N_TASKS)]

#: BatchRequestOperator arguments besides the requests; the operator's defaults otherwise.
BATCH_KWARGS: dict = {
    "request_timeout": (5.0, 30.0),  # as bench_strategies.REQUEST_TIMEOUT
    "write_bodies": False,
}
BATCH_KWARGS.update(json.loads(os.environ.get("BENCH_BATCH_KWARGS") or "{}"))

with DAG(
    dag_id="bench_batch_operator",
    description="Bench: one batch task sends every request, paced by the shared gate",
    schedule=None,  # triggered by the runner only
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["bench"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=5)},
):
    BatchRequestOperator(
        task_id="requests",
        http_conn_id=CONN_ID,
        requests=[{"endpoint": endpoint, "method": "GET"} for endpoint in ENDPOINTS],
        **BATCH_KWARGS,
    )
