"""``BatchRequestOperator``: many requests to one Connection in one task, at the API's own rate.

One task instance per request costs a task launch per request; at thousands of requests
under one quota the launches, not the API, set the pace. A batch task sends the whole list
from the triggerer instead: one worker launch plans it, the triggerer sends it (up to
``max_in_flight`` at once, paced by the same shared gate and header reader as
``NetworkRequestOperator``), and ends the task there.

Every request is an *item* with its own outcome, kept in a checkpoint next to the output
files (:mod:`network_requests.batch_checkpoint`): an item that succeeded is never sent
again by that task instance, whether its worker or triggerer is killed, the stack
restarts, the task is retried or cleared. The XCom is a summary (counts, the failed items,
where the outputs are); :func:`batch_results` reads each item's result from the checkpoint.

Split a very long list over mapped tasks (each chunk its own checkpoint)::

    BatchRequestOperator.partial(task_id="fetch", http_conn_id="api").expand(
        requests=[endpoints[i:i + 1000] for i in range(0, len(endpoints), 1000)]
    )

docs/batch.md has the design, the TaskFlow pattern, and what each setting does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from network_requests import coercion
from network_requests.airflow_conventions import deferrable_or_default
from network_requests.batch_checkpoint import Checkpoint, read_journal
from network_requests.batch_plan import (PERMANENT, BatchItem, allowed_failures, failure_message, items_left,
                                         plan_batch, summarize, too_many_failures)
from network_requests.batch_runner import BatchRun, BatchSettings, BatchStopped, ItemRetries
from network_requests.batch_trigger import BatchRequestTrigger
from network_requests.exceptions import failure_from_payload
from network_requests.idempotency import DEFAULT_HEADER, DEFAULT_METHODS
from network_requests.paths import RUN_FOLDER_TEMPLATE, data_dir
from network_requests.gate_access import check_gate_settings
from network_requests.request_spec import RequestSpec, TaskRef, declaration_as_json, secret_in, wait_settings_of
from network_requests.responses import refuse_outside_root

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_CONN_ID = "network_request_api"
DEFAULT_MAX_IN_FLIGHT = 4
DEFAULT_MAX_RATE_LIMIT_WAIT = timedelta(hours=1)
#: Rate-limit waiting of one item beyond this fails the batch (a batch may wait for many windows).
DEFAULT_RATE_LIMIT_TIMEOUT = timedelta(hours=6)
DEFAULT_REQUEST_TIMEOUT = (10.0, 60.0)
DEFAULT_REQUEST_DEADLINE = timedelta(minutes=5)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Without ``write_bodies``, a JSON body up to this size is kept in the checkpoint as the item's value.
DEFAULT_MAX_VALUE_BYTES = 16 * 1024
#: Where the outputs go when ``output_folder`` is not given (a folder per DAG run and task).
DEFAULT_OUTPUT_FOLDER = f"{{{{ dag.dag_id }}}}/{RUN_FOLDER_TEMPLATE}/{{{{ task.task_id }}}}"

__all__ = ["BatchFailedError", "BatchFailedPermanentlyError", "BatchRequestOperator", "batch_results", "chunked"]


class BatchFailedError(AirflowException):
    """More items failed than ``allow_failures`` allows; retried by Airflow (only the failed items are sent again)."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


class BatchFailedPermanentlyError(BatchFailedError, AirflowFailException):
    """Every failed item failed permanently (a 4xx, say): a retry would fail the same way."""


