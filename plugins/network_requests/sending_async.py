"""Sending one request from the triggerer with aiohttp: the worker's request, the worker's caps.

The Connection is read again here, never carried in the trigger's arguments. :func:`prepare`
(blocking: run it in a thread) builds the request exactly as ``HttpHook.run`` does on a
worker (the Connection's base URL, login and extra headers, then the operator's headers and
data) as a ``requests.PreparedRequest``. :func:`send` sends those bytes with aiohttp, under
the same caps as :mod:`network_requests.sending` (``request_deadline`` over the whole
request, ``max_response_bytes``, timeouts, redirects followed only on the Connection's
origin, as ``requests`` follows them), and returns a ``requests.Response``: the answer is
then judged and shaped by the very code a worker runs.

What only a ``requests`` session can do (proxies, an auth that answers challenges, a
Connection with ``srv_lookup``) raises :class:`CannotSendHere`: the task sends from a worker.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import requests
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers, requote_uri, select_proxy

from network_requests.endpoints import redact_url, validate_endpoint
from network_requests.exceptions import PermanentRequestError
from network_requests.hooks import NetworkRequestHook
from network_requests.request_spec import RequestSpec
from network_requests.sending import (
    READ_CHUNK_BYTES,
    REDIRECT_STATUSES,
    connection_problem,
    redirect_target,
    refuse_oversized,
    request_kwargs_for_hook,
    too_large,
    url_on_origin,
)

#: ``requests``' default, used when the Connection sets none.
DEFAULT_MAX_REDIRECTS = 30
#: Headers aiohttp sets itself: the encodings it can decode, the body's length, the connection's fate.
_AIOHTTP_OWNS = frozenset({"accept-encoding", "content-length", "connection", "transfer-encoding"})


class CannotSendHere(Exception):
    """The request needs what only the worker's ``requests`` session does; a worker sends it."""


@dataclass(frozen=True)
class PreparedSend:
    """The request's bytes and the session settings that apply to them. Holds the Connection's
    credentials (in ``headers``): kept in memory only, never logged or serialised."""

    method: str
    #: Where the request goes (the query of a GET's data included).
    url: str
    #: The endpoint's URL as a worker names it in messages (``HttpHook.url_from_endpoint``).
    endpoint_url: str
    base_url: str
    headers: dict[str, str]
    body: bytes | None
    verify: bool | str
    cert: str | tuple[str, str] | None
    timeout: float | tuple[float, float] | None
    allow_redirects: bool
    max_redirects: int

    def __repr__(self) -> str:
        return f"<PreparedSend {self.method} {redact_url(self.endpoint_url)}>"


@dataclass(frozen=True)
class OpenedConnection:
    """A Connection read once and the ``requests`` session it configures, for requests that
    share the Connection and the request options (a batch's). Holds its credentials: kept in
    memory only, never logged or serialised."""

    hook: NetworkRequestHook
    session: requests.Session
    #: What the session was configured with: requests with other options need another.
    options_key: str

    def __repr__(self) -> str:
        return f"<OpenedConnection {self.hook.http_conn_id}>"


def _hook_options(spec: RequestSpec) -> dict[str, Any]:
    return request_kwargs_for_hook(data=spec.data, headers=spec.headers, extra_options=spec.extra_options,
                                   timeout=spec.timeout)["extra_options"]


def options_key(spec: RequestSpec) -> str:
    """What an :class:`OpenedConnection` for ``spec`` depends on besides the Connection."""
    return repr((spec.conn_id, sorted(_hook_options(spec).items(), key=str)))


def open_connection(spec: RequestSpec) -> OpenedConnection:
    """Read the Connection and configure a session from it (blocking: a Task SDK call).
    The request's own headers are left to :func:`prepare`, which puts them over the
    session's as ``get_conn(headers)`` would."""
    hook = NetworkRequestHook(method=spec.method, http_conn_id=spec.conn_id)
    session = hook.get_conn(None, _hook_options(spec))  # the one read of the Connection
    return OpenedConnection(hook, session, options_key(spec))


