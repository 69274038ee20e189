"""
### Wait until a resource is ready, then fetch it

Trigger it by hand (**Trigger DAG**, or
`airflow dags trigger network_request_wait_ready --conf '{"item_id": 42}'`).

`wait_for_item` is a `NetworkRequestSensor`: it pokes `/api/items/<item_id>` on the
`network_request_api` Connection every 30 seconds until the API answers 2xx.

| answer | what the sensor does |
|---|---|
| 2xx | ready (a `response_check` may look at the body first) |
| 404 (listed in `not_ready_status_codes`) | not yet: pokes again after `poke_interval` |
| 429, or 503/403 with rate-limit headers | waits the server's `Retry-After` (never less than `poke_interval`), no try spent |
| other 5xx, connection refused | not yet (the service may be starting) |
| other 4xx | fails at once |

After an hour (`timeout`) it fails; with `soft_fail=True` it would be skipped instead.
Between pokes it waits in the triggerer when deferrable (`[operators] default_deferrable`,
or `deferrable=True`), else in `mode="reschedule"` it frees its worker slot.
`fetch_item` then saves the item under
`$NETWORK_REQUESTS_DATA_DIR/network_request_wait_ready/<run id>/item.json`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from network_requests import NetworkRequestOperator
from network_requests.paths import RUN_FOLDER_TEMPLATE, data_dir
from network_requests.sensors import NetworkRequestSensor

with DAG(
    dag_id="network_request_wait_ready",
    description="Wait until an API resource is ready (rate limits respected), then fetch it",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["network-requests", "rate-limit", "sensor"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={"item_id": Param(42, type="integer", minimum=1, title="Item id")},
) as dag:
    wait_for_item = NetworkRequestSensor(
        task_id="wait_for_item",
        http_conn_id="network_request_api",
        endpoint="/api/items/{{ params.item_id }}",
        not_ready_status_codes=[404],
        poke_interval=timedelta(seconds=30),
        timeout=timedelta(hours=1),
        mode="reschedule",  # used when not deferrable: no worker slot held between pokes
    )
    fetch_item = NetworkRequestOperator(
        task_id="fetch_item",
        http_conn_id="network_request_api",
        endpoint="/api/items/{{ params.item_id }}",
        output_path=f"{data_dir()}/network_request_wait_ready/{RUN_FOLDER_TEMPLATE}/item.json",
        output_root=data_dir(),
    )
    wait_for_item >> fetch_item
