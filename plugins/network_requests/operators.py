"""``NetworkRequestOperator``: one HTTP request, with rate limits honoured by rescheduling.

The split follows apache-airflow-providers-http: ``HttpHook`` owns the Connection and
the network call; this operator owns the Airflow decisions. What a response means and
how long to wait are pure functions in :mod:`network_requests.rate_limit`.

Outcomes (see the README's table):

============================================  =================================================
Response                                       What the task does
============================================  =================================================
2xx                                            ``response_check``; XCom = JSON / text / file info
429, 503 + ``Retry-After``, 403 + spent quota  reschedule at the time the server allows; no try spent
other 5xx, 408, connection error, timeout      fail the try; Airflow retries (``retries``)
other 4xx                                      fail the task at once, no retry
============================================  =================================================
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

import requests
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowRescheduleException

from network_requests.hooks import NetworkRequestHook
from network_requests.endpoints import UnsafeEndpointError, redact_url, same_origin, validate_endpoint
from network_requests.exceptions import (
    PermanentRequestError,
    RateLimitExceededError,
    ResponseCheckFailed,
    ResponseTooLargeError,
    TransientRequestError,
)
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
#: How much of an error body goes into a failure message.
ERROR_BODY_PREVIEW_CHARS = 300
_READ_CHUNK_BYTES = 64 * 1024


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
    task is rescheduled for the moment the server allows: it goes to ``up_for_reschedule``,
    frees its worker slot, keeps its ``try_number``, and sends the request again then,
    never earlier. The wait comes from ``Retry-After``, else from a reset header when the
    quota is spent, else from the task's ``retry_delay`` with ``retry_exponential_backoff``.

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
    :param request_timeout: seconds, or ``(connect, read)`` seconds, for the request.
    :param max_response_bytes: stop reading and fail when the body is larger.
    :param rate_limit_jitter: fraction of the backoff added at random (never subtracted).
    :param extra_options: extra ``HttpHook`` options (``verify``, ``proxies``, ...).
    """

    template_fields: Sequence[str] = ("endpoint", "method", "data", "headers", "output_path", "initial_delay")
    template_fields_renderers = {"headers": "json", "data": "py"}
    ui_color = "#e8f4fd"

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
        request_timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        rate_limit_jitter: float = 0.1,
        extra_options: dict[str, Any] | None = None,
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
        self.request_timeout = request_timeout
        self.max_response_bytes = max_response_bytes
        self.rate_limit_jitter = rate_limit_jitter
        self.extra_options = extra_options or {}

    # -- seams for tests and subclasses -------------------------------------------------

    #: The clock used for every decision; a subclass or test may replace it.
    clock: Callable[[], datetime] = staticmethod(_utcnow)
    #: Source of jitter in [0, 1).
    random_fraction: Callable[[], float] = staticmethod(random.random)

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
            self._reschedule(
                RateLimitWait(initial_delay.total_seconds(), WaitSource.INITIAL_DELAY, now + initial_delay),
                reason="initial delay",
            )

        endpoint = self.checked_endpoint(self.endpoint)
        url = self.hook.url_from_endpoint(endpoint)
        if not same_origin(url, self.hook.base_url):
            raise PermanentRequestError(
                f"endpoint {endpoint!r} resolves to {redact_url(url)}, outside the Connection's "
                f"{redact_url(self.hook.base_url)}",
                method=self.method,
                url=redact_url(url),
            )

        response, elapsed = self.send_request(endpoint, url)
        outcome = self.classify_response(response)
        status_line = f"{self.method} {redact_url(url)} -> {response.status_code} in {elapsed:.3f}s"

        if outcome is Outcome.RATE_LIMITED:
            rate_limit_waits = reschedules - (1 if delayed_this_try else 0)
            waited_so_far = self._rate_limit_time_spent(ti, context, now, initial_delay if delayed_this_try else None)
            wait = self.rate_limit_wait(response, now=self.clock(), consecutive_waits=rate_limit_waits)
            problem = wait_limit_violation(
                wait,
                waited_so_far=waited_so_far,
                max_single_wait=self.max_rate_limit_wait,
                total_timeout=self.rate_limit_timeout,
            )
            if problem:
                self.log.error("%s; rate limited, giving up: %s", status_line, problem)
                raise RateLimitExceededError(
                    f"{self.method} {redact_url(url)} was rate limited ({response.status_code}) and {problem}",
                    method=self.method,
                    url=redact_url(url),
                    status_code=response.status_code,
                    wait_seconds=wait.seconds,
                )
            if wait.fallback_reason:
                self.log.warning("Malformed rate-limit header, using %s: %s", wait.source.value, wait.fallback_reason)
            self._reschedule(wait, reason=status_line)

        if outcome is Outcome.TRANSIENT:
            self.log.warning("%s; transient, Airflow will retry if retries remain", status_line)
            raise TransientRequestError(
                f"{self.method} {redact_url(url)} answered {response.status_code} {response.reason}: "
                f"{self._body_preview(response)}",
                method=self.method,
                url=redact_url(url),
                status_code=response.status_code,
            )

        if outcome is Outcome.PERMANENT:
            self.log.error("%s; permanent, failing without retry", status_line)
            raise PermanentRequestError(
                f"{self.method} {redact_url(url)} answered {response.status_code} {response.reason} "
                f"(not retried: the same request would fail again): {self._body_preview(response)}",
                method=self.method,
                url=redact_url(url),
                status_code=response.status_code,
            )

        self.log.info("%s; success, %d bytes", status_line, len(response.content))
        if self.response_check is not None and not self.response_check(response):
            raise ResponseCheckFailed(
                f"response_check returned False for {self.method} {redact_url(url)}",
                method=self.method,
                url=redact_url(url),
                status_code=response.status_code,
            )
        return self.result_of(response, url)

    # -- extension points ---------------------------------------------------------------

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
        return {"data": self.data, "headers": self.headers, "extra_options": extra_options}

    def send_request(self, endpoint: str, url: str) -> tuple[requests.Response, float]:
        """Send the request and read the body; connection problems become transient errors."""
        started = time.monotonic()
        try:
            response = self.hook.run(endpoint, **self.request_kwargs())
            self._read_body(response, url)
        except (requests.ConnectionError, requests.Timeout) as error:
            elapsed = time.monotonic() - started
            kind = "timed out" if isinstance(error, requests.Timeout) else "could not connect"
            self.log.warning("%s %s -> %s after %.3fs", self.method, redact_url(url), kind, elapsed)
            raise TransientRequestError(
                f"{self.method} {redact_url(url)} {kind}: {type(error).__name__}",
                method=self.method,
                url=redact_url(url),
            ) from None
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

    def _reschedule(self, wait: RateLimitWait, *, reason: str) -> None:
        self.log.info(
            "%s; waiting %.3fs (%s), rescheduled for %s without spending a try",
            reason,
            wait.seconds,
            wait.source.value,
            wait.not_before.isoformat(),
        )
        raise AirflowRescheduleException(wait.not_before)

    def _rate_limit_time_spent(
        self, ti: Any, context: Context, now: datetime, initial_delay: timedelta | None
    ) -> timedelta:
        """Time this try has spent since its first reschedule, less the initial delay."""
        first = ti.get_first_reschedule_date(context)
        if first is None:
            return timedelta(0)
        spent = now - first - (initial_delay or timedelta(0))
        return max(spent, timedelta(0))

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