def prepare(spec: RequestSpec, opened: OpenedConnection | None = None) -> PreparedSend:
    """Build the request as a worker would (blocking): from ``opened`` when given (it must
    have been opened for requests with ``spec``'s options), else reading the Connection."""
    endpoint = validate_endpoint(spec.endpoint)  # again: the description came from the database
    if opened is None:
        opened = open_connection(spec)
    assert opened.options_key == options_key(spec), "opened for requests with other options"
    hook, session = opened.hook, opened.session
    # Set from the Connection's extra by get_conn, which resolves nothing yet (HttpHook.run does).
    if getattr(hook, "_srv_lookup_enabled", False):
        raise CannotSendHere("the Connection resolves its host through DNS SRV records")
    url = url_on_origin(hook.url_from_endpoint(endpoint), hook.base_url, endpoint=endpoint, method=spec.method)
    data = {"params": spec.data} if spec.method == "GET" else {} if spec.method == "HEAD" else {"data": spec.data}
    prepared = session.prepare_request(requests.Request(spec.method, url, headers=spec.headers, **data))
    if any(prepared.hooks.get("response") or ()):
        raise CannotSendHere("the Connection's auth answers challenges (a requests hook)")
    settings = session.merge_environment_settings(prepared.url, proxies=session.proxies, stream=True,
                                                  verify=session.verify, cert=session.cert)
    if select_proxy(prepared.url, settings["proxies"]):
        raise CannotSendHere("the request goes through a proxy")
    merged = hook.merged_extra
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
    return PreparedSend(
        method=prepared.method or spec.method, url=prepared.url or url, endpoint_url=url, base_url=hook.base_url,
        headers={name: value for name, value in prepared.headers.items() if name.lower() not in _AIOHTTP_OWNS},
        body=body, verify=settings["verify"], cert=settings["cert"], timeout=merged.get("timeout"),
        allow_redirects=bool(merged.get("allow_redirects", True)),
        max_redirects=int(merged.get("max_redirects", DEFAULT_MAX_REDIRECTS)),
    )


async def send(
    request: PreparedSend, *, deadline: timedelta | None, max_response_bytes: int | None
) -> tuple[requests.Response, float]:
    """Send ``request``, read the body within the caps; return it as a ``requests.Response`` and the seconds it took."""
    started = time.monotonic()
    method = request.method
    cutoff = asyncio.timeout(deadline.total_seconds() if deadline is not None else None)
    try:
        async with cutoff, aiohttp.ClientSession(timeout=_timeout(request.timeout), trust_env=False) as session:
            response = await _follow(session, request, max_response_bytes)
    except PermanentRequestError:
        raise
    except aiohttp.InvalidURL as error:
        raise PermanentRequestError(f"{method} {redact_url(request.endpoint_url)} cannot be sent: "
                                    f"{type(error).__name__}", method=method, url=redact_url(request.endpoint_url)) from None
    except (aiohttp.ClientError, OSError, TimeoutError, requests.TooManyRedirects) as error:
        kind = "could not connect" if isinstance(error, aiohttp.ClientConnectorError) else None
        raise connection_problem(error, method=method, url=request.endpoint_url, deadline=deadline,
                                 past_deadline=cutoff.expired(), kind=kind) from None
    return response, time.monotonic() - started


