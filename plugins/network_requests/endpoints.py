"""Which endpoints and URLs a task may request, and what of a URL may be shown: no I/O.

An endpoint comes from a DAG author or, through a trigger form, from anyone who may
trigger a DAG. It must stay a path on the Connection's host: never a full URL,
never another host, never a way out of the base path. Checking it here, before
any request, closes the door to SSRF through a trigger form.
"""

from __future__ import annotations

import functools
import importlib
import re
from urllib.parse import unquote, unquote_plus, urlsplit

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
    (also percent-encoded), and anything outside RFC 3986 path/query characters. The
    error quotes the endpoint as ``redact_url`` shows it.
    """
    if not isinstance(endpoint, str):
        raise UnsafeEndpointError(f"endpoint must be a string, got {type(endpoint).__name__}")
    shown = repr(redact_url(endpoint))  # error messages end up in the task log
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in endpoint):
        raise UnsafeEndpointError(f"endpoint {shown} contains control characters (CR/LF?)")
    if "\\" in endpoint:
        raise UnsafeEndpointError(f"endpoint {shown} contains a backslash")
    if "@" in endpoint:
        raise UnsafeEndpointError(f"endpoint {shown} contains '@' (credentials or another host?)")
    if "://" in endpoint or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", endpoint):
        raise UnsafeEndpointError(
            f"endpoint {shown} is a full URL; give a path on the Connection's host, like '/api/users'"
        )
    if endpoint.startswith("//"):
        raise UnsafeEndpointError(f"endpoint {shown} is protocol-relative ('//host')")
    if not _SAFE_ENDPOINT.fullmatch(endpoint):
        raise UnsafeEndpointError(f"endpoint {shown} contains characters not allowed in a URL path")
    path = endpoint.split("?", 1)[0]
    decoded = unquote(unquote(path))
    segments = re.split(r"[/\\]", decoded)
    if any(segment in ("..", ".") for segment in segments):
        raise UnsafeEndpointError(f"endpoint {shown} contains a '..' or '.' path segment")
    if decoded.startswith("//") or "@" in decoded or "\\" in decoded:
        raise UnsafeEndpointError(f"endpoint {shown} hides a host or '@' in percent-encoding")
    return endpoint


def same_origin(url: str, base_url: str) -> bool:
    """Does ``url`` stay on the scheme, host and port of ``base_url``? (A bad port never does.)"""
    target, base = urlsplit(url), urlsplit(base_url)
    try:
        return (target.scheme, target.hostname, target.port) == (base.scheme, base.hostname, base.port)
    except ValueError:
        return False


# -- What of a URL may be shown -------------------------------------------------------------
# Every log line, event, wait-history entry, metric and UI row that names a URL goes
# through ``redact_url``. It drops the user info and masks the values of query parameters
# whose names say they hold a secret, by Airflow's own rule for sensitive names.

#: What a masked value becomes: Airflow's own mask, so a reader of a task log knows it.
MASK = "***"

#: Names Airflow's masker does not list that carry credentials in well-known APIs' query
#: strings (Google's ``key``, Azure SAS ``sig``, AWS presigned ``X-Amz-Signature`` and
#: ``X-Amz-Credential``, ``auth``, session ids, ``pwd``). The extra link masked them before
#: it used Airflow's names; it still does, and now every log line does too.
EXTRA_SENSITIVE_NAMES = frozenset({"key", "auth", "sig", "signature", "credential", "session", "pwd"})

#: Airflow 3.3's ``DEFAULT_SENSITIVE_FIELDS``, used only if no Airflow module provides it
#: (masking never depends on an import succeeding).
_FALLBACK_AIRFLOW_NAMES = frozenset(
    {
        "access_key", "access_token", "api_key", "apikey", "auth_header", "authorization", "bearer",
        "connection_string", "dsn", "passphrase", "passwd", "password", "private_key", "proxy",
        "proxy_password", "proxies", "secret", "service_account", "service_key", "token",
        "keyfile_dict", "webhook_url",
    }
)  # fmt: skip
_PAIR_SEPARATORS = re.compile(r"([&;])")


def airflow_sensitive_names() -> frozenset[str]:
    """The names Airflow's secrets masker hides: its defaults plus ``[core] sensitive_var_conn_names``.

    The one place that reaches into Airflow's masker module, which has no public home in
    Airflow 3.3 (``airflow.sdk._shared`` on workers and triggerers, ``airflow._shared`` in
    core; ``airflow.sdk.execution_time.secrets_masker`` before 3.2). Configured names are
    lower-cased: Airflow compares them with a lower-cased name, so ``MyToken`` in the config
    would otherwise never match.
    """
    return _AIRFLOW_DEFAULTS | _configured_names(_configured_value())


def _airflow_default_names() -> frozenset[str]:
    for module in ("airflow.sdk._shared.secrets_masker", "airflow._shared.secrets_masker"):
        try:
            return frozenset(importlib.import_module(module).DEFAULT_SENSITIVE_FIELDS)
        except (ImportError, AttributeError):
            continue
    return _FALLBACK_AIRFLOW_NAMES


def _configured_value() -> str:
    try:
        from airflow.sdk.configuration import conf
    except ImportError:
        from airflow.configuration import conf
    try:
        return conf.get("core", "sensitive_var_conn_names", fallback="") or ""
    except Exception:  # a config that cannot be read: the defaults still apply
        return ""


@functools.lru_cache(maxsize=8)
def _configured_names(value: str) -> frozenset[str]:
    return frozenset(name.strip().lower() for name in value.split(",") if name.strip())


_AIRFLOW_DEFAULTS = _airflow_default_names()


def is_sensitive_name(name: str, sensitive: frozenset[str] | None = None) -> bool:
    """Is ``name`` (a query parameter name, percent-decoded) one whose value must be hidden?

    Airflow's rule (``SecretsMasker.should_hide_value_for_key``): the name, lower-cased and
    with every run of non-word characters made ``_``, contains one of the sensitive names
    (``X-Api-Key`` contains ``api_key``; ``client_secret`` contains ``secret``). The names
    are Airflow's plus :data:`EXTRA_SENSITIVE_NAMES` (``sensitive`` replaces them, for tests).
    """
    names = sensitive if sensitive is not None else airflow_sensitive_names() | EXTRA_SENSITIVE_NAMES
    normalized = re.sub(r"\W+", "_", name.strip().lower())
    return any(sensitive_name in normalized for sensitive_name in names)


def _masked_pairs(text: str, sensitive: frozenset[str]) -> str:
    """``a=1&api_key=x`` -> ``a=1&api_key=***``; everything else kept exactly as written."""
    pieces = _PAIR_SEPARATORS.split(text)
    for index in range(0, len(pieces), 2):  # odd indexes are the separators themselves
        name, equals, value = pieces[index].partition("=")
        if equals and value and is_sensitive_name(unquote_plus(name), sensitive):
            pieces[index] = f"{name}={MASK}"
    return "".join(pieces)


def sensitive_query_values(url: str) -> list[str]:
    """The (percent-decoded) values ``redact_url`` would mask in ``url``'s query and fragment."""
    if not isinstance(url, str):
        return []
    rest, _, fragment = url.partition("#")
    query = rest.partition("?")[2]
    sensitive = airflow_sensitive_names() | EXTRA_SENSITIVE_NAMES
    values = []
    for text in (query, fragment):
        for pair in _PAIR_SEPARATORS.split(text)[::2]:
            name, equals, value = pair.partition("=")
            if equals and value and is_sensitive_name(unquote_plus(name), sensitive):
                values.extend(dict.fromkeys((value, unquote_plus(value))))
    return values


