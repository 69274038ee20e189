"""Typed failures that carry what happened, so callers never match on message strings.

Each one is an Airflow exception with the retry meaning the operator documents:
``AirflowFailException`` subclasses fail the task at once, the others spend a try
and go through the task's ``retries``.
"""

from __future__ import annotations

from typing import Any

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


def failure_payload(error: BaseException) -> dict[str, Any]:
    """``error`` as JSON, for the triggerer to hand it to the worker (see failure_from_payload)."""
    if isinstance(error, NetworkRequestError):
        return {
            "type": type(error).__name__,
            "message": str(error),
            "method": error.method,
            "url": error.url,
            "status_code": error.status_code,
            "wait_seconds": getattr(error, "wait_seconds", None),
        }
    # Any other AirflowFailException (a bad gate setting, say) keeps its meaning: fail at once.
    return {"type": None, "message": f"{type(error).__name__}: {error}",
            "permanent": isinstance(error, AirflowFailException)}


def failure_from_payload(payload: dict[str, Any]) -> AirflowException:
    """The exception a worker raises for a failure the triggerer met: same type, same retry meaning.

    Anything else than this module's errors comes back as an ``AirflowFailException`` when it
    was one (a bad gate setting fails at once, as on a worker), else as a plain
    ``AirflowException`` (a missing Connection, say): it spends a try, like any failure of a task.
    """
    message = str(payload.get("message") or "the triggerer could not send the request")
    error_class = _ERRORS_BY_NAME.get(str(payload.get("type")))
    if error_class is None:
        generic = AirflowFailException if payload.get("permanent") is True else AirflowException
        return generic(f"Sending the request from the triggerer failed: {message}")
    facts = {"method": str(payload.get("method") or ""), "url": str(payload.get("url") or ""),
             "status_code": payload.get("status_code")}
    if error_class is RateLimitExceededError:
        return RateLimitExceededError(message, wait_seconds=float(payload.get("wait_seconds") or 0.0), **facts)
    return error_class(message, **facts)


_ERRORS_BY_NAME: dict[str, type[NetworkRequestError]] = {
    cls.__name__: cls
    for cls in (NetworkRequestError, TransientRequestError, PermanentRequestError, ResponseTooLargeError,
                ResponseCheckFailed, RateLimitExceededError)
}
