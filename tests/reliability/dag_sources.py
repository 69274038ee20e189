"""The DAG files the reliability tests give the embedded stack (next to a copy of the project's
``network_request_once``), one function per DAG, rendered once the server ports are known.

Every case has a Connection of its own (``rel_<case>``): the operator's shared rate-limit gate
is per Connection, so a 429 in one case never holds back the tasks of another.

Every operator keeps the defaults its case is not about (shared gate on, in-process threshold,
request_deadline), so each case runs the way the project ships.
"""

from __future__ import annotations

import textwrap

HEADER = '''
"""Test DAG of tests/reliability (written by the test session, not part of the project)."""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from network_requests import NetworkRequestOperator
from network_requests.paths import RUN_FOLDER_TEMPLATE, data_dir

START = pendulum.datetime(2026, 1, 1, tz="UTC")
'''


def _dag(dag_id: str, body: str, *, default_args: str = "{'retries': 2, 'retry_delay': timedelta(seconds=2)}",
         schedule: str = "None", extra: str = "") -> str:
    return HEADER + textwrap.dedent(
        f"""
        with DAG(dag_id={dag_id!r}, schedule={schedule}, start_date=START, catchup=False, tags=["reliability-test"],
                 default_args={default_args}{extra}) as dag:
        """
    ) + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")


# Case 1 and case 6: a rate-limit wait across a crash of the scheduler / a restart of the stack.
# Rescheduled (up_for_reschedule) unless deferrable: then deferred (case 6d).
def rate_limit_wait_dag(dag_id: str, conn_id: str, endpoint: str, *, deferrable: bool = False) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(
            task_id="request",
            http_conn_id={conn_id!r},
            endpoint={endpoint!r},
            output_path=f"{{data_dir()}}/{dag_id}/{{RUN_FOLDER_TEMPLATE}}/response.json",
            deferrable={deferrable!r},
        )
        """,
    )


# Case 2: the task process is killed in the middle of a request.
def kill_midrequest_dag(dag_id: str, conn_id: str) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(
            task_id="request",
            http_conn_id={conn_id!r},
            endpoint="/c2/slow",
            output_path=f"{{data_dir()}}/{dag_id}/{{RUN_FOLDER_TEMPLATE}}/out.json",
        )
        """,
    )


# Case 3: a periodic DAG whose API is down for a whole run.
API_DOWN_RETRY_DELAY_S = 2
API_DOWN_MULTIPLIER = 2.0
API_DOWN_RETRIES = 3
API_DOWN_PERIOD_S = 60


def api_down_dag(dag_id: str, conn_id: str) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(task_id="request", http_conn_id={conn_id!r}, endpoint="/c3/periodic")
        """,
        default_args=(
            f"{{'retries': {API_DOWN_RETRIES}, 'retry_delay': timedelta(seconds={API_DOWN_RETRY_DELAY_S}), "
            f"'retry_exponential_backoff': {API_DOWN_MULTIPLIER}}}"
        ),
        schedule=f"timedelta(seconds={API_DOWN_PERIOD_S})",
        extra=", max_active_runs=1, is_paused_upon_creation=True",
    )


# Case 4: the API accepts the connection and never answers.
def timeout_dag(dag_id: str, conn_id: str) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(task_id="request", http_conn_id={conn_id!r}, endpoint="/c4/hang", request_timeout=2)
        """,
        default_args="{'retries': 1, 'retry_delay': timedelta(seconds=1)}",
    )


# Case 5: a huge body, and a body that drips forever.
HUGE_BYTES = 200 * 1024 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024


def huge_body_dag(dag_id: str, conn_id: str) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(
            task_id="request",
            http_conn_id={conn_id!r},
            endpoint="/huge?bytes={HUGE_BYTES}&hold=1",
            max_response_bytes={MAX_RESPONSE_BYTES},
        )
        """,
    )


DRIP_EXECUTION_TIMEOUT_S = 10


def drip_execution_timeout_dag(dag_id: str, conn_id: str) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(
            task_id="request",
            http_conn_id={conn_id!r},
            endpoint="/drip?every=0.5",
            request_timeout=(2, 2),
            execution_timeout=timedelta(seconds={DRIP_EXECUTION_TIMEOUT_S}),
        )
        """,
        default_args="{'retries': 0}",
    )


