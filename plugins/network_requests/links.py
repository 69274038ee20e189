"""The "API endpoint" extra link: the URL a ``NetworkRequestOperator`` task requests, without credentials.

How Airflow 3.3 shows extra links: the task process computes every link of the operator
class (``operator_extra_links``) once the task has run (``task_runner.finalize``) and stores
it as an XCom under ``link.xcom_key``; the API server never sees the operator object, only
its serialized form, and reads that XCom back. So:

- in the task process, :meth:`ApiEndpointLink.get_link` gets the real, rendered operator:
  it builds the URL from the Connection's base URL and the rendered endpoint and shows it
  through ``redact_url`` (no user info, the values of sensitive query parameters masked);
- on the API server (the plugin registers the link, and plugin links take precedence
  there), it reads the XCom the task stored, exactly as Airflow's own ``XComOperatorLink``.

The link appears once a try has finished (success, failure, retry), on every map index.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from network_requests.endpoints import UnsafeEndpointError, redact_url, same_origin, validate_endpoint

log = logging.getLogger(__name__)


def public_url(url: str) -> str:
    """``url`` as the link shows it: :func:`~network_requests.endpoints.redact_url` (no user info, secrets masked)."""
    return redact_url(url)


def endpoint_url(operator: Any) -> str:
    """The URL a rendered ``NetworkRequestOperator`` requests, safe to show; ``""`` if there is none."""
    endpoint = getattr(operator, "endpoint", None)
    if not isinstance(endpoint, str):
        return ""
    try:
        endpoint = validate_endpoint(endpoint)
    except UnsafeEndpointError:
        return ""  # the task refused it too: there is no request to link to
    try:
        hook = operator.hook
        url = hook.url_from_endpoint(endpoint)
        base_url = hook.base_url
    except Exception:  # no such Connection, a bad base URL: the task log already says why
        log.debug("No API endpoint link for %s", getattr(operator, "task_id", operator), exc_info=True)
        return ""
    if not same_origin(url, base_url):
        return ""
    return public_url(url)


class ApiEndpointLink(BaseOperatorLink):
    """Button "API endpoint" on a ``NetworkRequestOperator`` task: the request URL, no credentials."""

    name = "API endpoint"
    # ``operators`` (which task types the API server attaches this link to) is filled in by
    # the plugin, which may import the operator: this module must not (no import cycle).

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if isinstance(operator, BaseOperator):
            # The task process: the operator is real (the class that lists this link) and
            # its fields are rendered. The API server only has a serialized operator.
            return endpoint_url(operator)
        # The API server: only the serialized operator; the task stored the link as an XCom.
        return self._stored_link(operator, ti_key)

    def _stored_link(self, operator: Any, ti_key: Any) -> str:
        try:
            from airflow.serialization.definitions.operatorlink import XComOperatorLink
        except ImportError:  # not on an API server
            return ""
        return XComOperatorLink(name=self.name, xcom_key=self.xcom_key).get_link(operator, ti_key=ti_key)
