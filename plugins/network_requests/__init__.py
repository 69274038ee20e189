"""Scheduled network requests that respect rate limits, for Apache Airflow 3.

Airflow puts ``plugins/`` on ``sys.path``, so this package imports as ``network_requests``::

    from network_requests import NetworkRequestOperator, RetryAfterPolicy, network_request_task

Every public name is importable from here (``__all__``). Each is loaded on first use, so
``import network_requests`` costs nothing and a DAG file pays only for what it uses (a DAG
with one operator does not import the sensor, the batch mode or the retry policy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "NetworkRequestOperator": "network_requests.operators",
    "GitHubApiOperator": "network_requests.github",
    "network_request_task": "network_requests.taskflow",
    "NetworkRequestSensor": "network_requests.sensors",
    "BatchRequestOperator": "network_requests.batch",
    "RetryAfterPolicy": "network_requests.retry_policy",
    # What a failed task raises.
    "NetworkRequestError": "network_requests.exceptions",
    "TransientRequestError": "network_requests.exceptions",
    "PermanentRequestError": "network_requests.exceptions",
    "ResponseTooLargeError": "network_requests.exceptions",
    "ResponseCheckFailed": "network_requests.exceptions",
    "RateLimitExceededError": "network_requests.exceptions",
    "BatchFailedError": "network_requests.batch",
    "BatchFailedPermanentlyError": "network_requests.batch",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
    from network_requests.batch import BatchFailedError, BatchFailedPermanentlyError, BatchRequestOperator
    from network_requests.exceptions import (NetworkRequestError, PermanentRequestError, RateLimitExceededError,
                                             ResponseCheckFailed, ResponseTooLargeError, TransientRequestError)
    from network_requests.github import GitHubApiOperator
    from network_requests.operators import NetworkRequestOperator
    from network_requests.retry_policy import RetryAfterPolicy
    from network_requests.sensors import NetworkRequestSensor
    from network_requests.taskflow import network_request_task


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
