"""``NetworkRequestOperator``: one HTTP request, with rate limits honoured by deferring or rescheduling.

The split follows apache-airflow-providers-http: ``HttpHook`` owns the Connection and
the network call; this operator owns the Airflow decisions. It is the worker's driver of
the one decision in :mod:`network_requests.engine`: ask the shared gate, send, judge the
answer (:mod:`network_requests.attempts`), then do what the engine says: sleep here, defer,
reschedule, fail, or return the result. The triggerer's driver is
:mod:`network_requests.triggers`; what it is handed is a :class:`~network_requests.request_spec.RequestSpec`.

What each answer means for the task (success, a wait, a retried or a final failure) is the
README's table of outcomes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import requests
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowRescheduleException

from network_requests import coercion, sending
from network_requests.airflow_conventions import deferrable_or_default
from network_requests.attempts import (StandardBehaviour, announce_wait, budget_after_reschedules, failure_of,
                                       finish, judge_answer, report_no_answer, sleep_until)
from network_requests.endpoints import redact_url
from network_requests.engine import (MAX_IN_PROCESS_WAITS, Fail, Finish, InitialDelay, Mode, Place, Send, Wait,
                                     WaitBudget, WaitRules, next_step)
from network_requests.exceptions import NetworkRequestError, failure_from_payload
from network_requests.gate_access import check_gate_settings, task_gate
from network_requests.idempotency import DEFAULT_HEADER, DEFAULT_METHODS, with_idempotency_key
from network_requests.links import ApiEndpointLink
from network_requests.output_assets import record_output_events
from network_requests.page_reader import read_pages
from network_requests.pagination import DEFAULT_MAX_PAGES
from network_requests.rate_limit import Outcome
from network_requests.request_seams import RequestSeams
from network_requests.request_spec import RequestSpec, TaskRef, carries_idempotency_key, describe, wait_settings_of
from network_requests.responses import refuse_outside_root, written_body
from network_requests.wait_delays import MIN_RESCHEDULE_DELAY, default_in_process_threshold, min_defer_delay
from network_requests.where_to_send import deferral_trigger, why_send_from_worker

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_CONN_ID = "network_request_api"
DEFAULT_MAX_RATE_LIMIT_WAIT = timedelta(hours=1)
#: Total time one try may spend waiting on rate limits before it fails.
DEFAULT_RATE_LIMIT_TIMEOUT = timedelta(hours=6)
#: (connect, read) seconds. ``requests`` waits forever without a timeout.
DEFAULT_REQUEST_TIMEOUT = (10.0, 60.0)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: The whole request, headers to last byte (a read timeout is per socket read).
DEFAULT_REQUEST_DEADLINE = timedelta(minutes=5)
#: The operator's methods that run only on a worker; every other one may run in the triggerer
#: as :class:`StandardBehaviour` and the senders, so a subclass replacing it sends from a worker.
_WORKER_ONLY = frozenset({"__init__", "execute", "resume_after_wait", "_announce_output", "finishes_in_triggerer"})

__all__ = ["MAX_IN_PROCESS_WAITS", "MIN_RESCHEDULE_DELAY", "NetworkRequestOperator", "min_defer_delay"]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class NetworkRequestOperator(RequestSeams, BaseOperator):
    """
    Send one HTTP request through an Airflow Connection, respecting the server's rate limits.

    On a rate-limited response (429, 503 with ``Retry-After``, 403 with a spent quota) the
    task waits for the moment the server allows: it defers to the triggerer (``deferred``;
    or, with ``deferrable=False``, goes to ``up_for_reschedule``), frees its worker slot,
    keeps its ``try_number``, and sends the request again then, never earlier. The wait
    comes from ``Retry-After``, else from a reset header when the quota is spent, else from
    the task's ``retry_delay`` with ``retry_exponential_backoff``. A server that allows an
    immediate retry is retried at once only once in a row; the next ones back off.

    :param http_conn_id: the HTTP Connection with the base URL, auth and extra headers.
    :param endpoint: path on the Connection's host, e.g. ``/api/users`` (templated); full URLs,
        ``//host``, ``@``, ``..`` and control characters are refused.
    :param method: HTTP method (templated).
    :param data: query parameters for GET, body for other methods (templated).
    :param headers: extra request headers (templated).
    :param response_check: ``callable(response) -> bool``; False fails the try.
    :param response_filter: ``callable(response) -> Any``; its result is the XCom.
    :param max_rate_limit_wait: a single wait longer than this fails the task at once.
    :param rate_limit_timeout: total rate-limit waiting of one try beyond this fails the task.
    :param initial_delay: the first try sends nothing before this long after the task is first
        run (templated; timedelta or seconds).
    :param output_path: write the body here atomically and return ``{"path", "status_code",
        "bytes", "content_type"}`` (templated; a local path or an ObjectStoragePath URI). With
        ``outlets=[Asset(...)]`` that dict is also each Asset's event ``extra``.
    :param output_root: an ``output_path`` outside this folder or bucket prefix (after ``..``
        and symlinks) fails the task before any request (templated).
    :param request_timeout: seconds, or ``(connect, read)`` seconds, for the request.
    :param request_deadline: the whole request (headers to last byte) may take this long; past
        it the connection is cut and the try fails as a timeout (retried).
    :param max_response_bytes: stop reading and fail when the body is larger.
    :param rate_limit_jitter: fraction of the backoff added at random (never subtracted).
    :param extra_options: extra ``HttpHook`` options (``verify``, ``proxies``, ...).
    :param shared_gate: share what the server said with every task of the same connection, so
        they wait without sending and queue for their turn.
    :param rate_limit: limits declared for an API that announces none (templated), replacing the
        Connection's ``extra["rate_limit"]``: ``{"requests": 10, "per": "1s"}``, ``{"requests":
        5000, "per": "1h", "burst": 100}``, or a list of them; ``[]``: none. The shared gate holds
        them as it holds what the server says: the stricter wins. See
        :mod:`network_requests.configured_limits`.
    :param gate_key: the quota this request counts against (templated). Default: its
        Connection's own. Tasks naming one key share one gate, across Connections (one token's
        quota) or within one (a per-route limit: a key per route).
    :param deferrable: wait in the triggerer (needs a running triggerer), else reschedule (never
        due sooner than ``MIN_RESCHEDULE_DELAY``). Default: ``[operators] default_deferrable``
        (see :mod:`network_requests.airflow_conventions`).
    :param finish_in_triggerer: with ``deferrable``, the triggerer sends the request at the
        allowed moment and ends the task there on success (one worker launch per task);
        failures go back to a worker. See :meth:`finishes_in_triggerer`.
    :param in_process_wait_threshold: waits this short are slept in the running task (at most
        ``MAX_IN_PROCESS_WAITS`` per run). Default: 0 when deferrable, else 5 s.
    :param idempotency_key: send an ``Idempotency-Key`` with ``idempotency_key_methods``: the
        same on every send of this task instance's request (waits, deferrals, restarts and
        retries), so the server can deduplicate. A header of that name in ``headers`` wins.
    :param idempotency_key_header: its name (default ``Idempotency-Key``).
    :param idempotency_key_methods: the methods that carry it (default ``POST``, ``PATCH``).
    :param pagination_function: ``callable(response) -> dict | None``, as ``HttpOperator``'s: the
        next page's ``endpoint``/``data``/``headers``/``extra_options`` over the previous
        page's, or ``None`` after the last page (see :mod:`network_requests.pagination`). Every
        page waits like one request; the pages read are kept until the task succeeds, so a
        wait or a restart goes on from the next page. The result combines the pages (lists
        concatenated, else the list of pages); ``response_check``/``response_filter`` see each page.
    :param max_pages: read at most this many pages (default 100).
    :param page_checkpoint_folder: where the pages read are kept (default
        ``$NETWORK_REQUESTS_DATA_DIR/.pages``); with several worker hosts, shared storage.
    """

    template_fields: Sequence[str] = ("endpoint", "method", "data", "headers", "output_path", "output_root", "initial_delay",
                                      "rate_limit", "gate_key")
    template_fields_renderers = {"headers": "json", "data": "py"}
    ui_color = "#e8f4fd"
    operator_extra_links = (ApiEndpointLink(),)

    def __init__(
        self,
        *,
        http_conn_id: str = DEFAULT_CONN_ID,
        endpoint: str = "/",
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        response_check: Callable[..., bool] | None = None,
        response_filter: Callable[..., Any] | None = None,
        max_rate_limit_wait: timedelta | float | None = DEFAULT_MAX_RATE_LIMIT_WAIT,
        rate_limit_timeout: timedelta | float | None = DEFAULT_RATE_LIMIT_TIMEOUT,
        initial_delay: timedelta | float | str | None = None,
        output_path: str | None = None,
        output_root: str | None = None,
        request_timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
        request_deadline: timedelta | float | None = DEFAULT_REQUEST_DEADLINE,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        rate_limit_jitter: float = 0.1,
        extra_options: dict[str, Any] | None = None,
        shared_gate: bool = True,
        rate_limit: Any = None,
        gate_key: str | None = None,
        deferrable: bool | None = None,
        in_process_wait_threshold: timedelta | float | None = None,
        finish_in_triggerer: bool = True,
        idempotency_key: bool = True,
        idempotency_key_header: str = DEFAULT_HEADER,
        idempotency_key_methods: Collection[str] = DEFAULT_METHODS,
        pagination_function: Callable[[requests.Response], dict[str, Any] | None] | None = None,
        max_pages: int = DEFAULT_MAX_PAGES,
        page_checkpoint_folder: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # What to send; templated fields are rendered before execute() reads them.
        self.http_conn_id, self.endpoint, self.method, self.data = http_conn_id, endpoint, method, data
        self.headers, self.extra_options = headers or {}, extra_options or {}
        self.response_check, self.response_filter = response_check, response_filter
        self.output_path, self.output_root, self.initial_delay = output_path, output_root, initial_delay
        # The caps of one request.
        self.request_timeout = coercion.request_timeout(request_timeout)
        self.request_deadline = coercion.as_timedelta(request_deadline, "request_deadline")
        self.max_response_bytes = max_response_bytes
        # How rate limits are waited out.
        self.max_rate_limit_wait = coercion.as_timedelta(max_rate_limit_wait, "max_rate_limit_wait")
        self.rate_limit_timeout = coercion.as_timedelta(rate_limit_timeout, "rate_limit_timeout")
        self.rate_limit_jitter, self.shared_gate = rate_limit_jitter, shared_gate
        self.rate_limit, self.gate_key = rate_limit, gate_key
        self.deferrable, self.finish_in_triggerer = deferrable_or_default(deferrable), finish_in_triggerer
        self.in_process_wait_threshold = coercion.as_timedelta(
            default_in_process_threshold(self.deferrable) if in_process_wait_threshold is None else in_process_wait_threshold,
            "in_process_wait_threshold") or timedelta(0)
        self.idempotency_key, self.idempotency_key_header = idempotency_key, idempotency_key_header
        self.idempotency_key_methods = tuple(idempotency_key_methods)
        if max_pages < 1:
            raise ValueError(f"max_pages must be at least 1, got {max_pages!r}")
        self.pagination_function, self.max_pages = pagination_function, max_pages
        self.page_checkpoint_folder = page_checkpoint_folder
        self._task: TaskRef | None = None

    # -- seams for tests and subclasses -------------------------------------------------

    #: The clock used for every decision; a subclass or test may replace it.
    clock: Callable[[], datetime] = staticmethod(_utcnow)
    #: Source of jitter in [0, 1).
    random_fraction: Callable[[], float] = staticmethod(random.random)
    #: How an in-process wait sleeps.
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    # -- Airflow entry points ------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        # method is templated (a trigger form may choose it), so normalise it after rendering.
        self.method = str(self.method).upper()
        check_gate_settings(self)  # a bad rate_limit or gate_key fails the task before any wait
        ti = context["ti"]
        reschedules = int(context.get("task_reschedule_count") or 0)
        initial_delay = coercion.as_timedelta(self.initial_delay, "initial_delay")
        delayed_this_try = bool(initial_delay) and ti.try_number == 1
        if delayed_this_try and reschedules == 0:
            step = next_step(InitialDelay(self.clock() + initial_delay), WaitBudget(), self._rules(),
                             now=self.clock(), rand=self.random_fraction)
            self._carry_out(step, TaskRef.of(ti), what="initial delay", safe_url=redact_url(str(self.endpoint)))
        first_reschedule = ti.get_first_reschedule_date(context) if reschedules else None
        return self._announce_output(context, self._drive(context, budget_after_reschedules(
            reschedules, first_reschedule, initial_delay if delayed_this_try else None)))

    def resume_after_wait(self, context: Context, event: Any = None, budget: dict[str, Any] | None = None,
                          **legacy: Any) -> Any:
        """Where a deferred wait comes back when the trigger fires.

        From a :class:`~network_requests.triggers.RateLimitedRequestTrigger` the event says
        what the triggerer already did: a ``failure`` is raised here (the request is not sent
        again), a ``result`` is returned, a ``resume`` sends from here with its budget.
        """
        self.method = str(self.method).upper()
        if isinstance(event, dict) and "failure" in event:
            raise failure_from_payload(event["failure"])
        if isinstance(event, dict) and "result" in event:
            return self._announce_output(context, event["result"])
        if isinstance(event, dict) and "resume" in event:
            budget = event["resume"]
        return self._announce_output(context, self._drive(context, WaitBudget.from_dict(
            budget if budget is not None else legacy)))

    def _announce_output(self, context: Context, result: Any) -> Any:
        """The task's result; a saved response is described in its Assets' events too."""
        if self.output_path and self.outlets:
            record_output_events(context["outlet_events"], self.outlets, result)
        return result

    # -- the driver ----------------------------------------------------------------------

    def _drive(self, context: Context, budget: WaitBudget) -> Any:
        """The task's result: of its request, or of every page (:mod:`network_requests.page_reader`)."""
        if self.pagination_function is not None:
            return read_pages(self, context, budget, lambda budget: self._final_answer(context, budget))
        response, url, outcome, what = self._final_answer(context, budget)
        return finish(self, outcome, response, url, method=self.method, what=what, log=self.log,
                      response_check=self.response_check)

    def _final_answer(self, context: Context, budget: WaitBudget) -> tuple[requests.Response, str, Outcome, str]:
        """Ask the gate, send, judge the answer, carry out the engine's step; until a final answer
        (returned with its URL, outcome and status line) or gone (a wait that leaves, a failure)."""
        self._task = task = TaskRef.of(context["ti"])
        self.check_output_path()
        endpoint, url = self._target()
        safe_url, rules = redact_url(url), self._rules()
        # Looking at the gate again costs no worker launch when the trigger sends.
        gate = task_gate(self, base_url=self.hook.base_url, cheap_looks=self.deferrable and self.finishes_in_triggerer())
        # Each pass sends at most one request; each wait either leaves the process or counts
        # against rules.max_in_process_waits, so the loop is bounded.
        for _ in range(rules.max_in_process_waits + 2):
            step = Send(budget) if gate is None else gate.admission_step(task.ticket, budget, rules, now=self.clock(),
                                                                         rand=self.random_fraction)
            what = f"{self.method} {safe_url} not sent"
            if isinstance(step, Send):
                started = time.monotonic()
                try:
                    response, elapsed = self.send_request(endpoint, url)
                except NetworkRequestError as error:
                    report_no_answer(error, conn_id=self.http_conn_id, elapsed=time.monotonic() - started,
                                     now=self.clock(), gate=gate, ticket=task.ticket, log=self.log)
                    raise
                step, what = judge_answer(self, response, elapsed=elapsed, conn_id=self.http_conn_id,
                                          method=self.method, safe_url=safe_url, budget=step.budget, rules=rules,
                                          now=self.clock(), rand=self.random_fraction, gate=gate,
                                          ticket=task.ticket, log=self.log)
                if isinstance(step, Finish):
                    return response, url, step.outcome, what
            budget = self._carry_out(step, task, what=what, safe_url=safe_url)
        raise AssertionError("unreachable: in-process waits are bounded")  # pragma: no cover

    def _carry_out(self, step: Wait | Fail, task: TaskRef, *, what: str, safe_url: str) -> WaitBudget:
        """Sleep here and return the budget to go on with; or leave (defer, reschedule) or fail, by raising."""
        if isinstance(step, Fail):
            self.log.error("%s; giving up: %s", what, step.problem)
            raise failure_of(step, method=self.method, safe_url=safe_url)
        announce_wait(step, what=what, conn_id=self.http_conn_id, safe_url=safe_url, task_label=task.label,
                      now=self.clock(), log=self.log)
        if step.mode is Mode.IN_PROCESS:
            sleep_until(step.not_before, clock=self.clock, sleep=self.sleep)
            return step.budget
        if step.mode is Mode.DEFER:
            trigger = deferral_trigger(self, NetworkRequestOperator, step, task, worker_only=_WORKER_ONLY)
            self.defer(trigger=trigger, method_name="resume_after_wait", kwargs={"budget": step.budget.to_dict()})
        raise AirflowRescheduleException(step.resume_at)

    def _rules(self) -> WaitRules:
        place = Place.WORKER_DEFERRABLE if self.deferrable else Place.WORKER_RESCHEDULING
        return wait_settings_of(self).rules(place, in_process_threshold=self.in_process_wait_threshold,
                                           min_leave_delay=min_defer_delay() if self.deferrable else MIN_RESCHEDULE_DELAY)

    # -- extension points (each may be overridden; an override sends from a worker) -------

    def check_output_path(self) -> None:
        """Refuse an ``output_path`` that would land outside ``output_root``, before any request."""
        if self.output_path and self.output_root:
            refuse_outside_root(str(self.output_path), str(self.output_root), method=self.method,
                                endpoint=str(self.endpoint))

    def request_headers(self) -> dict[str, str]:
        """The operator's headers, with the Idempotency-Key for a keyed method."""
        return self._headers_for(self._task)

    def _headers_for(self, task: TaskRef | None) -> dict[str, str]:
        if not self.idempotency_key or task is None:
            return dict(self.headers)
        return with_idempotency_key(self.headers, method=self.method, key=task.idempotency_key,
                                    header=self.idempotency_key_header, methods=self.idempotency_key_methods)

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``HttpHook.run``; override to add ``json=``, ``params=``, auth, ..."""
        kwargs = sending.request_kwargs_for_hook(data=self.data, headers=self.request_headers(),
                                                 extra_options=self.extra_options, timeout=self.request_timeout)
        kwargs["hooks"] = {"response": [self.refuse_redirect_to_another_origin]}
        return kwargs

    def result_of(self, response: requests.Response, url: str) -> Any:
        """The XCom value of a successful response (of one page, with a ``pagination_function``)."""
        if self.output_path and self.pagination_function is None:  # the pages are written together
            self.check_output_path()  # again: a symlink may have appeared meanwhile
            result = written_body(response, str(self.output_path))
            self.log.info("Wrote %d bytes to %s", result["bytes"], result["path"])
            return result
        if self.response_filter is not None:
            return self.response_filter(response)
        return self._standard().result_of(response, url)

    def _standard(self) -> StandardBehaviour:
        keyed = carries_idempotency_key(self.request_headers(), self.idempotency_key_header)
        return StandardBehaviour(method=self.method, backoff=wait_settings_of(self).backoff(), rand=self.random_fraction,
                                 sent_idempotency_key=keyed)

    # -- sending from the triggerer -------------------------------------------------------

    def request_spec(self, task: TaskRef) -> RequestSpec:
        """This request, described for the triggerer (JSON-safe when the settings are)."""
        return describe(self, task, endpoint=self.checked_endpoint(self.endpoint), headers=self._headers_for(task))

    def finishes_in_triggerer(self) -> bool:
        """Whether a deferred wait sends the request from the triggerer and can end the task there
        (see :mod:`network_requests.where_to_send`)."""
        task = TaskRef("dag", "run", self.task_id)
        return why_send_from_worker(self, NetworkRequestOperator, lambda: self.request_spec(task),
                                    worker_only=_WORKER_ONLY) is None
