"""
### Many requests under one quota: the batch mode

Fetches `count` items of the API behind the `network_request_api` Connection
(`/api/items/1` to `/api/items/<count>`, 300 by default) with **`BatchRequestOperator`**:
a TaskFlow task cuts the list into chunks of `chunk_size`, one mapped batch task per chunk
sends its chunk **from the triggerer** (up to 4 requests at once), and every batch waits its
turn at the Connection's shared gate, so together they keep to the rate the API announces.
300 requests cost 3 worker launches, not 300.

Each body is saved as `$NETWORK_REQUESTS_DATA_DIR/network_request_batch/<run id>/item-<n>.json`;
the folder's `.batch/` holds each chunk's checkpoint. A worker or triggerer killed mid-batch,
a retry or a cleared task never fetches an item again that was already saved (see
docs/batch.md). Up to 1% of the items may fail (a 404, a 5xx that outlasted its 3 tries)
before a chunk fails; `report` then counts what was fetched.

At the demo API's default rate (`make run`: one request every 5 s after a burst of 3)
300 items take about 25 minutes: that is the API's pace, which the batch keeps without a
single 429. Trigger it with a smaller `count`, or start the demo API faster
(`python include/demo_api.py --rate 10 --burst 10`), to watch it finish sooner.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from network_requests.batch import BatchRequestOperator, batch_results, chunked
from network_requests.paths import RUN_FOLDER_TEMPLATE, data_dir

with DAG(
    dag_id="network_request_batch",
    description="Hundreds of requests to one API in a few batch tasks, at the API's own rate",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["network-requests", "rate-limit", "batch"],
    doc_md=__doc__,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=5),
    },
    params={
        "count": Param(300, type="integer", minimum=1, maximum=5000, title="Items to fetch"),
        "chunk_size": Param(100, type="integer", minimum=1, maximum=5000, title="Items per batch task"),
    },
) as dag:

    @task
    def item_requests(params=None) -> list[list[dict]]:
        """The requests, in chunks: one batch task each."""
        requests = [{"endpoint": f"/api/items/{n}", "output": f"item-{n}.json"} for n in range(1, params["count"] + 1)]
        return chunked(requests, params["chunk_size"])

    fetched = BatchRequestOperator.partial(
        task_id="fetch_items",
        http_conn_id="network_request_api",
        output_folder=f"{data_dir()}/network_request_batch/{RUN_FOLDER_TEMPLATE}",
        # The run id names a folder: never let it lead outside the data folder.
        output_root=data_dir(),
        allow_failures=0.01,
        max_in_flight=4,
    ).expand(requests=item_requests())

    @task
    def report(summaries) -> dict:
        """What the batches fetched, from their checkpoints (the XComs hold counts, not bodies)."""
        results = [result for summary in summaries for result in batch_results(summary)]
        fetched_items = [result for result in results if result["status"] == "ok"]
        return {
            "fetched": len(fetched_items),
            "failed": len(results) - len(fetched_items),
            "bytes": sum(result.get("bytes") or 0 for result in fetched_items),
        }

    report(fetched.output)
