"""
### Benchmark DAGs (issue 3): N rate-limited GETs, three ways

Three DAGs send the same workload: `BENCH_TASKS` GET requests, one mapped task instance per
request (`/bench/items/<i>`, so the server can tell the tasks apart), to the rate-limited
benchmark API behind the `bench_api` Connection (`AIRFLOW_CONN_BENCH_API`). Only the way
they handle **429 Too Many Requests** differs:

| DAG | on 429 |
|---|---|
| `bench_network_request_operator` | `NetworkRequestOperator`: waits what the server asked (reschedule, deferral or in-process, per `OPERATOR_KWARGS`), without spending a try |
| `bench_http_operator` | stock `HttpOperator`: the try fails; Airflow retries after `retry_delay` with exponential backoff |
| `bench_urllib3_retry` | `@task` with `requests` + `urllib3.util.Retry(respect_retry_after_header=True)`: sleeps inside the task |

`bench/run_bench.py` (`make bench`) starts the server and the Airflow stack, sets the
environment below, triggers each DAG and measures it. Nothing here is meant to be run by
`make run`: these DAGs live in `bench/dags/`, outside the project's `dags/` folder.

Environment (read when the file is parsed, by the DAG processor and by each task):

* `BENCH_TASKS`: number of requests = mapped task instances per DAG (default 60).
* `BENCH_OPERATOR_KWARGS`: a JSON object merged over `OPERATOR_KWARGS`, e.g.
  `{"deferrable": true}`, so a run can try a variant without editing this file.
* `BENCH_WARMUP_TASKS`: mapped no-op tasks of `bench_warmup` (default 4).

`bench_warmup` sends no request: the runner runs it once before measuring, so that the
first strategy does not pay alone for the stack's first DAG run (cold caches, each worker's
first task, the API server's first calls, the triggerer's first Connection and Variable reads).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pendulum
from airflow.providers.http.operators.http import HttpOperator
from airflow.sdk import DAG, BaseOperator, task

from network_requests import NetworkRequestOperator

# =====================================================================================
# SETTINGS: the one place to tune the strategies.
# =====================================================================================

#: The HTTP Connection every strategy uses (AIRFLOW_CONN_BENCH_API, set by the runner).
CONN_ID = "bench_api"

#: NetworkRequestOperator arguments for `bench_network_request_operator` (besides
#: http_conn_id, method and endpoint). An empty dict means the operator's own defaults.
#: Seconds are accepted wherever the operator takes a timedelta, so the JSON override in
#: BENCH_OPERATOR_KWARGS can set them too. Examples:
#:   {"shared_gate": False}                 one task does not learn from another's 429
#:   {"deferrable": True}                   wait in the triggerer instead of rescheduling
#:   {"in_process_wait_threshold": 2.0}     sleep in the task for waits up to 2 s
OPERATOR_KWARGS: dict = {
    "request_timeout": (5.0, 30.0),
}
OPERATOR_KWARGS.update(json.loads(os.environ.get("BENCH_OPERATOR_KWARGS") or "{}"))

#: Airflow's retry settings, the same for all three DAGs (default_args). This is how the
#: Airflow docs say to make a task survive a flaky dependency: `retries` plus a
#: `retry_delay` with exponential backoff, capped. The values are what one would pick for
#: an API whose 429s ask for a few seconds (token bucket) to tens of seconds (fixed
#: window): first retry after 5-10 s, then 10-20 s, 20-40 s, capped at 60 s; eight retries
#: cover more than five minutes of refusals. The NetworkRequestOperator spends none of
#: them on a 429; the HttpOperator spends one per 429; the urllib3 task only after its own
#: retries run out.
RETRY_ARGS: dict = {
    "retries": 8,
    "retry_delay": timedelta(seconds=5),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(seconds=60),
}

#: urllib3.util.Retry arguments for `bench_urllib3_retry`: Retry-After is honoured (the
#: task sleeps that long in its worker slot), 429 and 503 are retried, and backoff_factor
#: only applies to a response without Retry-After (never sent by the bench server).
URLLIB3_RETRY: dict = {
    "total": 10,
    "backoff_factor": 0.5,
    "status_forcelist": [429, 503],
    "respect_retry_after_header": True,
}

#: (connect, read) timeout of every request, seconds.
REQUEST_TIMEOUT = (5.0, 30.0)

# =====================================================================================

N_TASKS = int(os.environ.get("BENCH_TASKS", "60"))
ENDPOINTS = [f"/bench/items/{i}" for i in range(N_TASKS)]
START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")
TAGS = ["bench"]


def _dag(dag_id: str, description: str) -> DAG:
    return DAG(
        dag_id=dag_id,
        description=description,
        schedule=None,  # triggered by the runner only
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        # Every mapped instance may run at once; the executor's parallelism is the limit.
        max_active_tasks=max(N_TASKS, 1),
        default_args=RETRY_ARGS,
        tags=TAGS,
        doc_md=__doc__,
    )


with _dag("bench_network_request_operator", "Bench: NetworkRequestOperator waits out each 429"):
    NetworkRequestOperator.partial(
        task_id="request",
        http_conn_id=CONN_ID,
        method="GET",
        **OPERATOR_KWARGS,
    ).expand(endpoint=ENDPOINTS)


with _dag("bench_http_operator", "Bench: stock HttpOperator, a 429 fails the try and Airflow retries"):
    HttpOperator.partial(
        task_id="request",
        http_conn_id=CONN_ID,
        method="GET",
        extra_options={"timeout": REQUEST_TIMEOUT},
        deferrable=False,  # as Airflow ships it; the bench stack sets [operators] default_deferrable for ours
    ).expand(endpoint=ENDPOINTS)


with _dag("bench_urllib3_retry", "Bench: requests + urllib3 Retry, sleeping out Retry-After in the task"):

    @task(task_id="request")
    def request(endpoint: str) -> int:
        """GET the endpoint; urllib3 sleeps out each 429's Retry-After inside this task."""
        import requests
        from airflow.sdk import Connection
        from requests.adapters import HTTPAdapter
        from urllib3.util import Retry

        conn = Connection.get(CONN_ID)
        base_url = f"{conn.conn_type or 'http'}://{conn.host}" + (f":{conn.port}" if conn.port else "")
        with requests.Session() as session:
            session.mount("http://", HTTPAdapter(max_retries=Retry(**URLLIB3_RETRY)))
            session.mount("https://", HTTPAdapter(max_retries=Retry(**URLLIB3_RETRY)))
            response = session.get(base_url + endpoint, timeout=REQUEST_TIMEOUT)
            response.raise_for_status()
            return response.status_code

    request.expand(endpoint=ENDPOINTS)


class WarmUpTriggererOperator(BaseOperator):
    """Defers once, so the triggerer is warm too (see warmup_trigger.py)."""

    def execute(self, context):
        from warmup_trigger import WarmUpTrigger

        self.defer(trigger=WarmUpTrigger(conn_id=CONN_ID), method_name="done")

    def done(self, context, event=None):
        return event


with _dag("bench_warmup", "Bench: no requests; run once before measuring to warm the stack up"):

    @task(task_id="warm_up")
    def warm_up(index: int) -> int:
        """Hold the slot for a moment, so that the mapped instances spread over all workers."""
        import time

        time.sleep(2)
        return index

    warm_up.expand(index=list(range(int(os.environ.get("BENCH_WARMUP_TASKS", "4")))))
    WarmUpTriggererOperator(task_id="warm_up_triggerer")
