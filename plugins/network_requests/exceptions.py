"""Typed failures that carry what happened, so callers never match on message strings.

Each one is an Airflow exception with the retry meaning the operator documents:
``AirflowFailException`` subclasses fail the task at once, the others spend a try
and go through the task's ``retries``.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class NetworkRequestError(AirflowException):
    """Base class: a request that did not give a usable response."""

    def __init__(self, message: str, *, method: str, url: str, status_code: int | None = None):
        super().__init__(message)
        self.method = method
        self.url = url
        self.status_code = status_code


class TransientRequestError(NetworkRequestError):
    """5xx, 408, connection refused, timeout: worth a retry (spends one)."""


class PermanentRequestError(NetworkRequestError, AirflowFailException):
    """4xx other than rate limits, or a response that can never become valid: fail at once."""


class ResponseTooLargeError(PermanentRequestError):
    """The body exceeded ``max_response_bytes``; reading stopped there."""


class ResponseCheckFailed(NetworkRequestError):
    """``response_check`` returned False: the try fails, like HttpOperator."""


class RateLimitExceededError(NetworkRequestError, AirflowFailException):
    """The server asked for a wait beyond ``max_rate_limit_wait`` or ``rate_limit_timeout``.

    Fails without a retry: a retry after ``retry_delay`` would send a request before the
    time the server allowed.
    """

    def __init__(self, message: str, *, method: str, url: str, status_code: int | None, wait_seconds: float):
        super().__init__(message, method=method, url=url, status_code=status_code)
        self.wait_seconds = wait_seconds
