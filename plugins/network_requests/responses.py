"""What a final answer becomes: the XCom of a success, or the typed error of a failure.

Used by the operator's ``result_of`` and by the trigger, on the same ``requests.Response``
(the trigger builds one from its async answer), so a result is the same wherever the
request was sent.
"""

from __future__ import annotations

import json
from typing import Any

import requests

from network_requests.endpoints import redact_url
from network_requests.exceptions import NetworkRequestError, PermanentRequestError, TransientRequestError
from network_requests.output import write_atomically
from network_requests.rate_limit import Outcome
from network_requests.safe_paths import UnsafeOutputPathError, checked_output_path

#: How much of an error body goes into a failure message.
ERROR_BODY_PREVIEW_CHARS = 300


def is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def body_preview(response: requests.Response) -> str:
    """The start of the body on one line, for a failure message."""
    text = response.content[: ERROR_BODY_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    if len(text) > ERROR_BODY_PREVIEW_CHARS:
        text = text[:ERROR_BODY_PREVIEW_CHARS] + "..."
    return text or "(empty body)"


def decoded_body(response: requests.Response, url: str, method: str) -> Any:
    """JSON when the response says it is JSON (``None`` for an empty body), else the text."""
    content_type = response.headers.get("Content-Type", "")
    if not is_json(content_type):
        return response.text
    if not response.content.strip():
        return None
    try:
        return json.loads(response.content)
    except ValueError as error:
        raise PermanentRequestError(
            f"{method} {redact_url(url)} declared {content_type!r} but the body is not valid "
            f"JSON ({error}): {body_preview(response)}",
            method=method,
            url=redact_url(url),
            status_code=response.status_code,
        ) from None


def written_body(response: requests.Response, path: str) -> dict[str, Any]:
    """Write the body to ``path`` in one visible step; the XCom says where and what."""
    written = write_atomically(path, response.content)
    return {
        "path": written,
        "status_code": response.status_code,
        "bytes": len(response.content),
        "content_type": response.headers.get("Content-Type", ""),
    }


def refuse_outside_root(output_path: str, output_root: str, *, method: str, endpoint: str) -> None:
    """Fail (permanently, before any request) when ``output_path`` would land outside ``output_root``."""
    try:
        checked_output_path(output_path, output_root)
    except UnsafeOutputPathError as error:
        raise PermanentRequestError(str(error), method=method, url=endpoint[:200]) from None


def error_for(outcome: Outcome, response: requests.Response, method: str, url: str) -> NetworkRequestError:
    """The error a transient or permanent answer stands for (``url`` already safe to show)."""
    if outcome is Outcome.TRANSIENT:
        return TransientRequestError(
            f"{method} {url} answered {response.status_code} {response.reason}: {body_preview(response)}",
            method=method,
            url=url,
            status_code=response.status_code,
        )
    return PermanentRequestError(
        f"{method} {url} answered {response.status_code} {response.reason} "
        f"(not retried: the same request would fail again): {body_preview(response)}",
        method=method,
        url=url,
        status_code=response.status_code,
    )
