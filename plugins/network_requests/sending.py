"""Sending one request from a worker (``requests`` through the Connection's ``HttpHook``), with its caps.

The caps, the same in the triggerer's async sender (:mod:`network_requests.sending_async`):

- ``request_deadline`` bounds the whole request, headers to last byte (a read timeout is
  per socket read, so a body trickling in a byte a minute never trips it);
- ``max_response_bytes`` stops reading a larger body (a larger ``Content-Length`` is not read);
- a redirect to another origin than the Connection's is never followed: ``requests`` drops
  ``Authorization`` on a redirect to another host, but not the API keys a Connection's
  extra headers add.

Connection problems become :class:`TransientRequestError` (retried), a request that can
never be sent :class:`PermanentRequestError`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urljoin

import requests

from network_requests.endpoints import redact_url, same_origin
from network_requests.exceptions import PermanentRequestError, ResponseTooLargeError, TransientRequestError

READ_CHUNK_BYTES = 64 * 1024
#: Statuses ``requests`` (and the async sender) follow as redirects.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def redirect_target(*, method: str, status_code: int, from_url: str, location: str, base_url: str) -> str:
    """Where a redirect goes; :class:`PermanentRequestError` when that leaves the Connection's origin."""
    target = urljoin(from_url, location)
    if not same_origin(target, base_url):
        raise PermanentRequestError(
            f"{method} {redact_url(from_url)} redirected ({status_code}) to {redact_url(target)}, another "
            "host than the Connection's; not followed, so the Connection's credentials and headers stay "
            "with their host",
            method=method,
            url=redact_url(from_url),
            status_code=status_code,
        )
    return target


def url_on_origin(url: str, base_url: str, *, endpoint: str, method: str) -> str:
    """``url`` when it stays on the Connection's origin; :class:`PermanentRequestError` otherwise."""
    if not same_origin(url, base_url):
        raise PermanentRequestError(f"endpoint {endpoint!r} resolves to {redact_url(url)}, outside the Connection's "
                                    f"{redact_url(base_url)}", method=method, url=redact_url(url))
    return url


def refuse_redirect_off_origin(response: requests.Response, *, method: str, base_url: str) -> None:
    """A ``requests`` response hook's check: a redirect that leaves the origin is closed and refused."""
    if not response.is_redirect:
        return
    try:
        redirect_target(method=method, status_code=response.status_code, from_url=response.url,
                        location=response.headers.get("Location", ""), base_url=base_url)
    except PermanentRequestError:
        response.close()
        raise


def refuse_oversized(headers: Mapping[str, str], *, method: str, url: str, status_code: int, limit: int | None) -> None:
    """Refuse to read a body whose declared ``Content-Length`` is over ``limit``."""
    declared = headers.get("Content-Length", "")
    if limit is not None and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLargeError(
            f"{method} {redact_url(url)} declared {int(declared)} bytes, more than max_response_bytes={limit}; not read",
            method=method,
            url=redact_url(url),
            status_code=status_code,
        )


def too_large(*, method: str, url: str, status_code: int, limit: int) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"{method} {redact_url(url)} sent more than max_response_bytes={limit}; stopped reading",
        method=method,
        url=redact_url(url),
        status_code=status_code,
    )


def read_body(response: requests.Response, *, method: str, url: str, limit: int | None) -> None:
    """Read a streamed body into ``response.content``, stopping at ``limit`` bytes."""
    try:
        refuse_oversized(response.headers, method=method, url=url, status_code=response.status_code, limit=limit)
    except ResponseTooLargeError:
        response.close()
        raise
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(READ_CHUNK_BYTES):
        size += len(chunk)
        if limit is not None and size > limit:
            response.close()
            raise too_large(method=method, url=url, status_code=response.status_code, limit=limit)
        chunks.append(chunk)
    response._content = b"".join(chunks)  # what .content/.text/.json() read from
    response._content_consumed = True


def connection_problem(
    error: BaseException, *, method: str, url: str, deadline: timedelta | None, past_deadline: bool,
    kind: str | None = None,
) -> TransientRequestError:
    """A request that got no (whole) answer: worth another try."""
    if past_deadline:
        kind = f"took longer than request_deadline={deadline}"
    elif kind is None:
        timed_out = isinstance(error, (requests.Timeout, TimeoutError))
        refused = isinstance(error, (requests.ConnectionError, ConnectionError))
        kind = "timed out" if timed_out else "could not connect" if refused else "broke off"
    return TransientRequestError(f"{method} {redact_url(url)} {kind}: {type(error).__name__}", method=method,
                                 url=redact_url(url))


def send(
    run: Callable[[], requests.Response],
    read: Callable[[requests.Response], None],
    *,
    method: str,
    url: str,
    deadline: timedelta | None,
) -> tuple[requests.Response, float]:
    """Send (``run``, e.g. ``hook.run(...)`` with ``stream=True``) and read the body (``read``)
    within ``deadline``; return the response and the seconds it took."""
    started = time.monotonic()
    watchdog: threading.Timer | None = None
    cut = threading.Event()
    try:
        response = run()
        if deadline is not None:
            left = deadline.total_seconds() - (time.monotonic() - started)
            watchdog = threading.Timer(max(left, 0.0), cut_connection, (response, cut))
            watchdog.daemon = True
            watchdog.start()
        read(response)
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader) as error:
        raise PermanentRequestError(f"{method} {redact_url(url)} cannot be sent: {type(error).__name__}",
                                    method=method, url=redact_url(url)) from None
    except (requests.RequestException, OSError) as error:
        raise connection_problem(error, method=method, url=url, deadline=deadline, past_deadline=cut.is_set()) from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if cut.is_set():
        # The deadline fired just as the body completed: don't trust what was read.
        raise connection_problem(TimeoutError(), method=method, url=url, deadline=deadline, past_deadline=True)
    return response, time.monotonic() - started


def cut_connection(response: requests.Response, cut: threading.Event) -> None:
    """Shut the socket under a response being read, so the blocked read returns at once."""
    cut.set()
    raw = response.raw
    connection = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
    candidates = [getattr(connection, "sock", None)]
    # A `Connection: close` response has been detached from urllib3's connection; its socket
    # is the one http.client reads through: HTTPResponse.fp -> BufferedReader -> SocketIO.
    file = getattr(getattr(raw, "_fp", None), "fp", None)
    candidates.append(getattr(getattr(file, "raw", None), "_sock", None))
    for sock in candidates:
        if sock is None:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        response.close()
    except OSError:
        pass


def request_kwargs_for_hook(
    *, data: Any, headers: Mapping[str, str], extra_options: Mapping[str, Any], timeout: Any
) -> dict[str, Any]:
    """``HttpHook.run`` keyword arguments: the status is ours to judge, the body streamed for the byte cap."""
    options = {**extra_options, "check_response": False, "stream": True}
    if timeout is not None:
        options.setdefault("timeout", timeout)
    return {"data": data, "headers": dict(headers), "extra_options": options}
