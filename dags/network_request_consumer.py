"""
### New responses saved: a DAG scheduled on an Asset

Runs when `network_request_periodic` has saved new responses: each of its fetch tasks
emits an event of the Asset `network_request_periodic_responses`, whose `extra`
describes the file it wrote:

```json
{"path": ".../network_request_periodic/<run id>/api_users.json",
 "status_code": 200, "bytes": 1234, "content_type": "application/json"}
```

A run takes every event that arrived since the previous one (one periodic run's six
fetches may start one run or a few). `summarize` logs a line per saved file and
returns a summary as its XCom. Put your own processing there: the files are on the
workers' data folder (`$NETWORK_REQUESTS_DATA_DIR`).

The events and the runs they started are on the Asset's page (**Assets**) in the UI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, task

#: The Asset network_request_periodic's fetch tasks update (declared there too).
SAVED_RESPONSES = Asset("network_request_periodic_responses")


def summary_of(extras: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What the saved responses add up to: how many, their bytes, statuses and files."""
    extras = list(extras)
    return {
        "responses": len(extras),
        "bytes": sum(int(extra.get("bytes") or 0) for extra in extras),
        "status_codes": dict(sorted(Counter(str(extra.get("status_code")) for extra in extras).items())),
        "paths": sorted(str(extra["path"]) for extra in extras if extra.get("path")),
    }


with DAG(
    dag_id="network_request_consumer",
    description="Runs when network_request_periodic saved new responses (an Asset schedule)",
    schedule=[SAVED_RESPONSES],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["network-requests", "assets"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
) as dag:

    @task
    def summarize(triggering_asset_events: Any = None) -> dict[str, Any]:
        """Log each saved response the triggering events describe; return their summary."""
        import logging

        log = logging.getLogger("airflow.task")
        events = list(triggering_asset_events[SAVED_RESPONSES]) if triggering_asset_events else []
        for event in events:
            log.info("%s.%s saved %s: %s bytes, status %s, %s", event.source_dag_id, event.source_task_id,
                     event.extra.get("path"), event.extra.get("bytes"), event.extra.get("status_code"),
                     event.extra.get("content_type"))
        summary = summary_of(event.extra for event in events)
        log.info("%d saved responses, %d bytes in all", summary["responses"], summary["bytes"])
        return summary

    summarize()
