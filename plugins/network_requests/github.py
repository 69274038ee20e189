"""``GitHubApiOperator``: the GitHub REST API on top of ``NetworkRequestOperator``.

An example of the operator's extension points, each override small:

- :meth:`~GitHubApiOperator.request_kwargs`: GitHub's ``Accept`` and API-version headers,
  and ``per_page`` for GET requests;
- :meth:`~GitHubApiOperator.classify_response`: a *secondary* rate limit (403 or 429 whose
  message says so, with or without ``Retry-After``) is a rate limit, not a permission error;
- :meth:`~GitHubApiOperator.rate_limit_wait`: ``Retry-After`` first, then the *primary*
  limit (``x-ratelimit-remaining: 0`` + ``x-ratelimit-reset`` epoch, read by the base class);
  a secondary limit without ``Retry-After`` waits at least a minute, doubling, as GitHub asks;
- :meth:`~GitHubApiOperator.result_of`: follows ``Link: <...>; rel="next"`` (same host and
  base path only) up to ``max_pages`` pages and returns them combined.

Every page is a request of its own through the operator's loop, so each one asks the
shared gate first (a page sent with ``x-ratelimit-remaining: 0`` on the previous one waits
for the reset without sending) and handles its own rate limit. A wait in the middle of the
pages that is longer than ``in_process_wait_threshold`` (so not slept in the task)
defers (or reschedules) the task, and the task then starts again from the first page: it
comes back in a new process, and Airflow clears a task's XComs when it comes back from a
reschedule, so there is nowhere to keep the pages already read.

Connection: an HTTP Connection with host ``api.github.com``, schema ``https`` and a token as
extra header, e.g. ``AIRFLOW_CONN_GITHUB_API='{"conn_type": "http", "host": "api.github.com",
"schema": "https", "extra": {"Authorization": "Bearer <token>"}}'``.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import requests

from network_requests.endpoints import same_origin
from network_requests.attempts import rate_limit_info
from network_requests.engine import WaitBudget
from network_requests.operators import NetworkRequestOperator
from network_requests.output import write_atomically
from network_requests.rate_limit import Outcome, RateLimitWait, WaitSource

DEFAULT_GITHUB_CONN_ID = "github_api"
GITHUB_API_VERSION = "2022-11-28"
#: GitHub: after a secondary rate limit without ``Retry-After``, wait at least a minute.
SECONDARY_LIMIT_MIN_WAIT = timedelta(minutes=1)
SECONDARY_LIMIT_MAX_WAIT = timedelta(minutes=15)


def next_page_url(response: requests.Response) -> str | None:
    """The ``rel="next"`` URL of a ``Link`` header, if any."""
    return (response.links.get("next") or {}).get("url") or None


def mentions_rate_limit(response: requests.Response) -> bool:
    """Does the body say "rate limit" (GitHub's ``{"message": "You have exceeded a secondary rate limit..."}``)?"""
    text = response.content[:2000].decode("utf-8", errors="replace").lower()
    return "rate limit" in text


class GitHubApiOperator(NetworkRequestOperator):
    """
    Call the GitHub REST API; rate limits (primary and secondary) are waited out, pages followed.

    :param max_pages: follow ``rel="next"`` links until this many pages were read (1: no paging).
    :param per_page: GitHub's ``per_page`` query parameter for GET requests (up to 100).
    :param api_version: sent as ``X-GitHub-Api-Version``.

    The XCom is the JSON of the page when there is one page; with several pages, the items of
    all pages in one list when the pages are lists, else the list of pages. With
    ``output_path`` that combined JSON is written to the file instead.
    """

    template_fields = (*NetworkRequestOperator.template_fields, "per_page")

    def __init__(
        self,
        *,
        http_conn_id: str = DEFAULT_GITHUB_CONN_ID,
        max_pages: int = 10,
        per_page: int | None = None,
        api_version: str = GITHUB_API_VERSION,
        **kwargs: Any,
    ) -> None:
        super().__init__(http_conn_id=http_conn_id, **kwargs)
        if max_pages < 1:
            raise ValueError(f"max_pages must be at least 1, got {max_pages!r}")
        self.max_pages = max_pages
        self.per_page = per_page
        self.api_version = api_version
        self._pages: list[Any] = []
        self._depth = 0

    # -- extension points -----------------------------------------------------------------

    def request_kwargs(self) -> dict[str, Any]:
        kwargs = super().request_kwargs()
        kwargs["headers"] = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": self.api_version,
            **(kwargs.get("headers") or {}),
        }
        if self.method == "GET" and self._depth > 0:
            kwargs["data"] = None  # a next-page URL already carries the whole query
        elif self.per_page and self.method == "GET":
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
        if self._depth == 0:
            self._pages = []
        self._log_quota(response)
        self._pages.append(self._page_data(response, url))
        next_url = next_page_url(response)
        if next_url and len(self._pages) < self.max_pages:
            endpoint = self._endpoint_of(next_url)
            if endpoint is not None:
                self._read_next_page(endpoint)  # appends the following pages to self._pages
        elif next_url:
            self.log.info("Stopped after max_pages=%d pages; more are available", self.max_pages)
        return self._combined() if self._depth == 0 else None

    # -- pagination -----------------------------------------------------------------------

    def _page_data(self, response: requests.Response, url: str) -> Any:
        if self.output_path:  # the base class would write each page to the file
            output_path, self.output_path = self.output_path, None
            try:
                return super().result_of(response, url)
            finally:
                self.output_path = output_path
        return super().result_of(response, url)

    def _endpoint_of(self, next_url: str) -> str | None:
        """The next page as an endpoint of this Connection; ``None`` when it points elsewhere."""
        base = self.hook.base_url.rstrip("/")
        if not same_origin(next_url, base) or not next_url.startswith(base + "/"):
            self.log.warning("Not following a next-page link outside the Connection: %s", next_url.split("?")[0])
            return None
        return next_url[len(base) :]

    def _read_next_page(self, endpoint: str) -> Any:
        from airflow.sdk import get_current_context

        first_endpoint = self.endpoint
        self.endpoint = endpoint
        self._depth += 1
        try:
            # The operator's own driver: the gate first, then the request, its rate limits, its errors.
            return self._drive(get_current_context(), WaitBudget())
        finally:
            self._depth -= 1
            self.endpoint = first_endpoint

    def _combined(self) -> Any:
        pages = self._pages
        if len(pages) == 1:
            combined = pages[0]
        elif all(isinstance(page, list) for page in pages):
            combined = [item for page in pages for item in page]
        else:
            combined = pages
        if self.output_path:
            body = json.dumps(combined).encode()
            written = write_atomically(str(self.output_path), body)
            return {"path": written, "pages": len(pages), "bytes": len(body), "content_type": "application/json"}
        return combined

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
