"""
### Benchmark DAG (issue 12): N rate-limited GETs as ONE batch task

`bench_batch_operator` sends the same workload as the DAGs in `bench_strategies.py` (`BENCH_TASKS`
GET requests to `/bench/items/<i>` behind the `bench_api` Connection), but as one task of
the batch mode (`network_requests.batch`, issue 12 item 1), which paces the list through
the shared gate and waits in the triggerer. `bench/run_scale.py` (`make bench-scale`)
measures it as the strategy `batch_operator`.

Until `network_requests.batch` exists this file defines no DAG, and `make bench-scale`
skips the strategy and says so. **When the batch mode lands**, check the call below against
its real name and arguments (it is written from the issue's description, not from code).
"""

from __future__ import annotations

import importlib.util
import os

import pendulum
from airflow.sdk import DAG

#: The same Connection and endpoints as bench_strategies.py (each item its own path, so the
#: server can tell the requests apart).
CONN_ID = "bench_api"
N_TASKS = int(os.environ.get("BENCH_TASKS", "60"))
ENDPOINTS = [f"/bench/items/{i}" for i in range(N_TASKS)]

if importlib.util.find_spec("network_requests.batch") is not None:
    from network_requests.batch import BatchRequestOperator

    with DAG(
        dag_id="bench_batch_operator",
        description="Bench: one batch task sends every request, paced by the shared gate",
        schedule=None,  # triggered by the runner only
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        tags=["bench"],
        doc_md=__doc__,
    ):
        BatchRequestOperator(
            task_id="requests",
            http_conn_id=CONN_ID,
            requests=[{"endpoint": endpoint, "method": "GET"} for endpoint in ENDPOINTS],
        )