# Case 7: endpoints that must never be requested, hard-coded in a DAG.
def hostile_endpoints_dag(dag_id: str, conn_id: str, endpoints: list[str], loose_endpoint: str) -> str:
    lines = [
        "from functools import cached_property",
        "from urllib.parse import urljoin",
        "from network_requests.hooks import NetworkRequestHook",
        "",
        "class JoiningHook(NetworkRequestHook):",
        "    # Builds URLs with urljoin (a plausible customisation): '//host/x' then leaves the host.",
        "    def url_from_endpoint(self, endpoint):",
        "        super().url_from_endpoint('')  # sets base_url from the Connection",
        "        return urljoin(self.base_url + '/', endpoint)",
        "",
        "class LooseEndpointOperator(NetworkRequestOperator):",
        "    # A subclass that turned the endpoint check off: the same-origin check must still hold.",
        "    def checked_endpoint(self, endpoint):",
        "        return endpoint",
        "",
        "    @cached_property",
        "    def hook(self):",
        "        return JoiningHook(method=self.method, http_conn_id=self.http_conn_id)",
        "",
    ]
    lines += [
        f"NetworkRequestOperator(task_id='hostile_{index}', http_conn_id={conn_id!r}, endpoint={endpoint!r})"
        for index, endpoint in enumerate(endpoints)
    ]
    lines.append(f"LooseEndpointOperator(task_id='loose_subclass', http_conn_id={conn_id!r}, endpoint={loose_endpoint!r})")
    return _dag(dag_id, "\n".join(lines))


# Case 8: odd responses.
RESPONSE_TASKS = {
    "invalid_json": "/c8/invalid-json",
    "wrong_content_type": "/c8/html",
    "empty_body": "/c8/empty",
    "empty_json_body": "/c8/empty-json",
    "non_utf8_text": "/c8/latin1",
    "non_utf8_json": "/c8/latin1-json",
}


def responses_dag(dag_id: str, conn_id: str) -> str:
    tasks = "\n".join(
        f"NetworkRequestOperator(task_id={task_id!r}, http_conn_id={conn_id!r}, endpoint={endpoint!r})"
        for task_id, endpoint in RESPONSE_TASKS.items()
    )
    return _dag(dag_id, tasks)


# test_02: several tasks of one Connection, first contact, then short Retry-After waits.
SHORT_WAIT_TASKS = 4
SHORT_WAIT_429S = 6


def short_waits_dag(dag_id: str, conn_id: str, *, path: str = "c12", operator_args: str = ", deferrable=False") -> str:
    tasks = "\n".join(
        f"NetworkRequestOperator(task_id='fetch_{index}', http_conn_id={conn_id!r}, "
        f"endpoint='/{path}/item/{index}'{operator_args})"
        for index in range(SHORT_WAIT_TASKS)
    )
    return _dag(dag_id, tasks)


# Case 13: the same short waits, each one deferred to the triggerer (nothing slept in the task).
def deferred_short_waits_dag(dag_id: str, conn_id: str) -> str:
    return short_waits_dag(dag_id, conn_id, path="c13", operator_args=", deferrable=True, in_process_wait_threshold=0")


# Case 9: a Connection with a password and an auth header in extra.
def secrets_dag(dag_id: str, conn_id: str) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(task_id="plain", http_conn_id={conn_id!r}, endpoint="/c9/data")
        NetworkRequestOperator(
            task_id="templated_header",
            http_conn_id={conn_id!r},
            endpoint="/c9/templated",
            # A DAG author copying a secret of the Connection into a templated field.
            headers={{"X-Api-Key": "{{{{ conn.{conn_id}.extra_dejson['X-Api-Key'] }}}}"}},
        )
        """,
    )


# Case 11: clearing a task rewrites its own output file.
def idempotent_dag(dag_id: str, conn_id: str) -> str:
    return _dag(
        dag_id,
        f"""
        NetworkRequestOperator(
            task_id="request",
            http_conn_id={conn_id!r},
            endpoint="/c11/data",
            output_path=f"{{data_dir()}}/{dag_id}/{{RUN_FOLDER_TEMPLATE}}/out.json",
        )
        """,
    )
