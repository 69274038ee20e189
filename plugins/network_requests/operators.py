"""``NetworkRequestOperator``: one HTTP request, with rate limits honoured by deferring or rescheduling.

The split follows apache-airflow-providers-http: ``HttpHook`` owns the Connection and
the network call; this operator owns the Airflow decisions. What a response means and
how long to wait are pure functions in :mod:`network_requests.rate_limit`.

Outcomes (see the README's table):

============================================  =================================================
Response                                       What the task does
============================================  =================================================
2xx                                            ``response_check``; XCom = JSON / text / file info
429, 503 + ``Retry-After``, 403 + spent quota  defer (or reschedule) to the time the server allows; no try spent
other 5xx, 408, connection error, timeout      fail the try; Airflow retries (``retries``)
other 4xx                                      fail the task at once, no retry
============================================  =================================================
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowRescheduleException

from network_requests import events
from network_requests.endpoints import UnsafeEndpointError, redact_url, same_origin, validate_endpoint
from network_requests.exceptions import (
    PermanentRequestError,
    failure_from_payload,
    RateLimitExceededError,
    ResponseCheckFailed,
    ResponseTooLargeError,
    TransientRequestError,
)
from network_requests.events import AttemptEvent, WaitEvent
from network_requests.gate import Admission, GateState, admit, for_origin, observe, release_probe
from network_requests.gate_store import GateStore, VariableGateStore
from network_requests.hooks import NetworkRequestHook
from network_requests.links import ApiEndpointLink
from network_requests.output import write_atomically
from network_requests.rate_limit import (
    Backoff,
    Outcome,
    RateLimitWait,
    WaitSource,
    classify,
    decide_rate_limit_wait,
    wait_limit_violation,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_CONN_ID = "network_request_api"
DEFAULT_MAX_RATE_LIMIT_WAIT = timedelta(hours=1)
#: Total time one try may spend waiting on rate limits before it fails.
DEFAULT_RATE_LIMIT_TIMEOUT = timedelta(hours=6)
#: (connect, read) seconds. ``requests`` waits forever without a timeout.
DEFAULT_REQUEST_TIMEOUT = (10.0, 60.0)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: The read timeout is per socket read: a body trickling in a byte a minute never trips it.
#: This bounds the whole request, headers to last byte.
DEFAULT_REQUEST_DEADLINE = timedelta(minutes=5)
#: How much of an error body goes into a failure message.
ERROR_BODY_PREVIEW_CHARS = 300
_READ_CHUNK_BYTES = 64 * 1024
#: With ``deferrable=False``, waits up to this long are slept in the running task by default.
#: A reschedule costs a new task process and a trip through the scheduler queue, and is never
#: due sooner than MIN_RESCHEDULE_DELAY, so shorter waits are cheaper slept. Measured with
#: ``make bench`` (60 requests at 1/s, 4 slots): 60 task launches instead of 135, no try
#: spent, makespan 57 s instead of 86 s.
DEFAULT_RESCHEDULE_IN_PROCESS_THRESHOLD = timedelta(seconds=5)
#: With ``deferrable=True`` (the default) nothing is slept in the task by default: a deferral
#: has a short minimum delay (min_defer_delay), and a task launch costs less slot time than
#: the waits it replaces.
#: Measured with ``make bench``: 0 slot-seconds waiting and half the busy slot time of the
#: 5 s in-process threshold, for a makespan still within 1.25x of the ideal.
DEFAULT_DEFERRED_IN_PROCESS_THRESHOLD = timedelta(0)
#: At most this many in-process waits per run of the task, so a slot is never held for long.
MAX_IN_PROCESS_WAITS = 5
#: A reschedule is never due sooner than this: one due within seconds can race the
#: executor's report of the run that asked for it, and Airflow 3.3.2 then counts a failed try
#: (apache/airflow#71172). The supervisor notices its task exited only at its next wake-up,
#: up to [workers] min_heartbeat_interval later, and the scheduler reads the report a loop
#: after that: 5 s was measured to be too short. Waiting longer than the server asked is
#: always allowed.
MIN_RESCHEDULE_DELAY = timedelta(seconds=10)
#: What the triggerer runs of the operator when it sends the request itself; a subclass that
#: replaces any of these sends from a worker instead (its code is not the triggerer's).
_TRIGGERER_RUNS = (
    "send_request", "classify_response", "rate_limit_wait", "result_of", "request_kwargs",
    "checked_endpoint", "hook", "gate_store", "clock", "random_fraction", "sleep", "execute",
    "resume_after_wait", "_attempt", "_wait", "_gate_admission", "_gate_observe",
)


def min_defer_delay() -> timedelta:
    """The earliest a deferral may be due: [workers] min_heartbeat_interval from now.

    The scheduler forgives the executor's late report of the run that deferred while the
    task is back in ``scheduled`` or still queued in the executor ("resume-after-defer" in
    SchedulerJobRunner._process_executor_events), but not once the resumed run is running:
    then it counts a failed try, as for a reschedule (apache/airflow#71172). The report is
    late by up to the supervisor's heartbeat interval (it notices its task's exit at its next
    wake-up); the resumed run needs a triggerer loop and a scheduler loop before it can run,
    as the report needs a scheduler loop to be read. So a deferral due no sooner than that
    interval is reported before the task runs again. Deferrals due at once spent 3 tries in
    132 launches with the default 5 s heartbeat (make bench); this project's stacks use 1 s.
    """
    try:
        from airflow.sdk.configuration import conf

        heartbeat = conf.getint("workers", "min_heartbeat_interval", fallback=5)
    except Exception:  # an SDK without that setting: assume Airflow's default
        heartbeat = 5
    return timedelta(seconds=max(heartbeat, 0))


@dataclass(frozen=True)
class _WaitProgress:
    """How much rate-limit waiting this try has done: the input of the backoff and the timeout."""

    rate_limit_waits: int
    waiting_since: datetime | None

    def waited(self, now: datetime) -> timedelta:
        if self.waiting_since is None:
            return timedelta(0)
        return max(now - self.waiting_since, timedelta(0))

    def after_wait(self, now: datetime) -> _WaitProgress:
        return _WaitProgress(self.rate_limit_waits + 1, self.waiting_since or now)


def _ticket(context: Any) -> str:
    """This task instance's place in the shared gate's queue (stable across reschedules)."""
    ti = context["ti"]
    return f"{ti.dag_id}|{ti.run_id}|{ti.task_id}|{getattr(ti, 'map_index', -1)}"


def _task_label(context: Any) -> str:
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return f"{ti.dag_id}.{ti.task_id}" + (f"[{map_index}]" if map_index is not None and map_index >= 0 else "")


def _cut_connection(response: requests.Response, cut: threading.Event) -> None:
    """Shut the socket under a response being read, so the blocked read returns at once."""
    cut.set()
    raw = response.raw
    connection = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
    candidates = [getattr(connection, "sock", None)]
    # A `Connection: close` response has been detached from urllib3's connection; its socket
    # is the one http.client reads through: HTTPResponse.fp -> BufferedReader -> SocketIO.
    file = getattr(getattr(raw, "_fp", None), "fp", None)
    candidates.append(getattr(getattr(file, "raw", None), "_sock", None))
    for sock in candidates:
        if sock is None:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        response.close()
    except OSError:
        pass


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _as_timedelta(value: Any, name: str) -> timedelta | None:
    """Accept a timedelta, seconds as a number, or seconds as a (templated) string."""
    if value is None or value == "":
        return None
    if isinstance(value, timedelta):
        return value
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a timedelta or a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return timedelta(seconds=seconds)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class NetworkRequestOperator(BaseOperator):
    """
    Send one HTTP request through an Airflow Connection, respecting the server's rate limits.

    On a rate-limited response (429, 503 with ``Retry-After``, 403 with a spent quota) the
    task waits for the moment the server allows: it defers to the triggerer (``deferred``;
    or, with ``deferrable=False``, goes to ``up_for_reschedule``), frees its worker slot,
    keeps its ``try_number``, and sends the request again then, never earlier. The wait
    comes from ``Retry-After``, else from a reset header when the quota is spent, else from
    the task's ``retry_delay`` with ``retry_exponential_backoff``.

    :param http_conn_id: the HTTP Connection with the base URL, auth and extra headers.
    :param endpoint: path on the Connection's host, e.g. ``/api/users`` (templated).
        Full URLs, ``//host``, ``@``, ``..`` and control characters are refused.
    :param method: HTTP method.
    :param data: query parameters for GET, body for other methods (templated).
    :param headers: extra request headers (templated).
    :param response_check: ``callable(response) -> bool``; False fails the try.
    :param response_filter: ``callable(response) -> Any``; its result is the XCom.
    :param max_rate_limit_wait: a single wait longer than this fails the task at once.
    :param rate_limit_timeout: total rate-limit waiting of one try beyond this fails the task.
    :param initial_delay: the first try starts this long after the task is first run,
        without sending a request before then (templated; timedelta or seconds).
    :param output_path: write the body here atomically, and return
        ``{"path", "status_code", "bytes", "content_type"}`` instead (templated; a local
        path or an ObjectStoragePath URI such as ``file://...`` or ``s3://...``).
    :param output_root: when set, a rendered ``output_path`` outside this folder (after ``..``
        and symlinks) or bucket prefix fails the task before any request (templated).
    :param request_timeout: seconds, or ``(connect, read)`` seconds, for the request.
    :param request_deadline: the whole request (headers to last byte) may take this long;
        past it the connection is cut and the try fails as a timeout (retried).
    :param max_response_bytes: stop reading and fail when the body is larger.
    :param rate_limit_jitter: fraction of the backoff added at random (never subtracted).
    :param extra_options: extra ``HttpHook`` options (``verify``, ``proxies``, ...).
    :param shared_gate: share what the server said with every task of the same connection
        (an Airflow Variable), so they wait without sending and queue for their turn.
    :param deferrable: wait in the triggerer (a trigger due at the allowed moment), the
        default; needs a running triggerer. ``False`` reschedules instead
        (``up_for_reschedule``, never due sooner than ``MIN_RESCHEDULE_DELAY``).
    :param finish_in_triggerer: with ``deferrable``, the triggerer sends the request at the
        allowed moment and ends the task there on success: a rate-limited task then costs
        one worker launch, not one per wait. Failures go back to a worker, raised there.
        Only for the operator's own behaviour (see :meth:`finishes_in_triggerer`).
    :param in_process_wait_threshold: waits this short happen inside the running task
        (holding its slot) instead of a deferral or reschedule; at most
        ``MAX_IN_PROCESS_WAITS`` per run. Default: 0 when deferrable, else 5 s.
    """

    template_fields: Sequence[str] = (
        "endpoint",
        "method",
        "data",
        "headers",
        "output_path",
        "output_root",
        "initial_delay",
    )
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
        deferrable: bool = True,
        in_process_wait_threshold: timedelta | float | None = None,
        finish_in_triggerer: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.http_conn_id = http_conn_id
        self.endpoint = endpoint
        self.method = method
        self.data = data
        self.headers = headers or {}
        self.response_check = response_check
        self.response_filter = response_filter
        self.max_rate_limit_wait = _as_timedelta(max_rate_limit_wait, "max_rate_limit_wait")
        self.rate_limit_timeout = _as_timedelta(rate_limit_timeout, "rate_limit_timeout")
        self.initial_delay = initial_delay
        self.output_path = output_path
        self.output_root = output_root
        # (connect, read) may arrive as a JSON list; requests only takes a tuple.
        self.request_timeout = tuple(request_timeout) if isinstance(request_timeout, list) else request_timeout
        self.request_deadline = _as_timedelta(request_deadline, "request_deadline")
        self.max_response_bytes = max_response_bytes
        self.rate_limit_jitter = rate_limit_jitter
        self.extra_options = extra_options or {}
        self.shared_gate = shared_gate
        self.deferrable = deferrable
        self.finish_in_triggerer = finish_in_triggerer
        if in_process_wait_threshold is None:
            in_process_wait_threshold = (
                DEFAULT_DEFERRED_IN_PROCESS_THRESHOLD if deferrable else DEFAULT_RESCHEDULE_IN_PROCESS_THRESHOLD
            )
        self.in_process_wait_threshold = _as_timedelta(in_process_wait_threshold, "in_process_wait_threshold") or timedelta(0)

    # -- seams for tests and subclasses -------------------------------------------------

    #: The clock used for every decision; a subclass or test may replace it.
    clock: Callable[[], datetime] = staticmethod(_utcnow)
    #: Source of jitter in [0, 1).
    random_fraction: Callable[[], float] = staticmethod(random.random)
    #: How an in-process wait sleeps.
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    @cached_property
    def gate_store(self) -> GateStore:
        """Where the shared gate lives; an Airflow Variable per connection by default."""
        return VariableGateStore()

    @cached_property
    def hook(self) -> NetworkRequestHook:
        """Built on first use inside ``execute``: parsing a DAG never reads a Connection."""
        return NetworkRequestHook(method=self.method, http_conn_id=self.http_conn_id)

    # -- Airflow entry point ------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        # method is templated (a trigger form may choose it), so normalise it after rendering.
        self.method = str(self.method).upper()
        now = self.clock()
        ti = context["ti"]
        reschedules = int(context.get("task_reschedule_count") or 0)
        initial_delay = _as_timedelta(self.initial_delay, "initial_delay")
        delayed_this_try = bool(initial_delay) and ti.try_number == 1
        if delayed_this_try and reschedules == 0:
            wait = RateLimitWait(initial_delay.total_seconds(), WaitSource.INITIAL_DELAY, now + initial_delay)
            self._wait(wait, context, _WaitProgress(0, None), url=str(self.endpoint), reason="initial delay",
                       in_process_allowed=False)
        progress = _WaitProgress(
            rate_limit_waits=max(reschedules - (1 if delayed_this_try else 0), 0),
            waiting_since=self._first_rate_limit_wait(ti, context, initial_delay if delayed_this_try else None),
        )
        return self._attempt(context, progress)

    def resume_after_wait(
        self,
        context: Context,
        event: Any = None,
        rate_limit_waits: int = 0,
        waiting_since: str | None = None,
    ) -> Any:
        """Where a deferred wait (``deferrable=True``) comes back when the trigger fires.

        From a :class:`~network_requests.triggers.RateLimitedRequestTrigger` the event says
        what the triggerer already did: a ``failure`` is raised here (the request is not sent
        again), a ``result`` is returned; otherwise the request is sent from here.
        """
        self.method = str(self.method).upper()
        if isinstance(event, dict) and "failure" in event:
            raise failure_from_payload(event["failure"])
        if isinstance(event, dict) and "result" in event:
            return event["result"]
        if isinstance(event, dict) and "resume" in event:
            rate_limit_waits = int(event["resume"].get("rate_limit_waits", rate_limit_waits))
            waiting_since = event["resume"].get("waiting_since", waiting_since)
        since = datetime.fromisoformat(waiting_since) if waiting_since else None
        return self._attempt(context, _WaitProgress(rate_limit_waits, since))

    def _attempt(self, context: Context, progress: _WaitProgress) -> Any:
        self._check_output_path()
        endpoint = self.checked_endpoint(self.endpoint)
        url = self.hook.url_from_endpoint(endpoint)
        if not same_origin(url, self.hook.base_url):
            raise PermanentRequestError(
                f"endpoint {endpoint!r} resolves to {redact_url(url)}, outside the Connection's "
                f"{redact_url(self.hook.base_url)}",
                method=self.method,
                url=redact_url(url),
            )
        safe_url = redact_url(url)
        ticket = _ticket(context)

        # Short waits happen here, in-process; each pass of the loop sends at most one request,
        # and the count bounds how long a task may hold its slot this way.
        for in_process_waits in range(MAX_IN_PROCESS_WAITS + 1):
            in_process_allowed = in_process_waits < MAX_IN_PROCESS_WAITS
            if self.shared_gate:
                gate_wait, gate_reason = self._gate_admission(ticket, in_process_allowed=in_process_allowed)
                if gate_wait is not None:
                    self._wait(gate_wait, context, progress, url=safe_url,
                               reason=f"{self.method} {safe_url} not sent: {gate_reason}",
                               in_process_allowed=in_process_allowed, status_code=None)
                    continue

            try:
                response, elapsed = self.send_request(endpoint, url)
            except Exception:
                # No answer to learn from: don't make the others wait out a probe that failed.
                self._gate_release_probe(ticket)
                raise
            outcome = self.classify_response(response)
            status_line = f"{self.method} {safe_url} -> {response.status_code} in {elapsed:.3f}s"
            events.emit(AttemptEvent(self.http_conn_id, self.method, safe_url, response.status_code,
                                     outcome.value, elapsed, self.clock()))

            if outcome is not Outcome.RATE_LIMITED:
                self._gate_observe(response, rate_limited_until=None, ticket=ticket)

            if outcome is Outcome.RATE_LIMITED:
                wait = self.rate_limit_wait(response, now=self.clock(), consecutive_waits=progress.rate_limit_waits)
                self._gate_observe(response, rate_limited_until=wait.not_before, ticket=ticket)
                if wait.fallback_reason:
                    self.log.warning(
                        "Malformed rate-limit header, using %s: %s", wait.source.value, wait.fallback_reason
                    )
                self._wait(wait, context, progress, url=safe_url, reason=status_line,
                           in_process_allowed=in_process_allowed, status_code=response.status_code)
                progress = progress.after_wait(self.clock())
                continue

            if outcome is Outcome.TRANSIENT:
                self.log.warning("%s; transient, Airflow will retry if retries remain", status_line)
                raise TransientRequestError(
                    f"{self.method} {safe_url} answered {response.status_code} {response.reason}: "
                    f"{self._body_preview(response)}",
                    method=self.method,
                    url=safe_url,
                    status_code=response.status_code,
                )

            if outcome is Outcome.PERMANENT:
                self.log.error("%s; permanent, failing without retry", status_line)
                raise PermanentRequestError(
                    f"{self.method} {safe_url} answered {response.status_code} {response.reason} "
                    f"(not retried: the same request would fail again): {self._body_preview(response)}",
                    method=self.method,
                    url=safe_url,
                    status_code=response.status_code,
                )

            self.log.info("%s; success, %d bytes", status_line, len(response.content))
            if self.response_check is not None and not self.response_check(response):
                raise ResponseCheckFailed(
                    f"response_check returned False for {self.method} {safe_url}",
                    method=self.method,
                    url=safe_url,
                    status_code=response.status_code,
                )
            return self.result_of(response, url)
        raise AssertionError("unreachable: the last pass always reschedules or defers")  # pragma: no cover

    # -- extension points ---------------------------------------------------------------

    def _check_output_path(self) -> None:
        """Refuse an ``output_path`` that would land outside ``output_root``, before any request."""
        if not self.output_path or not self.output_root:
            return
        from network_requests.safe_paths import UnsafeOutputPathError, checked_output_path

        try:
            checked_output_path(str(self.output_path), str(self.output_root))
        except UnsafeOutputPathError as error:
            raise PermanentRequestError(str(error), method=self.method, url=str(self.endpoint)[:200]) from None

    def checked_endpoint(self, endpoint: str) -> str:
        """The endpoint to request; refuse one that could leave the Connection's host."""
        try:
            return validate_endpoint(endpoint)
        except UnsafeEndpointError as error:
            raise PermanentRequestError(str(error), method=self.method, url=str(endpoint)[:200]) from None

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``HttpHook.run``; override to add ``json=``, ``params=``, auth, ..."""
        extra_options = {
            **self.extra_options,
            # Decide on the status ourselves: HttpHook would raise and lose the headers.
            "check_response": False,
            # Read the body in chunks so max_response_bytes bounds memory.
            "stream": True,
        }
        if self.request_timeout is not None:
            extra_options.setdefault("timeout", self.request_timeout)
        return {
            "data": self.data,
            "headers": self.headers,
            "extra_options": extra_options,
            # requests drops Authorization on a redirect to another host, but not the API
            # keys a Connection's extra headers add: refuse to follow such a redirect at all.
            "hooks": {"response": [self._refuse_redirect_to_another_origin]},
        }

    def _refuse_redirect_to_another_origin(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if not response.is_redirect:
            return
        target = requests.compat.urljoin(response.url, response.headers.get("Location", ""))
        if not same_origin(target, self.hook.base_url):
            response.close()
            raise PermanentRequestError(
                f"{self.method} {redact_url(response.url)} redirected ({response.status_code}) to "
                f"{redact_url(target)}, another host than the Connection's; not followed, so the "
                "Connection's credentials and headers stay with their host",
                method=self.method,
                url=redact_url(response.url),
                status_code=response.status_code,
            )

    def send_request(self, endpoint: str, url: str) -> tuple[requests.Response, float]:
        """Send the request and read the body; connection problems become transient errors."""
        started = time.monotonic()
        watchdog: threading.Timer | None = None
        cut = threading.Event()
        try:
            response = self.hook.run(endpoint, **self.request_kwargs())
            if self.request_deadline is not None:
                left = self.request_deadline.total_seconds() - (time.monotonic() - started)
                watchdog = threading.Timer(max(left, 0.0), _cut_connection, (response, cut))
                watchdog.daemon = True
                watchdog.start()
            self._read_body(response, url)
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader) as error:
            raise PermanentRequestError(
                f"{self.method} {redact_url(url)} cannot be sent: {type(error).__name__}",
                method=self.method,
                url=redact_url(url),
            ) from None
        except (requests.RequestException, OSError) as error:
            elapsed = time.monotonic() - started
            if cut.is_set():
                kind = f"took longer than request_deadline={self.request_deadline}"
            elif isinstance(error, requests.Timeout):
                kind = "timed out"
            elif isinstance(error, requests.ConnectionError):
                kind = "could not connect"
            else:
                kind = "broke off"
            self.log.warning("%s %s -> %s after %.3fs", self.method, redact_url(url), kind, elapsed)
            events.emit(AttemptEvent(self.http_conn_id, self.method, redact_url(url), None,
                                     "connection_error", elapsed, self.clock()))
            raise TransientRequestError(
                f"{self.method} {redact_url(url)} {kind}: {type(error).__name__}",
                method=self.method,
                url=redact_url(url),
            ) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if cut.is_set():
            # The deadline fired just as the body completed: don't trust what was read.
            raise TransientRequestError(
                f"{self.method} {redact_url(url)} took longer than request_deadline={self.request_deadline}",
                method=self.method,
                url=redact_url(url),
            )
        return response, time.monotonic() - started

    def classify_response(self, response: requests.Response) -> Outcome:
        """What the response means; override for APIs that signal rate limits differently."""
        return classify(response.status_code, response.headers)

    def rate_limit_wait(self, response: requests.Response, *, now: datetime, consecutive_waits: int) -> RateLimitWait:
        """How long to wait after a rate-limited response; override for provider-specific headers."""
        backoff = Backoff(
            retry_delay=self.retry_delay if isinstance(self.retry_delay, timedelta) else timedelta(seconds=self.retry_delay),
            multiplier=float(self.retry_exponential_backoff or 0),
            max_delay=self.max_retry_delay if isinstance(self.max_retry_delay, timedelta) else None,
            jitter=self.rate_limit_jitter,
        )
        return decide_rate_limit_wait(
            response.headers,
            now=now,
            backoff=backoff,
            consecutive_waits=consecutive_waits,
            rand=self.random_fraction,
        )

    def result_of(self, response: requests.Response, url: str) -> Any:
        """The XCom value of a successful response."""
        content_type = response.headers.get("Content-Type", "")
        if self.output_path:
            self._check_output_path()  # again: a symlink may have appeared meanwhile
            written = write_atomically(str(self.output_path), response.content)
            self.log.info("Wrote %d bytes to %s", len(response.content), written)
            return {
                "path": written,
                "status_code": response.status_code,
                "bytes": len(response.content),
                "content_type": content_type,
            }
        if self.response_filter is not None:
            return self.response_filter(response)
        if _is_json(content_type):
            if not response.content.strip():
                return None
            try:
                return json.loads(response.content)
            except ValueError as error:
                raise PermanentRequestError(
                    f"{self.method} {redact_url(url)} declared {content_type!r} but the body is not valid "
                    f"JSON ({error}): {self._body_preview(response)}",
                    method=self.method,
                    url=redact_url(url),
                    status_code=response.status_code,
                ) from None
        return response.text

    # -- internals ----------------------------------------------------------------------

    def _wait(
        self,
        wait: RateLimitWait,
        context: Context,
        progress: _WaitProgress,
        *,
        url: str,
        reason: str,
        in_process_allowed: bool,
        status_code: int | None = None,
    ) -> None:
        """Wait until ``wait.not_before``: return after a short in-process wait, else reschedule or defer.

        A wait past ``max_rate_limit_wait`` or ``rate_limit_timeout`` fails the task instead.
        """
        now = self.clock()
        if wait.source is not WaitSource.INITIAL_DELAY:
            problem = wait_limit_violation(
                wait,
                waited_so_far=progress.waited(now),
                max_single_wait=self.max_rate_limit_wait,
                total_timeout=self.rate_limit_timeout,
            )
            if problem:
                self.log.error("%s; rate limited, giving up: %s", reason, problem)
                raise RateLimitExceededError(
                    f"{self.method} {url} was rate limited"
                    f"{f' ({status_code})' if status_code else ''} and {problem}",
                    method=self.method,
                    url=url,
                    status_code=status_code,
                    wait_seconds=wait.seconds,
                )
        remaining = (wait.not_before - now).total_seconds()
        threshold = self.in_process_wait_threshold.total_seconds()
        if in_process_allowed and remaining <= threshold:
            mode = "in_process"
        elif self.deferrable:
            mode = "defer"
        else:
            mode = "reschedule"
        if mode == "in_process":
            resume_at = wait.not_before
        else:
            resume_at = max(wait.not_before, now + self._minimum_delay())
        self.log.info(
            "%s; waiting %.3fs (%s) until %s, %s%s, without spending a try",
            reason,
            max(remaining, 0.0),
            wait.source.value,
            wait.not_before.isoformat(),
            {"in_process": "in-process", "defer": "deferred", "reschedule": "rescheduled"}[mode],
            "" if resume_at == wait.not_before else f" for {resume_at.isoformat()} (minimum {mode} delay)",
        )
        events.emit(
            WaitEvent(self.http_conn_id, url, max(remaining, 0.0), wait.source.value, mode, wait.not_before,
                      now, _task_label(context))
        )
        if mode == "in_process":
            # Sleep to the exact moment; a wake-up a hair early sleeps again.
            for _ in range(100):
                left = (wait.not_before - self.clock()).total_seconds()
                if left <= 0:
                    return
                self.sleep(left)
            return
        waits_after = progress.rate_limit_waits + (0 if wait.source is WaitSource.INITIAL_DELAY else 1)
        if mode == "defer":
            since = progress.waiting_since or (None if wait.source is WaitSource.INITIAL_DELAY else now)
            waiting_since = since.isoformat() if since else None
            self.defer(
                trigger=self._wait_trigger(resume_at, context, waits_after, waiting_since),
                method_name="resume_after_wait",
                kwargs={"rate_limit_waits": waits_after, "waiting_since": waiting_since},
            )
        raise AirflowRescheduleException(resume_at)

    def _wait_trigger(self, resume_at: datetime, context: Any, rate_limit_waits: int, waiting_since: str | None) -> Any:
        """The trigger of a deferred wait: one that sends the request itself, when it can."""
        if self.finishes_in_triggerer():
            from network_requests.triggers import RateLimitedRequestTrigger

            ti = context["ti"]
            return RateLimitedRequestTrigger(
                moment=resume_at,
                operator_kwargs=self.triggerer_kwargs(),
                task_ref={"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id,
                      "map_index": getattr(ti, "map_index", -1)},
                rate_limit_waits=rate_limit_waits,
                waiting_since=waiting_since,
                push_xcom=bool(self.do_xcom_push),
            )
        from airflow.providers.standard.triggers.temporal import DateTimeTrigger

        return DateTimeTrigger(moment=resume_at)

    def finishes_in_triggerer(self) -> bool:
        """Whether a deferred wait sends the request from the triggerer and can end the task there.

        Only the operator's own behaviour is run in the triggerer, from its settings; so not
        with a ``response_check``/``response_filter`` (callables), an ``output_path`` (a
        file the workers should write), replaced extension points, or settings that do not
        serialise as JSON. Those wait in the triggerer and send from a worker.
        """
        if not (self.deferrable and self.finish_in_triggerer):
            return False
        if self.response_check is not None or self.response_filter is not None or self.output_path:
            return False
        cls = type(self)
        if any(getattr(cls, name) is not getattr(NetworkRequestOperator, name) for name in _TRIGGERER_RUNS):
            return False
        instance = vars(self)
        if any(name in instance for name in ("clock", "random_fraction", "sleep", "send_request")):
            return False
        if "gate_store" in instance and not isinstance(instance["gate_store"], VariableGateStore):
            return False
        if "hook" in instance and type(instance["hook"]) is not NetworkRequestHook:
            return False
        try:
            json.dumps(self.triggerer_kwargs())
        except (TypeError, ValueError):
            return False
        return True

    def triggerer_kwargs(self) -> dict[str, Any]:
        """The settings the triggerer needs to send this request as this operator would (JSON-safe)."""

        def seconds(value: timedelta | float | None) -> float | None:
            return value.total_seconds() if isinstance(value, timedelta) else value

        return {
            "http_conn_id": self.http_conn_id,
            "endpoint": self.endpoint,
            "method": self.method,
            "data": self.data,
            "headers": self.headers,
            "max_rate_limit_wait": seconds(self.max_rate_limit_wait),
            "rate_limit_timeout": seconds(self.rate_limit_timeout),
            "request_timeout": list(self.request_timeout) if isinstance(self.request_timeout, tuple) else self.request_timeout,
            "request_deadline": seconds(self.request_deadline),
            "max_response_bytes": self.max_response_bytes,
            "rate_limit_jitter": self.rate_limit_jitter,
            "extra_options": self.extra_options,
            "shared_gate": self.shared_gate,
            "retry_delay": seconds(self.retry_delay),
            "retry_exponential_backoff": self.retry_exponential_backoff,
            "max_retry_delay": seconds(self.max_retry_delay),
        }

    def _first_rate_limit_wait(self, ti: Any, context: Context, initial_delay: timedelta | None) -> datetime | None:
        """When this try started waiting on rate limits (its first reschedule, past the initial delay)."""
        first = ti.get_first_reschedule_date(context)
        if first is None:
            return None
        return first + (initial_delay or timedelta(0))

    def _minimum_delay(self) -> timedelta:
        """The soonest a wait that leaves the task can be due: deferral or reschedule."""
        return min_defer_delay() if self.deferrable else MIN_RESCHEDULE_DELAY

    def _gate_admission(self, ticket: str, *, in_process_allowed: bool = True) -> tuple[RateLimitWait | None, str | None]:
        """Ask the shared gate: a wait (and why) when this task must not send yet, else ``(None, None)``.

        The gate is told when this task can really be back (slept in-process up to the
        threshold, else deferred or rescheduled no sooner than their minimum delay), so the
        send time it hands out is one the task keeps, and the times stay spaced.
        """
        now = self.clock()
        origin = self._origin()
        in_process_up_to = self.in_process_wait_threshold.total_seconds() if in_process_allowed else 0.0
        min_wait = self._minimum_delay().total_seconds()

        def change(state: GateState) -> tuple[Admission, GateState]:
            admission = admit(
                for_origin(state, origin), ticket, now=now.timestamp(),
                in_process_up_to=in_process_up_to, min_wait=min_wait,
            )
            return admission, admission.state

        admission = self.gate_store.update(self.http_conn_id, change)
        seconds = admission.wait_seconds(now.timestamp())
        if seconds <= 0:
            return None, None
        return RateLimitWait(seconds, WaitSource.SHARED_GATE, now + timedelta(seconds=seconds)), admission.reason

    def _gate_observe(
        self, response: requests.Response, *, rate_limited_until: datetime | None, ticket: str | None = None
    ) -> None:
        if not self.shared_gate:
            return
        now = self.clock().timestamp()
        until = rate_limited_until.timestamp() if rate_limited_until else None
        headers = dict(response.headers)
        origin = self._origin()
        self.gate_store.update(
            self.http_conn_id,
            lambda state: (
                None,
                observe(for_origin(state, origin), headers, now=now, rate_limited_until=until, ticket=ticket),
            ),
        )

    def _gate_release_probe(self, ticket: str | None = None) -> None:
        if not self.shared_gate:
            return
        origin = self._origin()
        try:
            self.gate_store.update(
                self.http_conn_id, lambda state: (None, release_probe(for_origin(state, origin), ticket))
            )
        except Exception:  # the request's own error is what the user must see
            self.log.warning("Could not release the shared gate's probe", exc_info=True)

    def _origin(self) -> str:
        parts = urlsplit(self.hook.base_url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    def _read_body(self, response: requests.Response, url: str) -> None:
        """Read the streamed body into ``response.content``, stopping at ``max_response_bytes``."""
        limit = self.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            response.close()
            raise ResponseTooLargeError(
                f"{self.method} {redact_url(url)} declared {int(declared)} bytes, "
                f"more than max_response_bytes={limit}; not read",
                method=self.method,
                url=redact_url(url),
                status_code=response.status_code,
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(_READ_CHUNK_BYTES):
            size += len(chunk)
            if limit is not None and size > limit:
                response.close()
                raise ResponseTooLargeError(
                    f"{self.method} {redact_url(url)} sent more than max_response_bytes={limit}; "
                    "stopped reading",
                    method=self.method,
                    url=redact_url(url),
                    status_code=response.status_code,
                )
            chunks.append(chunk)
        response._content = b"".join(chunks)  # what .content/.text/.json() read from
        response._content_consumed = True

    def _body_preview(self, response: requests.Response) -> str:
        text = response.content[: ERROR_BODY_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
        text = " ".join(text.split())
        if len(text) > ERROR_BODY_PREVIEW_CHARS:
            text = text[:ERROR_BODY_PREVIEW_CHARS] + "..."
        return text or "(empty body)"