class BatchRequestOperator(BaseOperator):
    """
    Send a list of HTTP requests to one Connection from one task, at the rate the API allows.

    Each request is an endpoint (``"/api/items/1"``) or a dict with ``endpoint`` and optionally
    ``method``, ``data`` (query parameters for GET, body otherwise), ``headers`` and ``output``
    (its file name under ``output_folder``; made from the endpoint when absent). The task
    defers to the triggerer, which sends up to ``max_in_flight`` requests at once through the
    shared gate of the Connection (every task of that Connection waits its turn there) and
    waits out rate limits as ``NetworkRequestOperator`` does, without spending a try.

    Per request: a success writes the body to its output file; a transient failure (5xx,
    408, no answer) is tried again after a backoff, up to ``max_tries_per_item``; a permanent
    one (other 4xx) is recorded. The task fails at the end if more requests failed than
    ``allow_failures``, naming them; its retries send only the requests that did not succeed.
    A request that succeeded is never sent again by this task instance (see docs/batch.md).

    :param http_conn_id: the HTTP Connection with the base URL, auth and extra headers.
    :param requests: the list of requests (templated; ``.expand(requests=chunks)`` maps it).
    :param method: the method of requests that name none (templated).
    :param headers: headers of every request; a request's own headers win (templated).
    :param output_folder: where the bodies and the checkpoint go: a local folder shared by the
        workers and the triggerer (templated). Default: ``<data dir>/<dag_id>/<run>/<task_id>``.
    :param output_root: ``output_folder`` must be inside this folder (templated).
    :param write_bodies: write each body to a file; when False, a JSON body up to
        ``max_value_bytes`` is kept in the checkpoint as the request's ``value``.
    :param max_in_flight: requests under way at once (sending, or waiting for their turn).
    :param max_tries_per_item: tries of a request that fails transiently, the first included.
    :param item_retry_delay: the wait before a request's second try; then times
        ``item_retry_exponential_backoff`` per try, at most ``max_item_retry_delay``.
    :param allow_failures: failed requests the task may end with: a count (``int``) or a
        fraction of the batch (``float`` from 0 to 1).
    :param max_rate_limit_wait: a single wait longer than this fails the batch at once.
    :param rate_limit_timeout: one request's rate-limit waiting beyond this fails the batch.
    :param rate_limit_jitter: fraction of a header-less rate-limit backoff added at random.
    :param request_timeout: seconds, or ``(connect, read)`` seconds, per request.
    :param request_deadline: the whole request (headers to last byte) may take this long.
    :param max_response_bytes: a larger body fails its request (permanently).
    :param extra_options: extra ``HttpHook`` options (``verify``, ...).
    :param shared_gate: pace through the Connection's shared gate (see NetworkRequestOperator).
    :param rate_limit: limits declared for the API, replacing the Connection's
        ``extra["rate_limit"]`` (templated; ``[]``: none); see NetworkRequestOperator.
    :param gate_key: the quota the requests count against (templated; default: the Connection's own).
    :param deferrable: send from the triggerer; False sends from the worker. Default:
        ``[operators] default_deferrable``.
    :param idempotency_key: send an ``Idempotency-Key`` with ``idempotency_key_methods``: one
        per request of this task instance, the same on every send of it.
    :param idempotency_key_header: its name (default ``Idempotency-Key``).
    :param idempotency_key_methods: the methods that carry it (default ``POST``, ``PATCH``).
    :param max_value_bytes: see ``write_bodies``.
    """

    template_fields: Sequence[str] = ("requests", "method", "headers", "output_folder", "output_root", "rate_limit",
                                      "gate_key")
    template_fields_renderers = {"requests": "json", "headers": "json"}
    ui_color = "#dcecfb"

    def __init__(
        self,
        *,
        requests: Sequence[str | dict[str, Any]],
        http_conn_id: str = DEFAULT_CONN_ID,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        output_folder: str | None = None,
        output_root: str | None = None,
        write_bodies: bool = True,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_tries_per_item: int = 3,
        item_retry_delay: timedelta | float = timedelta(seconds=2),
        item_retry_exponential_backoff: float = 2.0,
        max_item_retry_delay: timedelta | float | None = timedelta(minutes=1),
        allow_failures: int | float = 0,
        max_rate_limit_wait: timedelta | float | None = DEFAULT_MAX_RATE_LIMIT_WAIT,
        rate_limit_timeout: timedelta | float | None = DEFAULT_RATE_LIMIT_TIMEOUT,
        rate_limit_jitter: float = 0.1,
        request_timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
        request_deadline: timedelta | float | None = DEFAULT_REQUEST_DEADLINE,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        extra_options: dict[str, Any] | None = None,
        shared_gate: bool = True,
        rate_limit: Any = None,
        gate_key: str | None = None,
        deferrable: bool | None = None,
        idempotency_key: bool = True,
        idempotency_key_header: str = DEFAULT_HEADER,
        idempotency_key_methods: Collection[str] = DEFAULT_METHODS,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(max_in_flight) < 1 or int(max_tries_per_item) < 1:
            raise ValueError("max_in_flight and max_tries_per_item must be at least 1")
        self.http_conn_id, self.requests, self.method, self.headers = http_conn_id, requests, method, headers or {}
        self.output_folder = output_folder or f"{data_dir()}/{DEFAULT_OUTPUT_FOLDER}"
        self.output_root, self.write_bodies = output_root, write_bodies
        self.max_in_flight, self.max_tries_per_item = int(max_in_flight), int(max_tries_per_item)
        self.item_retry_delay = coercion.as_timedelta(item_retry_delay, "item_retry_delay") or timedelta(0)
        self.item_retry_exponential_backoff = float(item_retry_exponential_backoff)
        self.max_item_retry_delay = coercion.as_timedelta(max_item_retry_delay, "max_item_retry_delay")
        allowed_failures(allow_failures, 1)  # a wrong value fails when the DAG is parsed, not at the end
        self.allow_failures = allow_failures
        self.max_rate_limit_wait = coercion.as_timedelta(max_rate_limit_wait, "max_rate_limit_wait")
        self.rate_limit_timeout = coercion.as_timedelta(rate_limit_timeout, "rate_limit_timeout")
        self.rate_limit_jitter = rate_limit_jitter
        self.request_timeout = coercion.request_timeout(request_timeout)
        self.request_deadline = coercion.as_timedelta(request_deadline, "request_deadline")
        self.max_response_bytes, self.extra_options = max_response_bytes, extra_options or {}
        self.shared_gate, self.deferrable = shared_gate, deferrable_or_default(deferrable)
        self.rate_limit, self.gate_key = rate_limit, gate_key
        self.idempotency_key, self.idempotency_key_header = idempotency_key, idempotency_key_header
        self.idempotency_key_methods = tuple(idempotency_key_methods)
        self.max_value_bytes = int(max_value_bytes)

    # -- Airflow entry points ------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        check_gate_settings(self)  # a bad rate_limit or gate_key fails the task before any request
        settings = self.settings(TaskRef.of(ti), int(ti.try_number or 1))
        items = self.plan()
        checkpoint = Checkpoint(settings.output_folder, settings.request.task)
        left = items_left(items, checkpoint.load(), settings.try_number)
        if not left:
            self.log.info("Every request of this batch is done already (%d); nothing to send", len(items))
            return self._finish(items, settings)
        reason = self.why_send_from_worker(settings, left)
        if reason is None:
            self.log.info("Deferring: the triggerer sends %d of %d requests", len(left), len(items))
            digest = checkpoint.write_manifest(items)
            self.defer(trigger=BatchRequestTrigger(settings.to_dict(), digest), method_name="execute_complete")
        self.log.info("Sending the batch from this worker: %s", reason)
        try:
            asyncio.run(BatchRun(settings, items, log=self.log).run())
        except BatchStopped as stopped:
            raise _as_airflow_error(stopped.error) from None
        return self._finish(items, settings)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Where the triggerer hands the task back: fail with what stopped the batch, or
        with the summary when too many requests failed; else return the summary."""
        event = event or {}
        if event.get("status") == "stopped":
            raise failure_from_payload(event.get("failure") or {})
        ti = context["ti"]
        return self._finish(self.plan(), self.settings(TaskRef.of(ti), int(ti.try_number or 1)))

    # -- what the batch is ----------------------------------------------------------------

    def plan(self) -> tuple[BatchItem, ...]:
        """The rendered ``requests`` as items; a list that is not a batch fails the task without a retry."""
        self.method = str(self.method).upper()
        try:
            return plan_batch(self.requests, method=self.method, headers=self.headers, write_bodies=self.write_bodies)
        except ValueError as error:
            raise AirflowFailException(f"requests is not a batch: {error}") from None

    def settings(self, task: TaskRef, try_number: int) -> BatchSettings:
        """What a run of this batch needs besides its items (the trigger's arguments)."""
        folder = str(self.output_folder)
        if self.output_root:
            refuse_outside_root(folder, str(self.output_root), method=str(self.method), endpoint=folder)
        timeout = self.request_timeout
        request = RequestSpec(
            conn_id=self.http_conn_id, endpoint="/", method=str(self.method).upper(), task=task,
            extra_options=dict(self.extra_options),
            request_timeout=list(timeout) if isinstance(timeout, tuple) else timeout,
            request_deadline=None if self.request_deadline is None else self.request_deadline.total_seconds(),
            max_response_bytes=self.max_response_bytes, waits=wait_settings_of(self), shared_gate=self.shared_gate,
            push_xcom=bool(self.do_xcom_push), idempotency_header=self.idempotency_key_header,
            rate_limit=declaration_as_json(self.rate_limit), gate_key=self.gate_key,
        )
        retries = ItemRetries(
            max_tries=self.max_tries_per_item, retry_delay=self.item_retry_delay.total_seconds(),
            multiplier=self.item_retry_exponential_backoff,
            max_delay=None if self.max_item_retry_delay is None else self.max_item_retry_delay.total_seconds(),
            jitter=self.rate_limit_jitter,
        )
        return BatchSettings(
            request=request, output_folder=folder, try_number=try_number, max_in_flight=self.max_in_flight,
            retries=retries, allow_failures=self.allow_failures, write_bodies=self.write_bodies,
            max_value_bytes=self.max_value_bytes, idempotency_key=self.idempotency_key,
            idempotency_methods=self.idempotency_key_methods, finish_in_triggerer=not self.outlets,
        )

    def why_send_from_worker(self, settings: BatchSettings, items: Sequence[BatchItem]) -> str | None:
        """Why the batch is sent from the worker; ``None`` when the triggerer may send it.

        As for ``NetworkRequestOperator``: a request whose own headers, query or body would
        carry a secret is never written where the triggerer reads it (here: the request
        list in the output folder), nor is a setting that is not JSON.
        """
        if not self.deferrable:
            return "deferrable is off"
        for item in items:
            secret = secret_in(settings.item_spec(item))
            if secret:
                return f"{secret} of request [{item.index}] may hold a secret, which is not written to disk"
        try:
            json.dumps(settings.to_dict())
            json.dumps([item.data for item in items])
        except (TypeError, ValueError) as error:
            return f"settings or request data that are not JSON ({error})"
        return None

    def _finish(self, items: Sequence[BatchItem], settings: BatchSettings) -> dict[str, Any]:
        checkpoint = Checkpoint(settings.output_folder, settings.request.task)
        records = checkpoint.load()
        summary = summarize(items, records, try_number=settings.try_number, allow_failures=settings.allow_failures,
                            output_folder=settings.output_folder, checkpoint=str(checkpoint.path))
        self.log.info("Batch: %d succeeded (%d in earlier tries), %d failed (allowed %d), %d not done",
                      summary["succeeded"], summary["succeeded_in_earlier_tries"], summary["failed"],
                      summary["allowed_failures"], summary["not_done"])
        if not too_many_failures(summary):
            return summary
        message = failure_message(summary)
        failed = [records[item.key] for item in items if (records.get(item.key) or {}).get("status") == "failed"]
        permanent = summary["not_done"] == 0 and all(_permanent(record) for record in failed)
        raise (BatchFailedPermanentlyError if permanent else BatchFailedError)(message, summary)


def _permanent(record: dict[str, Any]) -> bool:
    """A failure a new try would meet again (a 4xx answer, a request refused before sending)."""
    return record.get("kind") == PERMANENT


def _as_airflow_error(error: BaseException) -> BaseException:
    if isinstance(error, AirflowException):
        return error
    return AirflowException(f"The batch stopped: {type(error).__name__}: {error}")


# -- for the tasks around a batch ------------------------------------------------------------


def chunked(requests: Sequence[Any], size: int) -> list[list[Any]]:
    """``requests`` cut into lists of at most ``size``: the argument of ``.expand(requests=...)``."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    return [list(requests[start:start + size]) for start in range(0, len(requests), size)]


def batch_results(summary: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each request's result, in the order of the batch's list, from the checkpoint a
    summary names: ``{"index", "status": "ok" | "failed", "status_code", "bytes", "path" or
    "value", "error", ...}``. For a downstream task (pass it the batch task's XCom)."""
    _, records = read_journal(_checkpoint_path(summary))
    yield from sorted(records.values(), key=lambda record: int(record.get("index") or 0))


def _checkpoint_path(summary: dict[str, Any]) -> Path:
    if not isinstance(summary, dict) or not summary.get("checkpoint"):
        raise ValueError("batch_results needs the summary a BatchRequestOperator returned (its XCom)")
    return Path(summary["checkpoint"])
