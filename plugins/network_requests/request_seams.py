"""The extension points ``NetworkRequestOperator`` and ``NetworkRequestSensor`` share.

One request through the Connection's ``HttpHook``: which endpoint may be requested, which
redirects may be followed, how it is sent and its body read within the caps, and what an
answer means. Each is a method a subclass may replace (docs/extending.md); a replaced one
makes the task send from a worker, since the triggerer runs only these defaults (found by
:func:`network_requests.where_to_send.replaced_methods`, which walks this class too).

A class using it defines ``_standard()`` (its :class:`~network_requests.attempts.StandardBehaviour`)
and ``request_kwargs()`` (its headers differ: the operator adds an Idempotency-Key).
"""

from __future__ import annotations

from datetime import datetime
from functools import cached_property
from typing import Any

import requests

from network_requests import sending
from network_requests.endpoints import UnsafeEndpointError, validate_endpoint
from network_requests.exceptions import PermanentRequestError
from network_requests.gate_access import default_gate_store
from network_requests.gate_store import GateStore
from network_requests.hooks import NetworkRequestHook
from network_requests.rate_limit import Outcome, RateLimitWait
from network_requests.where_to_send import DEFAULT_PREFIX


class RequestSeams:
    """Mixed into an Airflow operator that has ``method``, ``http_conn_id``, ``endpoint``,
    ``request_deadline`` and ``max_response_bytes``."""

    @cached_property
    def gate_store(self) -> GateStore:
        """Where the shared gate lives (``[network_requests] gate_store``)."""
        return self._remember_default("gate_store", default_gate_store())

    @cached_property
    def hook(self) -> NetworkRequestHook:
        """Built on first use inside ``execute``: parsing a DAG never reads a Connection."""
        return self._remember_default("hook", NetworkRequestHook(method=self.method, http_conn_id=self.http_conn_id))

    def _remember_default(self, name: str, value: Any) -> Any:
        self.__dict__[DEFAULT_PREFIX + name] = value  # so it is not taken for a replacement
        return value

    def _target(self) -> tuple[str, str]:
        """The checked endpoint and its URL, which must stay on the Connection's origin."""
        endpoint = self.checked_endpoint(self.endpoint)
        return endpoint, sending.url_on_origin(self.hook.url_from_endpoint(endpoint), self.hook.base_url,
                                               endpoint=endpoint, method=self.method)

    def checked_endpoint(self, endpoint: str) -> str:
        """The endpoint to request; refuse one that could leave the Connection's host."""
        try:
            return validate_endpoint(endpoint)
        except UnsafeEndpointError as error:
            raise PermanentRequestError(str(error), method=self.method, url=str(endpoint)[:200]) from None

    def refuse_redirect_to_another_origin(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """A ``requests`` response hook: never follow a redirect off the Connection's origin."""
        sending.refuse_redirect_off_origin(response, method=self.method, base_url=self.hook.base_url)

    def send_request(self, endpoint: str, url: str) -> tuple[requests.Response, float]:
        """Send the request and read the body within the caps; return it and the seconds it took."""
        return sending.send(lambda: self.hook.run(endpoint, **self.request_kwargs()),
                            lambda response: self.read_body(response, url),
                            method=self.method, url=url, deadline=self.request_deadline)

    def read_body(self, response: requests.Response, url: str) -> None:
        """Read the streamed body into ``response.content``, stopping at ``max_response_bytes``."""
        sending.read_body(response, method=self.method, url=url, limit=self.max_response_bytes)

    def classify_response(self, response: requests.Response) -> Outcome:
        """What the response means; override for APIs that signal rate limits differently."""
        return self._standard().classify_response(response)

    def rate_limit_wait(self, response: requests.Response, *, now: datetime, consecutive_waits: int) -> RateLimitWait:
        """How long to wait after a rate-limited response; override for provider-specific headers."""
        return self._standard().rate_limit_wait(response, now=now, consecutive_waits=consecutive_waits)

    def request_kwargs(self) -> dict[str, Any]:  # pragma: no cover - each class has its own
        raise NotImplementedError

    def _standard(self) -> Any:  # pragma: no cover - each class has its own
        raise NotImplementedError
