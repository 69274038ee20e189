"""Which endpoints and URLs a task may request: pure checks, no I/O.

An endpoint comes from a DAG author or, through a trigger form, from anyone who may
trigger a DAG. It must stay a path on the Connection's host: never a full URL,
never another host, never a way out of the base path. Checking it here, before
any request, closes the door to SSRF through a trigger form.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

# Characters RFC 3986 allows in a path and query (unreserved, sub-delims, ':', '@'
# is excluded on purpose, '/', '?', '%' for escapes, '=' and '&' for queries).
_SAFE_ENDPOINT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:/?%]*", re.ASCII)

#: JSON-schema pattern for a trigger form's ``endpoint`` field, so a bad value is refused
#: when the run is triggered: a path starting with one ``/``, no CR/LF, no ``.``/``..``
#: segment, no percent-encoded dot, slash, backslash, ``@`` or ``%`` (double encoding), no ``://``. The operator checks again with
#: ``validate_endpoint`` before any request.
ENDPOINT_PARAM_PATTERN = (
    r"^(?!.*[\r\n])(?!.*(?:^|/)\.{1,2}(?:[/?]|$))(?!.*%(?:2[eEfF]|5[cC]|40|25))(?!.*://)"
    r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,;=:/?%]*$"
)


class UnsafeEndpointError(ValueError):
    """An endpoint or URL that would leave the Connection's host or base path."""


def validate_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` when it is a safe path on the Connection; raise otherwise.

    Refused: full URLs (``https://...``), protocol-relative ``//host``, ``@``,
    backslashes, control characters (CR/LF header injection), ``..`` segments
    (also percent-encoded), and anything outside RFC 3986 path/query characters.
    """
    if not isinstance(endpoint, str):
        raise UnsafeEndpointError(f"endpoint must be a string, got {type(endpoint).__name__}")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in endpoint):
        raise UnsafeEndpointError(f"endpoint {endpoint!r} contains control characters (CR/LF?)")
    if "\\" in endpoint:
        raise UnsafeEndpointError(f"endpoint {endpoint!r} contains a backslash")
    if "@" in endpoint:
        raise UnsafeEndpointError(f"endpoint {endpoint!r} contains '@' (credentials or another host?)")
    if "://" in endpoint or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", endpoint):
        raise UnsafeEndpointError(
            f"endpoint {endpoint!r} is a full URL; give a path on the Connection's host, like '/api/users'"
        )
    if endpoint.startswith("//"):
        raise UnsafeEndpointError(f"endpoint {endpoint!r} is protocol-relative ('//host')")
    if not _SAFE_ENDPOINT.fullmatch(endpoint):
        raise UnsafeEndpointError(f"endpoint {endpoint!r} contains characters not allowed in a URL path")
    path = endpoint.split("?", 1)[0]
    decoded = unquote(unquote(path))
    segments = re.split(r"[/\\]", decoded)
    if any(segment in ("..", ".") for segment in segments):
        raise UnsafeEndpointError(f"endpoint {endpoint!r} contains a '..' or '.' path segment")
    if decoded.startswith("//") or "@" in decoded or "\\" in decoded:
        raise UnsafeEndpointError(f"endpoint {endpoint!r} hides a host or '@' in percent-encoding")
    return endpoint


def same_origin(url: str, base_url: str) -> bool:
    """Does ``url`` stay on the scheme, host and port of ``base_url``? (A bad port never does.)"""
    target, base = urlsplit(url), urlsplit(base_url)
    try:
        return (target.scheme, target.hostname, target.port) == (base.scheme, base.hostname, base.port)
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """The URL without user info (``user:password@``), safe to log or show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    # Keep the host and port exactly as written (even an invalid port): only drop user info.
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
