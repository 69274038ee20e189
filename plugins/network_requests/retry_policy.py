"""``RetryAfterPolicy``: the server's ``Retry-After`` for ANY task's retries (AIP-105 retry policies).

Airflow 3.3 lets every operator take a ``retry_policy`` that looks at the exception a try
failed with and decides the retry (``airflow.sdk.RetryPolicy``; it runs in the task process,
see ``airflow/sdk/definitions/retry_policy.py``). This one finds the HTTP response behind
the exception and, when the server said it is rate limiting, retries after exactly the wait
the server asked for, read by the same reader as ``NetworkRequestOperator``
(:mod:`network_requests.rate_limit_headers`): ``Retry-After`` (seconds or an HTTP-date, measured
against the response's ``Date``), else a reset header when the quota is spent.

Where the response comes from:

- ``requests.HTTPError`` (``response.raise_for_status()`` in a ``@task``): ``error.response``;
- the stock ``HttpOperator``/``HttpHook`` (apache-airflow-providers-http 6.3): ``check_response``
  raises a bare ``AirflowException("429:Too Many Requests")`` *inside* its
  ``except HTTPError`` block, so the ``HTTPError``, and its response, is the exception's
  ``__context__``; the policy follows ``__cause__``/``__context__`` to find it.
  Not reachable: ``HttpOperator(deferrable=True)`` (the trigger sends only a message) and
  ``response_check`` failures (the exception carries no response).

Anything else (no response, a status that is not a rate limit, a rate limit without a
usable header) gets Airflow's default behaviour: ``retry_delay``, backoff, ``retries``.

Unlike ``NetworkRequestOperator``, which *defers* (``deferred``, same try),
a retry policy can only act on a failed try: every rate limit **spends one of the task's
``retries``**, and when they are used up the task fails. Give the task enough ``retries``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import RetryPolicy
from airflow.sdk.definitions.retry_policy import RetryAction, RetryDecision

from network_requests.rate_limit import Outcome, classify
from network_requests.rate_limit_headers import read_rate_limit_headers

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT = timedelta(hours=1)
#: How far down ``__cause__``/``__context__`` to look for a response.
MAX_CHAIN_DEPTH = 10


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _looks_like_response(value: Any) -> bool:
    return isinstance(getattr(value, "status_code", None), int) and isinstance(
        getattr(value, "headers", None), Mapping
    )


def _chain(exception: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exception]
    while todo and len(seen) < MAX_CHAIN_DEPTH:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(link for link in (current.__cause__, current.__context__) if link is not None)


def response_of(exception: BaseException) -> Any | None:
    """The HTTP response behind ``exception`` (``.response`` on it or on its cause/context), if any."""
    for error in _chain(exception):
        response = getattr(error, "response", None)
        if _looks_like_response(response):
            return response
    return None


class RetryAfterPolicy(RetryPolicy):
    """
    Retry a rate-limited request after exactly the wait the server asked for.

    :param max_wait: a longer wait fails the task at once (``on_too_long``), as the operator's
        ``max_rate_limit_wait`` does: retrying sooner would send before the server allows.
    :param on_too_long: what to do then: ``RetryAction.FAIL`` (default) or ``RetryAction.DEFAULT``.
    :param min_wait: never retry sooner than this (a ``Retry-After: 0`` still waits this long).
    """

    #: The clock for HTTP-date values without a ``Date`` header; a test may replace it.
    clock: Callable[[], datetime] = staticmethod(_utcnow)

    def __init__(
        self,
        *,
        max_wait: timedelta = DEFAULT_MAX_WAIT,
        on_too_long: RetryAction = RetryAction.FAIL,
        min_wait: timedelta = timedelta(0),
    ) -> None:
        if on_too_long not in (RetryAction.FAIL, RetryAction.DEFAULT):
            raise ValueError("on_too_long must be RetryAction.FAIL or RetryAction.DEFAULT")
        self.max_wait = max_wait
        self.on_too_long = on_too_long
        self.min_wait = min_wait

    def server_wait(self, response: Any) -> tuple[float, str] | None:
        """Seconds the server asked to wait, and the header that said so; ``None`` when it asked none."""
        headers = response.headers
        if classify(response.status_code, headers) is not Outcome.RATE_LIMITED:
            return None
        info = read_rate_limit_headers(response.status_code, headers, now=self.clock())
        for reason in info.rejected:
            log.warning("RetryAfterPolicy: ignoring a header: %s", reason)
        seconds = info.wait_seconds()
        if seconds is None:
            return None
        return seconds, info.source or "Retry-After"

    def evaluate(
        self,
        exception: BaseException,
        try_number: int,
        max_tries: int,
        context: Context | None = None,
    ) -> RetryDecision:
        response = response_of(exception)
        if response is None:
            return RetryDecision.default()
        found = self.server_wait(response)
        if found is None:
            return RetryDecision.default()
        seconds, source = found
        wait = max(timedelta(seconds=seconds), self.min_wait)
        if wait > self.max_wait:
            reason = (
                f"HTTP {response.status_code}: the server asked to wait {wait.total_seconds():g}s "
                f"({source}), longer than max_wait={self.max_wait.total_seconds():g}s"
            )
            if self.on_too_long is RetryAction.FAIL:
                return RetryDecision.fail(reason=reason)
            return RetryDecision(action=RetryAction.DEFAULT, reason=reason)
        return RetryDecision.retry(
            delay=wait,
            reason=f"HTTP {response.status_code}: retrying after {wait.total_seconds():g}s as the server asked "
            f"({source}); this spends a try",
        )

    def serialize(self) -> dict[str, Any]:
        return {
            "__type": "RetryAfterPolicy",
            "max_wait": self.max_wait.total_seconds(),
            "on_too_long": self.on_too_long.value,
            "min_wait": self.min_wait.total_seconds(),
        }

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> RetryAfterPolicy:
        return cls(
            max_wait=timedelta(seconds=float(data.get("max_wait", DEFAULT_MAX_WAIT.total_seconds()))),
            on_too_long=RetryAction(data.get("on_too_long", RetryAction.FAIL.value)),
            min_wait=timedelta(seconds=float(data.get("min_wait", 0.0))),
        )
