"""Pagination's rules, no I/O: the next page's request, what a ``pagination_function`` may return, the combined result.

A ``NetworkRequestOperator`` with a ``pagination_function`` reads a listing page by page,
as provider-http's ``HttpOperator`` does (apache/airflow#34669): after each page,
``pagination_function(response)`` returns the next request's keyword arguments, or
``None`` (or ``{}``) when there is no next page. What it may return:

- ``endpoint``: a path on the Connection, or a full URL on the Connection's base URL (a
  ``Link: rel="next"`` URL), which becomes that path; any other host or base path is refused;
- ``data``, ``headers``, ``extra_options``: merged over the previous page's. Two mappings are
  merged key by key (recursively); anything else replaces, ``None`` included, so
  ``{"endpoint": next_url, "data": None}`` drops the first page's query parameters when the
  next URL carries its own (``HttpOperator`` keeps ``data`` on ``None``).

Unlike ``HttpOperator``, ``response_check`` and ``response_filter`` see one page at a time:
each page's value is kept on disk as soon as it is read (:mod:`network_requests.page_checkpoint`),
so a wait or a restart resumes at the first page not yet read (:mod:`network_requests.page_reader`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from network_requests.endpoints import UnsafeEndpointError, redact_url, same_origin, validate_endpoint

#: The keys a ``pagination_function`` may return (``HttpOperator``'s).
NEXT_PAGE_KEYS = frozenset({"endpoint", "data", "headers", "extra_options"})
#: Pages one task reads at most, unless ``max_pages`` says otherwise.
DEFAULT_MAX_PAGES = 100


class PaginationError(ValueError):
    """A ``pagination_function`` answer that cannot be followed (the message says why)."""


@dataclass(frozen=True)
class PageRequest:
    """One page's request: what a ``pagination_function`` may change."""

    endpoint: str
    data: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    extra_options: Mapping[str, Any] = field(default_factory=dict)

    def followed_by(self, next_page: Mapping[str, Any]) -> PageRequest:
        """The next page's request: ``next_page`` (a checked ``pagination_function`` answer) over this one."""
        data = self.data
        if "data" in next_page:
            given = next_page["data"]
            data = merged(self.data, given) if isinstance(self.data, Mapping) and isinstance(given, Mapping) else given
        return PageRequest(
            endpoint=next_page.get("endpoint") or self.endpoint,
            data=data,
            headers=merged(self.headers, next_page.get("headers") or {}),
            extra_options=merged(self.extra_options, next_page.get("extra_options") or {}),
        )

    def fingerprint(self, method: str) -> str:
        """Names the listing (method, endpoint, data; not the headers, which may hold a secret):
        pages kept for another listing are not taken for this one's."""
        text = json.dumps([method.upper(), self.endpoint, self.data], sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()


def merged(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """``second`` over ``first``; mappings in both are merged recursively (neither is changed)."""
    result = dict(first)
    for key, value in second.items():
        inner = result.get(key)
        result[key] = merged(inner, value) if isinstance(inner, Mapping) and isinstance(value, Mapping) else value
    return result


def request_of_page(first: PageRequest, answers: Sequence[Mapping[str, Any]]) -> PageRequest:
    """The request of the page after the pages whose ``pagination_function`` answers are ``answers``."""
    request = first
    for answer in answers:
        request = request.followed_by(answer)
    return request


def checked_next_page(answer: Any, *, base_url: str) -> dict[str, Any] | None:
    """A ``pagination_function`` answer made safe to follow and to keep; ``None``: no next page.

    A full-URL ``endpoint`` becomes a path of the Connection; raises :class:`PaginationError`
    for unknown keys, an endpoint off the Connection, or a value that is not JSON (the answer
    is kept on disk between pages).
    """
    if not answer:
        return None
    if not isinstance(answer, Mapping):
        raise PaginationError(f"pagination_function must return a dict or None, got {type(answer).__name__}")
    unknown = sorted(str(key) for key in answer if key not in NEXT_PAGE_KEYS)
    if unknown:
        raise PaginationError(f"pagination_function returned {unknown}; it may return {sorted(NEXT_PAGE_KEYS)}")
    for key in ("headers", "extra_options"):
        if answer.get(key) is not None and not isinstance(answer[key], Mapping):
            raise PaginationError(f"pagination_function's {key!r} must be a dict, got {type(answer[key]).__name__}")
    checked = dict(answer)
    if checked.get("endpoint") is not None:
        checked["endpoint"] = endpoint_on_connection(checked["endpoint"], base_url)
    try:
        json.dumps(checked)
    except (TypeError, ValueError) as error:
        raise PaginationError(f"pagination_function's answer must be JSON, to be kept between pages ({error})") from None
    return checked


def endpoint_on_connection(endpoint: Any, base_url: str) -> str:
    """``endpoint`` as a checked path of the Connection; a full URL only on its origin and under its base path."""
    if not isinstance(endpoint, str):
        raise PaginationError(f"pagination_function's endpoint must be a string, got {type(endpoint).__name__}")
    if "://" in endpoint or endpoint.startswith("//"):
        base = base_url.rstrip("/")
        if not same_origin(endpoint, base) or not endpoint.startswith(base + "/"):
            raise PaginationError(f"the next page {redact_url(endpoint)!r} is not on the Connection's base URL "
                                  f"{redact_url(base)!r}; not following it")
        endpoint = endpoint[len(base):]
    try:
        return validate_endpoint(endpoint)
    except UnsafeEndpointError as error:
        raise PaginationError(f"the next page: {error}") from None


def combine_pages(values: Sequence[Any]) -> Any:
    """The task's result from its pages' values: one page as it is; several pages that are all
    lists as one list of their items; else the list of the pages' values."""
    if len(values) == 1:
        return values[0]
    if all(isinstance(value, list) for value in values):
        return [item for value in values for item in value]
    return list(values)


def is_last_page(number: int, next_page: Mapping[str, Any] | None, max_pages: int) -> bool:
    """No page follows page ``number``: there is no next one, or ``max_pages`` were read."""
    return next_page is None or number >= max_pages


def page_idempotency_key(task_key: str, number: int) -> str:
    """The ``Idempotency-Key`` of page ``number``: the task's own for the first page, another
    for each further page (a server must not take page 2 for a repeat of page 1), the same
    on every send of that page."""
    if number <= 1:
        return task_key
    return str(uuid.uuid5(uuid.UUID(task_key), f"page {number}"))