def mask_query_secrets(url: str) -> None:
    """Tell Airflow's secrets masker about the sensitive query values of ``url``.

    ``redact_url`` covers what this package logs; this covers everything else in the task's
    log: the HTTP hook's and urllib3's own debug lines quote the full URL. Airflow then
    masks each value wherever it appears (values shorter than ``[logging]
    min_length_masked_secret`` excepted: Airflow masks none of those).
    """
    values = sensitive_query_values(url)
    if not values:
        return
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:
        from airflow.sdk.execution_time.secrets_masker import mask_secret
    for value in values:
        mask_secret(value)


def redact_url(url: str) -> str:
    """``url`` safe to log or show: no user info, sensitive query values masked.

    ``https://user:pw@api.example.com/items?api_key=abc&page=2`` becomes
    ``https://api.example.com/items?api_key=***&page=2``. Names are matched after
    percent-decoding, in any case, and every repeat of a name is masked; the fragment is
    treated like the query. The rest is kept character for character, and it never raises.

    Not detectable: a secret in the path (``/keys/abc123/items``, a templated endpoint), in
    a parameter without a name, or in a name that says nothing (``?q=abc123``).
    """
    if not isinstance(url, str):
        return url
    rest, hash_, fragment = url.partition("#")
    rest, question, query = rest.partition("?")
    rest = _without_user_info(rest)
    if not (query or fragment):
        return rest + question + hash_
    sensitive = airflow_sensitive_names() | EXTRA_SENSITIVE_NAMES
    return rest + question + _masked_pairs(query, sensitive) + hash_ + _masked_pairs(fragment, sensitive)


def _without_user_info(head: str) -> str:
    """The scheme, authority and path with ``user:password@`` dropped from the authority."""
    scheme, separator, after = head.partition("//")
    if not separator or (scheme and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*:", scheme)):
        return head
    authority, slash, path = after.partition("/")
    if "@" not in authority:
        return head
    # Keep the host and port exactly as written (even an invalid port): only drop user info.
    return scheme + separator + authority.rpartition("@")[2] + slash + path