async def _follow(session: aiohttp.ClientSession, request: PreparedSend, limit: int | None) -> requests.Response:
    """Send, following redirects as ``requests`` does, never off the Connection's origin."""
    method, url, headers, body = request.method, request.url, dict(request.headers), request.body
    for _ in range(request.max_redirects + 1):
        # skip_auto_headers: requests sends no Content-Type for a text body; aiohttp would add one.
        tls = _ssl(request.verify, request.cert) if url.lower().startswith("https:") else None
        async with session.request(method, url, headers=headers, data=body, allow_redirects=False,
                                   skip_auto_headers=("Content-Type",), ssl=tls) as answer:
            location = answer.headers.get("Location")
            if answer.status in REDIRECT_STATUSES and location and request.allow_redirects:
                url = requote_uri(redirect_target(method=method, status_code=answer.status, from_url=url,
                                                  location=location, base_url=request.base_url))
                method, headers, body = _redirected(method, headers, body, answer.status)
                continue
            shown = request.endpoint_url if url == request.url else url  # as a worker names it
            refuse_oversized(answer.headers, method=method, url=shown, status_code=answer.status, limit=limit)
            chunks, size = [], 0
            async for chunk in answer.content.iter_chunked(READ_CHUNK_BYTES):
                size += len(chunk)
                if limit is not None and size > limit:
                    raise too_large(method=method, url=shown, status_code=answer.status, limit=limit)
                chunks.append(chunk)
            return _as_requests_response(answer, b"".join(chunks), url)
    raise requests.TooManyRedirects(f"Exceeded {request.max_redirects} redirects.")


def _redirected(method: str, headers: dict[str, str], body: bytes | None, status: int) -> tuple[str, dict[str, str], bytes | None]:
    """The next request after a redirect, by ``requests``' rules (``Session.rebuild_method``, issue 1084)."""
    if (status in (302, 303) and method != "HEAD") or (status == 301 and method == "POST"):
        method = "GET"
    headers = {k: v for k, v in headers.items() if k.lower() != "cookie"}
    if status not in (307, 308):
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        body = None
    return method, headers, body


def _as_requests_response(answer: aiohttp.ClientResponse, content: bytes, url: str) -> requests.Response:
    """The answer as the ``requests.Response`` a worker would have read (headers joined as urllib3 joins them)."""
    response = requests.Response()
    response.status_code = answer.status
    response.reason = answer.reason or ""
    joined: dict[str, str] = {}
    for name, value in answer.headers.items():
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    response.headers = CaseInsensitiveDict(joined)
    response.url = url
    response.encoding = get_encoding_from_headers(response.headers)
    response._content = content  # what .content/.text/.json() read from
    response._content_consumed = True
    return response


def _timeout(value: Any) -> aiohttp.ClientTimeout:
    """``requests``' timeout (seconds, or (connect, read)) as aiohttp's."""
    if value is None:
        return aiohttp.ClientTimeout(total=None)
    connect, read = (value[0], value[1]) if isinstance(value, (tuple, list)) else (value, value)
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


def _ssl(verify: bool | str, cert: str | tuple[str, str] | None) -> ssl.SSLContext | bool:
    """``requests``' ``verify`` and ``cert`` as aiohttp's ``ssl`` argument.

    One context per setting and per version of its files, reused: building one loads the CA
    bundle, about 27 ms of CPU in the triggerer's event loop, which a batch of thousands of
    requests would otherwise pay for each. A renewed certificate or bundle (a new mtime) gets
    a new context.
    """
    if verify is False and not cert:
        return False
    files = [verify] if isinstance(verify, str) else []
    files += list(cert) if isinstance(cert, (tuple, list)) else [cert] if cert else []
    return _cached_ssl(verify, tuple(cert) if isinstance(cert, list) else cert, tuple(_mtime(f) for f in files))


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None  # a missing file fails in the context's build, with its own message


@functools.lru_cache(maxsize=16)
def _cached_ssl(verify: bool | str, cert: str | tuple[str, str] | None, _versions: tuple[float | None, ...]) -> ssl.SSLContext:
    bundle = verify if isinstance(verify, str) else None
    context = ssl.create_default_context(cafile=None if bundle and os.path.isdir(bundle) else bundle,
                                         capath=bundle if bundle and os.path.isdir(bundle) else None)
    if verify is False:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if cert:
        certfile, keyfile = cert if isinstance(cert, (tuple, list)) else (cert, None)
        context.load_cert_chain(certfile, keyfile)
    return context
