"""The worker's driver of a listing: every page through the operator's one-request driver, each kept once read.

``NetworkRequestOperator._drive`` hands a task with a ``pagination_function`` to
:func:`read_pages`. Each page is one request of the operator's own driver, so it asks the
shared gate first and waits out its rate limits exactly as a single request does (slept
here, deferred or rescheduled, never hammering). A page is kept on disk
(:mod:`network_requests.page_checkpoint`) before the next one is requested, so when the
task comes back (a deferral's return, a reschedule, a retry after a killed process) it
starts at the first page not yet kept and never fetches a kept page again. The kept pages
are removed once the task has its result.

Pages are always sent from a worker: the ``pagination_function`` is the DAG author's code,
which the triggerer need not be able to import, and the pages' values do not belong in a
trigger's arguments (stored in the metadata database). A deferred page waits in the
triggerer and is then sent from the worker (see :mod:`network_requests.where_to_send`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import requests

from network_requests.attempts import finish
from network_requests.endpoints import redact_url
from network_requests.engine import WaitBudget
from network_requests.exceptions import PermanentRequestError
from network_requests.idempotency import with_idempotency_key
from network_requests.output import write_atomically
from network_requests.page_checkpoint import KeptPage, PageCheckpoint, default_folder
from network_requests.pagination import (PageRequest, PaginationError, checked_next_page, combine_pages,
                                         is_last_page, page_idempotency_key, request_of_page)
from network_requests.rate_limit import Outcome
from network_requests.request_spec import TaskRef

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The operator's one-request driver: sends (after any wait) until a final answer, and
#: returns ``(response, url, outcome, status line)``; a wait that leaves the process raises.
SendOne = Callable[[WaitBudget], tuple[requests.Response, str, Outcome, str]]


def read_pages(operator: Any, context: Context, budget: WaitBudget, send_one: SendOne) -> Any:
    """Read the listing from the first page not yet kept; the task's result from all its pages."""
    task = TaskRef.of(context["ti"])
    first = PageRequest(operator.endpoint, operator.data, dict(operator.headers), dict(operator.extra_options))
    checkpoint = PageCheckpoint(str(operator.page_checkpoint_folder or default_folder()), task,
                                first.fingerprint(operator.method))
    pages = checkpoint.load()
    _announce(operator, context, budget, pages, checkpoint.location)
    try:
        while not pages or not is_last_page(pages[-1].number, pages[-1].next_page, operator.max_pages):
            page = _read_page(operator, task, request_of_page(first, [kept.next_page for kept in pages]),
                              len(pages) + 1, budget, send_one)
            try:
                checkpoint.keep(page)
            except (TypeError, ValueError) as error:
                raise PermanentRequestError(
                    f"page {page.number}'s value is not JSON, so it cannot be kept between pages ({error}); "
                    "return JSON from response_filter", method=operator.method, url=redact_url(first.endpoint)) from None
            pages.append(page)
            budget = WaitBudget()  # each page has its own waits; the try's reschedules still count
    finally:
        _aim(operator, first, headers=first.headers)  # the operator's own request again
    if pages[-1].next_page is not None:
        operator.log.info("Stopped after max_pages=%d pages; more are available", operator.max_pages)
    result = _result(operator, pages)
    checkpoint.remove()
    return result


def _read_page(operator: Any, task: TaskRef, request: PageRequest, number: int, budget: WaitBudget,
               send_one: SendOne) -> KeptPage:
    """Send one page (with its own Idempotency-Key) and judge it; its value and the next page's request."""
    headers = dict(request.headers)
    if operator.idempotency_key:
        headers = with_idempotency_key(headers, method=operator.method,
                                       key=page_idempotency_key(task.idempotency_key, number),
                                       header=operator.idempotency_key_header, methods=operator.idempotency_key_methods)
    _aim(operator, request, headers=headers)
    response, url, outcome, what = send_one(budget)
    value = finish(operator, outcome, response, url, method=operator.method, what=f"page {number}: {what}",
                   log=operator.log, response_check=operator.response_check)
    try:
        next_page = checked_next_page(operator.pagination_function(response), base_url=operator.hook.base_url)
    except PaginationError as error:
        raise PermanentRequestError(f"after page {number} of {redact_url(url)}: {error}", method=operator.method,
                                    url=redact_url(url), status_code=response.status_code) from None
    return KeptPage(number, value, next_page, response.status_code, response.headers.get("Content-Type", ""))


def _aim(operator: Any, request: PageRequest, *, headers: Any) -> None:
    operator.endpoint, operator.data = request.endpoint, request.data
    operator.headers, operator.extra_options = dict(headers), dict(request.extra_options)


def _result(operator: Any, pages: list[KeptPage]) -> Any:
    """The combined pages; with ``output_path``, written there as JSON in one visible step."""
    combined = combine_pages([page.value for page in pages])
    if not operator.output_path:
        return combined
    operator.check_output_path()  # again: a symlink may have appeared meanwhile
    body = json.dumps(combined).encode()
    written = write_atomically(str(operator.output_path), body)
    operator.log.info("Wrote %d pages, %d bytes, to %s", len(pages), len(body), written)
    return {"path": written, "status_code": pages[-1].status_code, "bytes": len(body),
            "content_type": "application/json", "pages": len(pages)}


def _announce(operator: Any, context: Context, budget: WaitBudget, pages: list[KeptPage], location: str) -> None:
    if pages:
        operator.log.info("Pages 1-%d were read before and are kept in %s: going on from page %d", len(pages),
                          location, len(pages) + 1)
        return
    ti = context["ti"]
    resumed = ti.try_number > 1 or int(context.get("task_reschedule_count") or 0) > 0 or budget.rate_limit_waits > 0
    if resumed:
        operator.log.warning(
            "No page is kept in %s: reading from page 1. If this task read pages before on another host, this "
            "folder is not shared by the workers: set page_checkpoint_folder to shared storage, or every "
            "restart reads the pages again", location)
