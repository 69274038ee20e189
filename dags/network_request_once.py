"""
### One-off network request

Trigger it from the UI (**Trigger DAG** shows a form) or the CLI:

```bash
airflow dags trigger network_request_once \
    --conf '{"endpoint": "/api/items/42", "method": "GET", "initial_delay_seconds": 10}'
```

| param | meaning |
|---|---|
| `endpoint` | a path on the `network_request_api` Connection's host, e.g. `/api/users`. Never a full URL, `//host`, `@`, `..` or CR/LF. |
| `method` | `GET` (default), `POST`, `PUT`, `PATCH`, `DELETE` or `HEAD` |
| `body` | optional JSON object sent as the request body (`Content-Type: application/json`) |
| `initial_delay_seconds` | wait this long after the run starts before the first request (0 to 86400) |

A conf that breaks these rules is refused when the run is triggered, with a message
naming the param. The response is saved as
`$NETWORK_REQUESTS_DATA_DIR/network_request_once/<run id>/response` and its location,
status and size are the task's XCom. On 429 the task waits the server's `Retry-After`
(deferred); server errors are retried.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from network_requests import NetworkRequestOperator
from network_requests.endpoints import ENDPOINT_PARAM_PATTERN
from network_requests.paths import RUN_FOLDER_TEMPLATE, data_dir

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]

with DAG(
    dag_id="network_request_once",
    description="One request to the API, triggered by hand with validated parameters",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["network-requests", "rate-limit", "one-off"],
    doc_md=__doc__,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=20),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=5),
    },
    params={
        "endpoint": Param(
            "/api/users",
            type="string",
            title="Endpoint",
            description="A path on the API connection's host, starting with '/' (e.g. /api/items/42). "
            "Full URLs, '//host', '@', '..' and line breaks are refused.",
            pattern=ENDPOINT_PARAM_PATTERN,
            minLength=1,
            maxLength=2048,
        ),
        "method": Param("GET", type="string", enum=METHODS, title="HTTP method"),
        "body": Param(
            None,
            type=["object", "null"],
            title="JSON body",
            description="Optional JSON object sent as the request body.",
        ),
        "initial_delay_seconds": Param(
            0,
            type="integer",
            minimum=0,
            maximum=86400,
            title="Initial delay (seconds)",
            description="Wait this long before the first request.",
        ),
    },
) as dag:
    NetworkRequestOperator(
        task_id="request",
        http_conn_id="network_request_api",
        endpoint="{{ params.endpoint }}",
        method="{{ params.method }}",
        data="{{ params.body | tojson if params.body is not none else '' }}",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        initial_delay="{{ params.initial_delay_seconds }}",
        output_path=f"{data_dir()}/network_request_once/{RUN_FOLDER_TEMPLATE}/response",
        # Whatever a trigger's conf or run id holds, the response stays inside the data folder.
        output_root=data_dir(),
    )
