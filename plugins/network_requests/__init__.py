"""Scheduled network requests that respect rate limits, for Apache Airflow 3.

Airflow puts ``plugins/`` on ``sys.path``, so this package imports as ``network_requests``.
"""

from network_requests.exceptions import (
    NetworkRequestError,
    PermanentRequestError,
    RateLimitExceededError,
    ResponseCheckFailed,
    ResponseTooLargeError,
    TransientRequestError,
)
from network_requests.operators import NetworkRequestOperator

__all__ = [
    "NetworkRequestError",
    "NetworkRequestOperator",
    "PermanentRequestError",
    "RateLimitExceededError",
    "ResponseCheckFailed",
    "ResponseTooLargeError",
    "TransientRequestError",
]
