"""``GitHubApiOperator``: the GitHub REST API on top of ``NetworkRequestOperator``.

An example of the operator's extension points, each override small:

- :meth:`~GitHubApiOperator.request_kwargs`: GitHub's ``Accept`` and API-version headers,
  and ``per_page`` for GET requests;
- :meth:`~GitHubApiOperator.classify_response`: a *secondary* rate limit (403 or 429 whose
  message says so, with or without ``Retry-After``) is a rate limit, not a permission error;
- :meth:`~GitHubApiOperator.rate_limit_wait`: ``Retry-After`` first, then the *primary*
  limit (``x-ratelimit-remaining: 0`` + ``x-ratelimit-reset`` epoch, read by the base class);
  a secondary limit without ``Retry-After`` waits at least a minute, doubling, as GitHub asks;
- :meth:`~GitHubApiOperator.result_of`: logs the quota left after each page;
- ``pagination_function``: :func:`follow_link_next` follows ``Link: <...>; rel="next"`` up to
  ``max_pages`` pages (the operator's pagination refuses a link off the Connection's host
  and base path), and the pages are combined.

Every page is a request of its own through the operator's driver
(:mod:`network_requests.page_reader`), so each one asks the shared gate first (a page sent
with ``x-ratelimit-remaining: 0`` on the previous one waits for the reset without sending)
and handles its own rate limit. The pages read are kept until the task succeeds, so a wait
that defers or reschedules the task, or a retry, goes on from the next page.

Connection: an HTTP Connection with host ``api.github.com``, schema ``https`` and a token as
extra header, e.g. ``AIRFLOW_CONN_GITHUB_API='{"conn_type": "http", "host": "api.github.com",
"schema": "https", "extra": {"Authorization": "Bearer <token>"}}'``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from network_requests.attempts import rate_limit_info
from network_requests.operators import NetworkRequestOperator
from network_requests.rate_limit import Outcome, RateLimitWait, WaitSource

DEFAULT_GITHUB_CONN_ID = "github_api"
GITHUB_API_VERSION = "2022-11-28"
#: GitHub: after a secondary rate limit without ``Retry-After``, wait at least a minute.
SECONDARY_LIMIT_MIN_WAIT = timedelta(minutes=1)
SECONDARY_LIMIT_MAX_WAIT = timedelta(minutes=15)


def next_page_url(response: requests.Response) -> str | None:
    """The ``rel="next"`` URL of a ``Link`` header, if any."""
    return (response.links.get("next") or {}).get("url") or None


def follow_link_next(response: requests.Response) -> dict[str, Any] | None:
    """GitHub's ``pagination_function``: the ``rel="next"`` URL, whose query is the whole query
    (so the first page's ``data`` is dropped); ``None`` on the last page."""
    url = next_page_url(response)
    return {"endpoint": url, "data": None} if url else None


def mentions_rate_limit(response: requests.Response) -> bool:
    """Does the body say "rate limit" (GitHub's ``{"message": "You have exceeded a secondary rate limit..."}``)?"""
    text = response.content[:2000].decode("utf-8", errors="replace").lower()
    return "rate limit" in text


class GitHubApiOperator(NetworkRequestOperator):
    """
    Call the GitHub REST API; rate limits (primary and secondary) are waited out, pages followed.

    :param max_pages: follow ``rel="next"`` links until this many pages were read (1: no paging).
    :param pagination_function: how to find the next page (default :func:`follow_link_next`).
    :param per_page: GitHub's ``per_page`` query parameter for GET requests (up to 100).
    :param api_version: sent as ``X-GitHub-Api-Version``.

    The XCom is the JSON of the page when there is one page; with several pages, the items of
    all pages in one list when the pages are lists, else the list of pages. With
    ``output_path`` that combined JSON is written to the file instead (and the XCom says where).
    """

    template_fields = (*NetworkRequestOperator.template_fields, "per_page")

    def __init__(
        self,
        *,
        http_conn_id: str = DEFAULT_GITHUB_CONN_ID,
        max_pages: int = 10,
        per_page: int | None = None,
        api_version: str = GITHUB_API_VERSION,
        pagination_function: Callable[[requests.Response], dict[str, Any] | None] | None = follow_link_next,
        **kwargs: Any,
    ) -> None:
        super().__init__(http_conn_id=http_conn_id, max_pages=max_pages, pagination_function=pagination_function,
                         **kwargs)
        self.per_page = per_page
        self.api_version = api_version

    # -- extension points -----------------------------------------------------------------

    def request_kwargs(self) -> dict[str, Any]:
        kwargs = super().request_kwargs()
        kwargs["headers"] = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": self.api_version,
            **(kwargs.get("headers") or {}),
        }
        # A next page's URL already says per_page (GitHub copies the query into its links).
        if self.per_page and self.method == "GET" and "per_page" not in parse_qs(urlsplit(str(self.endpoint)).query):
            data = kwargs.get("data")
            if data is None or isinstance(data, dict):
                kwargs["data"] = {"per_page": int(self.per_page), **(data or {})}
        return kwargs

    def classify_response(self, response: requests.Response) -> Outcome:
        outcome = super().classify_response(response)
        if outcome is Outcome.PERMANENT and response.status_code == 403 and mentions_rate_limit(response):
            return Outcome.RATE_LIMITED  # a secondary rate limit sent without any header
        return outcome

    def rate_limit_wait(self, response: requests.Response, *, now: datetime, consecutive_waits: int) -> RateLimitWait:
        wait = super().rate_limit_wait(response, now=now, consecutive_waits=consecutive_waits)
        if wait.source is not WaitSource.BACKOFF:
            return wait  # Retry-After, or the primary limit's x-ratelimit-reset
        # A secondary limit without Retry-After: at least a minute, doubling each time.
        floor = min(SECONDARY_LIMIT_MIN_WAIT * (2 ** max(consecutive_waits, 0)), SECONDARY_LIMIT_MAX_WAIT)
        if timedelta(seconds=wait.seconds) >= floor:
            return wait
        return RateLimitWait(floor.total_seconds(), WaitSource.BACKOFF, now + floor, wait.fallback_reason)

    def result_of(self, response: requests.Response, url: str) -> Any:
        self._log_quota(response)
        return super().result_of(response, url)

    def _log_quota(self, response: requests.Response) -> None:
        now = self.clock()
        info = rate_limit_info(response, now=now)  # the one header reader, read once per response
        if info.remaining is None:
            return
        resets = (now + timedelta(seconds=info.reset_after)).isoformat() if info.reset_after is not None else "?"
        self.log.info(
            "GitHub quota: %s of %s left (%s), resets at %s",
            info.remaining,
            "?" if info.limit is None else info.limit,
            response.headers.get("x-ratelimit-resource", "core"),  # a name, not a rate-limit value
            resets,
        )
