"""
### Periodic network requests, rate limits respected

Every 5 minutes this DAG fetches several endpoints of the API behind the
`network_request_api` Connection (the demo API under `make run`), one mapped
task per endpoint, and saves each response under the data folder:
`$NETWORK_REQUESTS_DATA_DIR/network_request_periodic/<run id>/<endpoint>.json`.

The tasks start together; the shared gate paces them to what the API announced
(`RateLimit-Remaining`), so the ones beyond its burst wait their turn without sending.
A **429 Too Many Requests** that comes anyway is waited out until the server's
`Retry-After` (no retry spent, no worker slot held while deferred).
Server errors and connection problems use the normal `retries`.

Each saved response is an event of the Asset `network_request_periodic_responses`,
whose `extra` says `path`, `status_code`, `bytes` and `content_type`; the DAG
`network_request_consumer` is scheduled on it.

`catchup=False` and `max_active_runs=1`: a run slowed by a rate limit never piles
up behind itself, and a paused DAG does not flood the API with missed runs.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, DAG

from network_requests import NetworkRequestOperator
from network_requests.paths import RUN_FOLDER_TEMPLATE, data_dir

ENDPOINTS = (
    "/api/users",
    "/api/orders",
    "/api/products",
    "/api/inventory",
    "/api/weather",
    "/api/exchange-rates",
)

#: One Asset for the run's saved responses: downstream DAGs want "new data fetched", and
#: each event's extra names its file. (network_request_consumer declares the same Asset.)
SAVED_RESPONSES = Asset("network_request_periodic_responses")


def _output_file(endpoint: str) -> str:
    name = endpoint.strip("/").replace("/", "_")
    return f"{data_dir()}/network_request_periodic/{RUN_FOLDER_TEMPLATE}/{name}.json"


with DAG(
    dag_id="network_request_periodic",
    description="Fetch several API endpoints every 5 minutes, waiting out rate limits",
    schedule=timedelta(minutes=5),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=1),
    tags=["network-requests", "rate-limit", "periodic"],
    doc_md=__doc__,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=5),
    },
) as dag:
    NetworkRequestOperator.partial(
        task_id="fetch",
        http_conn_id="network_request_api",
        method="GET",
        # A rate-limit wait longer than the period would only delay the next run.
        max_rate_limit_wait=timedelta(minutes=5),
        rate_limit_timeout=timedelta(minutes=30),
        # The run id names a folder: never let it (or anything else) write outside the data folder.
        output_root=data_dir(),
        outlets=[SAVED_RESPONSES],
    ).expand_kwargs(
        [{"endpoint": endpoint, "output_path": _output_file(endpoint)} for endpoint in ENDPOINTS]
    )
