"""Which endpoints a task may request (network_requests.endpoints): no SSRF through a trigger form.

``validate_endpoint`` is the last gate before a request; ``ENDPOINT_PARAM_PATTERN`` refuses
the same values earlier, when a run is triggered, through the trigger form's JSON schema.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urljoin, urlsplit

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from network_requests.endpoints import (
    ENDPOINT_PARAM_PATTERN,
    EXTRA_SENSITIVE_NAMES,
    MASK,
    UnsafeEndpointError,
    airflow_sensitive_names,
    is_sensitive_name,
    redact_url,
    same_origin,
    validate_endpoint,
)

BASE_URL = "http://api.internal:8080"
ENDPOINT_SCHEMA = {"type": "string", "pattern": ENDPOINT_PARAM_PATTERN}

PROPERTY_SETTINGS = settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

SAFE_ENDPOINTS = [
    "/api/users",
    "/api/items/42?fields=a,b",
    "/.well-known/x",
    "/a/b..c",
    "/a/...",
    "/a/..b/c",
    "/a/.b",
    "/",
    "/api/v1/users?page=2&size=10",
    "/api/users/",
    "/~user/files",
    "/a%20b",
    "/search?q=a:b",
    "/search?q=..",
    "/items;v=2",
    "/a//b",
]
#: Relative endpoints: safe for validate_endpoint (HttpHook adds the '/'), but the
#: trigger form's pattern asks for a leading '/'.
RELATIVE_ENDPOINTS = ["api/users", "api/items/42?fields=a,b", ""]

UNSAFE_ENDPOINTS = [
    # (endpoint, what the message must say)
    pytest.param("http://evil.example/x", "full URL", id="http-url"),
    pytest.param("https://api.internal:8080/x", "full URL", id="https-url-to-the-same-host"),
    pytest.param("HTTP://evil.example", "full URL", id="upper-case-scheme"),
    pytest.param("javascript:alert(1)", "full URL", id="javascript-scheme"),
    pytest.param("file:///etc/passwd", "full URL", id="file-scheme"),
    pytest.param("gopher:evil", "full URL", id="opaque-scheme"),
    pytest.param("localhost:8080/x", "full URL", id="host-and-port"),
    pytest.param("/redirect?to=http://evil.example", "full URL", id="url-in-the-query"),
    pytest.param("//evil.example/x", "protocol-relative", id="protocol-relative"),
    pytest.param("//evil.example", "protocol-relative", id="protocol-relative-no-path"),
    pytest.param("///evil.example", "protocol-relative", id="three-slashes"),
    pytest.param("/a@evil.example", "'@'", id="at-sign"),
    pytest.param("@evil.example/x", "'@'", id="leading-at-sign"),
    pytest.param("/api?user=me@example.com", "'@'", id="at-sign-in-query"),
    pytest.param("\\\\evil.example\\x", "backslash", id="unc-path"),
    pytest.param("/\\evil.example", "backslash", id="slash-backslash"),
    pytest.param("/a\\..\\b", "backslash", id="backslash-dot-segments"),
    pytest.param("/a\r\nX-Injected: 1", "control characters", id="crlf-header-injection"),
    pytest.param("/a\n", "control characters", id="trailing-newline"),
    pytest.param("/a\rb", "control characters", id="carriage-return"),
    pytest.param("/a\tb", "control characters", id="tab"),
    pytest.param("/a\x00b", "control characters", id="nul"),
    pytest.param("/a\x7f", "control characters", id="delete"),
    pytest.param("/../etc/passwd", "'..' or '.' path segment", id="dot-dot-leading"),
    pytest.param("/a/../b", "'..' or '.' path segment", id="dot-dot-inner"),
    pytest.param("/a/..", "'..' or '.' path segment", id="dot-dot-trailing"),
    pytest.param("/a/..?x=1", "'..' or '.' path segment", id="dot-dot-before-query"),
    pytest.param("..", "'..' or '.' path segment", id="bare-dot-dot"),
    pytest.param("../x", "'..' or '.' path segment", id="relative-dot-dot"),
    pytest.param(".", "'..' or '.' path segment", id="bare-dot"),
    pytest.param("/a/./b", "'..' or '.' path segment", id="dot-inner"),
    pytest.param("/a/.", "'..' or '.' path segment", id="dot-trailing"),
    pytest.param("./a", "'..' or '.' path segment", id="relative-dot"),
    pytest.param("/%2e%2e/admin", "'..' or '.' path segment", id="percent-encoded-dot-dot"),
    pytest.param("/%2E%2E/admin", "'..' or '.' path segment", id="percent-encoded-dot-dot-upper"),
    pytest.param("/.%2e/admin", "'..' or '.' path segment", id="half-encoded-dot-dot"),
    pytest.param("/a/%2e", "'..' or '.' path segment", id="percent-encoded-dot"),
    pytest.param("/%252e%252e/admin", "'..' or '.' path segment", id="double-encoded-dot-dot"),
    pytest.param("/%252E%252E/admin", "'..' or '.' path segment", id="double-encoded-dot-dot-upper"),
    pytest.param("/%5c..%5cadmin", "'..' or '.' path segment", id="encoded-backslash-dot-dot"),
    pytest.param("/%2f%2fevil.example", "hides a host", id="percent-encoded-double-slash"),
    pytest.param("/%252f%252fevil.example", "hides a host", id="double-encoded-double-slash"),
    pytest.param("/%40evil.example", "hides a host or '@'", id="percent-encoded-at-sign"),
    pytest.param("/a%5cb", "hides a host or '@'", id="percent-encoded-backslash"),
    pytest.param("/a b", "not allowed in a URL path", id="space"),
    pytest.param("/a<script>", "not allowed in a URL path", id="angle-brackets"),
    pytest.param("/a#fragment", "not allowed in a URL path", id="fragment"),
    pytest.param("/caf\N{LATIN SMALL LETTER E WITH ACUTE}", "not allowed in a URL path", id="non-ascii"),
    pytest.param("/a\N{FULLWIDTH SOLIDUS}b", "not allowed in a URL path", id="fullwidth-slash"),
    pytest.param('/a"b', "not allowed in a URL path", id="double-quote"),
]


@pytest.mark.parametrize("endpoint", SAFE_ENDPOINTS + RELATIVE_ENDPOINTS)
def test_validate_endpoint_accepts_a_path_on_the_connection(endpoint):
    assert validate_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(("endpoint", "message"), UNSAFE_ENDPOINTS)
def test_validate_endpoint_refuses_and_says_what_is_wrong(endpoint, message):
    with pytest.raises(UnsafeEndpointError) as raised:
        validate_endpoint(endpoint)
    assert message in str(raised.value)
    assert repr(endpoint) in str(raised.value)


def test_a_full_url_message_shows_what_to_give_instead():
    with pytest.raises(UnsafeEndpointError, match=r"give a path on the Connection's host, like '/api/users'"):
        validate_endpoint("https://evil.example/api/users")


@pytest.mark.parametrize("endpoint", [None, b"/api/users", 42, ["/api"]])
def test_validate_endpoint_refuses_what_is_not_a_string(endpoint):
    with pytest.raises(UnsafeEndpointError, match=f"must be a string, got {type(endpoint).__name__}"):
        validate_endpoint(endpoint)


def test_an_unsafe_endpoint_error_is_a_value_error():
    assert issubclass(UnsafeEndpointError, ValueError)


# -- The trigger form's JSON-schema pattern -------------------------------------------------------


def schema_accepts(endpoint: str) -> bool:
    try:
        jsonschema.validate(endpoint, ENDPOINT_SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


def test_the_endpoint_pattern_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(ENDPOINT_SCHEMA)
    jsonschema.Draft7Validator.check_schema(ENDPOINT_SCHEMA)


@pytest.mark.parametrize("endpoint", SAFE_ENDPOINTS)
def test_the_endpoint_schema_accepts_a_path_on_the_connection(endpoint):
    assert schema_accepts(endpoint)


@pytest.mark.parametrize("endpoint", RELATIVE_ENDPOINTS)
def test_the_endpoint_schema_asks_for_a_leading_slash(endpoint):
    assert not schema_accepts(endpoint)


def _pattern_cases():
    for case in UNSAFE_ENDPOINTS:
        endpoint, _ = case.values
        yield pytest.param(endpoint, id=case.id)


@pytest.mark.parametrize("endpoint", list(_pattern_cases()))
def test_the_endpoint_schema_refuses_what_validate_endpoint_refuses(endpoint):
    assert not schema_accepts(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param("/a\n", id="trailing-newline-which-dollar-alone-would-let-through"),
        pytest.param("/a\r", id="trailing-carriage-return"),
        pytest.param("/a\n/b", id="inner-newline"),
        pytest.param("/a%2Fb", id="percent-encoded-slash"),
        pytest.param("/a%2fb", id="percent-encoded-slash-lower"),
        pytest.param("/a%5Cb", id="percent-encoded-backslash"),
        pytest.param("/a?x=/../", id="dot-dot-in-the-query"),
        pytest.param("/a/..?", id="dot-dot-before-empty-query"),
        pytest.param("", id="empty"),
    ],
)
def test_the_endpoint_schema_refuses_more_than_validate_endpoint_where_it_is_cheap(endpoint):
    assert not schema_accepts(endpoint)


def test_the_endpoint_pattern_is_anchored_for_pythons_re_search_as_jsonschema_uses_it():
    assert ENDPOINT_PARAM_PATTERN.startswith("^")
    assert ENDPOINT_PARAM_PATTERN.endswith("$")
    assert re.search(ENDPOINT_PARAM_PATTERN, "/api/users")
    assert not re.search(ENDPOINT_PARAM_PATTERN, "x/api/users")


# -- same_origin and redact_url ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://api.internal:8080/api/users",
        "http://api.internal:8080",
        "http://API.Internal:8080/x?y=1#z",
        "HTTP://api.internal:8080/x",
        "http://user:secret@api.internal:8080/x",
    ],
)
def test_same_origin_holds_for_the_base_urls_scheme_host_and_port(url):
    assert same_origin(url, BASE_URL)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://api.internal:8080/x", id="other-scheme"),
        pytest.param("http://evil.example:8080/x", id="other-host"),
        pytest.param("http://api.internal:8081/x", id="other-port"),
        pytest.param("http://api.internal/x", id="default-port-is-not-assumed"),
        pytest.param("http://api.internal.evil.example:8080/x", id="host-as-prefix"),
        pytest.param("http://api.internal:8080@evil.example/x", id="host-hidden-in-userinfo"),
        pytest.param("//api.internal:8080/x", id="no-scheme"),
        pytest.param("/api/users", id="only-a-path"),
    ],
)
def test_same_origin_refuses_another_scheme_host_or_port(url):
    assert not same_origin(url, BASE_URL)


def test_same_origin_compares_ipv6_hosts():
    assert same_origin("http://[::1]:8080/x", "http://[::1]:8080")
    assert not same_origin("http://[::2]:8080/x", "http://[::1]:8080")


@pytest.mark.parametrize("url", ["http://api.internal:99999/x", "http://api.internal:port/x"])
def test_same_origin_refuses_a_url_with_an_unreadable_port_instead_of_raising(url):
    assert not same_origin(url, BASE_URL)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://user:secret@api.example.com/x?q=1", "https://api.example.com/x?q=1"),
        ("http://user@api.example.com:8080/p", "http://api.example.com:8080/p"),
        ("http://:secret@api.example.com/", "http://api.example.com/"),
        ("http://user:secret@[::1]:8080/x", "http://[::1]:8080/x"),
        ("http://user:secret@[2001:db8::1]/x", "http://[2001:db8::1]/x"),
        ("http://user:p%40ss@api.example.com/x#frag", "http://api.example.com/x#frag"),
        ("http://user:p@ss@api.example.com/x", "http://api.example.com/x"),
    ],
)
def test_redact_url_removes_user_info(url, redacted):
    assert redact_url(url) == redacted
    assert "secret" not in redact_url(url)


def test_redact_url_never_raises_and_still_removes_the_password_when_the_port_is_unreadable():
    redacted = redact_url("http://user:secret@api.example.com:99999/x")
    assert "secret" not in redacted


@pytest.mark.parametrize(
    "url",
    ["http://api.example.com/x?q=1", "http://[::1]:8080/x", "https://API.example.com", "/api/users", ""],
)
def test_redact_url_leaves_a_url_without_user_info_unchanged(url):
    assert redact_url(url) == url


# -- redact_url: secrets in query strings -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("/items?api_key=SECRET1&page=2", "/items?api_key=***&page=2", id="endpoint-only"),
        pytest.param(
            "https://user:pw@api.example.com/items?api_key=SECRET1&page=2",
            "https://api.example.com/items?api_key=***&page=2",
            id="user-info-and-query",
        ),
        pytest.param("http://h/x?API_KEY=SECRET1", "http://h/x?API_KEY=***", id="upper-case"),
        pytest.param("http://h/x?Api-Key=SECRET1", "http://h/x?Api-Key=***", id="dash-is-a-separator"),
        pytest.param("http://h/x?api%5Fkey=SECRET1", "http://h/x?api%5Fkey=***", id="percent-encoded-name"),
        pytest.param("http://h/x?api+key=SECRET1", "http://h/x?api+key=***", id="plus-encoded-space"),
        pytest.param(
            "http://h/x?token=SECRET1&token=SECRET2&page=2", "http://h/x?token=***&token=***&page=2", id="repeated"
        ),
        pytest.param("http://h/x?client_secret=SECRET1", "http://h/x?client_secret=***", id="contains-a-name"),
        pytest.param("http://h/x?X-Amz-Signature=SECRET1&X-Amz-Credential=SECRET2",
                     "http://h/x?X-Amz-Signature=***&X-Amz-Credential=***", id="aws-presigned"),
        pytest.param("http://h/x?sv=2024&sig=SECRET1", "http://h/x?sv=2024&sig=***", id="azure-sas"),
        pytest.param("http://h/maps?key=SECRET1&q=paris", "http://h/maps?key=***&q=paris", id="google-key"),
        pytest.param("http://h/x?a=1;password=SECRET1", "http://h/x?a=1;password=***", id="semicolon-separator"),
        pytest.param("http://h/cb#access_token=SECRET1&state=s", "http://h/cb#access_token=***&state=s", id="fragment"),
        pytest.param("http://h/x?token=&page=2", "http://h/x?token=&page=2", id="empty-value-stays-empty"),
        pytest.param("http://h/x?page=2&sort=name", "http://h/x?page=2&sort=name", id="nothing-sensitive"),
        pytest.param("http://h/x?token", "http://h/x?token", id="name-without-value"),
        pytest.param("http://h/x?", "http://h/x?", id="empty-query-kept"),
    ],
)
def test_redact_url_masks_the_values_of_sensitive_query_parameters(url, shown):
    assert redact_url(url) == shown
    assert "SECRET" not in redact_url(url)


@pytest.mark.parametrize(
    "endpoint", ["/items?api_key=SECRET1&x=\r\n", "/../items?token=SECRET1", "/items?token=SECRET1&next=http://evil"]
)
def test_a_refused_endpoint_is_quoted_without_its_query_secrets(endpoint):
    with pytest.raises(UnsafeEndpointError) as raised:
        validate_endpoint(endpoint)
    assert "SECRET1" not in str(raised.value) and "=***" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://h/keys/SECRET1/items", id="in-the-path"),
        pytest.param("http://h/x?q=SECRET1", id="a-name-that-says-nothing"),
        pytest.param("http://h/x?SECRET1", id="no-name"),
    ],
)
def test_redact_url_cannot_see_a_secret_where_no_name_says_it_is_one(url):
    # Documented limit: only a parameter's name tells a secret apart.
    assert redact_url(url) == url


def test_redact_url_is_idempotent_and_never_raises_on_an_unparsable_url():
    once = redact_url("http://u:p@[::1/x?token=SECRET1")
    assert "SECRET1" not in once and redact_url(once) == once
    assert redact_url("http://[::1") == "http://[::1"


def test_the_sensitive_names_are_airflows_defaults_plus_the_ones_the_link_already_masked():
    from airflow.sdk._shared.secrets_masker import DEFAULT_SENSITIVE_FIELDS

    assert DEFAULT_SENSITIVE_FIELDS <= airflow_sensitive_names()
    # Airflow does not list these; the extra link masked them before, so they stay masked.
    assert not any(is_sensitive_name(name, airflow_sensitive_names()) for name in ("key", "sig", "session"))
    assert all(is_sensitive_name(name) for name in EXTRA_SENSITIVE_NAMES)


def test_names_added_in_core_sensitive_var_conn_names_are_masked_in_any_case(monkeypatch):
    url = "http://h/x?MyTenantCode=SECRET1&page=2"
    assert redact_url(url) == url
    monkeypatch.setenv("AIRFLOW__CORE__SENSITIVE_VAR_CONN_NAMES", "other, MyTenantCode")
    assert "mytenantcode" in airflow_sensitive_names()
    assert redact_url(url) == f"http://h/x?MyTenantCode={MASK}&page=2"


# -- Properties ----------------------------------------------------------------------------------

TOKENS = [
    "/", "//", ".", "..", "%2e", "%2E", "%252e", "%25", "%2f", "%2F", "%5c", "%40", "%0d%0a",
    "@", "\\", ":", "?", "#", "&", "=", "http:", "https://", "javascript:", "a", "api", "evil.example",
    "8080", "\r", "\n", "\t", " ", "%", "~", "\N{LATIN SMALL LETTER E WITH ACUTE}", "\N{FULLWIDTH SOLIDUS}",
]  # fmt: skip
endpoints = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(TOKENS), max_size=10).map("".join),
    st.from_regex(ENDPOINT_PARAM_PATTERN, fullmatch=True),
)


def join_like_http_hook(base: str, endpoint: str) -> str:
    return base + endpoint if endpoint.startswith("/") else base + "/" + endpoint


def dot_segments(path: str) -> list[str]:
    return [segment for segment in re.split(r"[/\\]", path) if segment in (".", "..")]


def assert_stays_on_the_connection(endpoint: str) -> None:
    url = join_like_http_hook(BASE_URL, endpoint)
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port) == ("http", "api.internal", 8080)
    assert same_origin(url, BASE_URL)
    # Resolved as a browser or requests' redirect handling would, it stays on the host too.
    resolved = urlsplit(urljoin(BASE_URL + "/", endpoint))
    assert (resolved.hostname, resolved.port) == ("api.internal", 8080)
    # No way out of the base path, as sent, once decoded, or twice decoded.
    for path in (parts.path, unquote(parts.path), unquote(unquote(parts.path))):
        assert not dot_segments(path)
    assert not re.search(r"[\x00-\x20\x7f]", url)


@PROPERTY_SETTINGS
@given(endpoint=endpoints)
def test_any_endpoint_validate_endpoint_accepts_stays_on_the_connections_host(endpoint):
    try:
        checked = validate_endpoint(endpoint)
    except UnsafeEndpointError:
        return
    assert checked == endpoint
    assert_stays_on_the_connection(checked)


@PROPERTY_SETTINGS
@given(endpoint=endpoints)
def test_any_endpoint_the_schema_accepts_stays_on_the_connections_host_as_sent(endpoint):
    if not schema_accepts(endpoint):
        return
    url = join_like_http_hook(BASE_URL, endpoint)
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == ("api.internal", 8080)
    assert not dot_segments(parts.path)
    assert not dot_segments(unquote(parts.path))
    assert "\n" not in endpoint and "\r" not in endpoint


@PROPERTY_SETTINGS
@given(endpoint=endpoints)
def test_validate_endpoint_raises_nothing_but_unsafe_endpoint_error(endpoint):
    try:
        validate_endpoint(endpoint)
    except UnsafeEndpointError as error:
        assert str(error)


SENSITIVE_SPELLINGS = st.sampled_from(
    ["api_key", "API_KEY", "Api-Key", "api%5Fkey", "api+key", "x-api-key", "access_token", "Password", "client_secret"]
)
QUERY_NOISE = st.lists(
    st.tuples(st.sampled_from(["page", "q", "sort", "limit"]), st.text("abc0123456789%+-_.~", max_size=8)), max_size=3
)


@PROPERTY_SETTINGS
@given(name=SENSITIVE_SPELLINGS, before=QUERY_NOISE, after=QUERY_NOISE, fragment=st.booleans())
def test_a_sensitive_parameters_value_never_survives_redact_url_wherever_it_is(name, before, after, fragment):
    secret = "S3cr3tV4lue"
    pairs = [f"{key}={value}" for key, value in before] + [f"{name}={secret}"] + [f"{k}={v}" for k, v in after]
    url = "https://user:pw@api.example.com/v1/items" + ("#" if fragment else "?") + "&".join(pairs)
    shown = redact_url(url)
    assert secret not in shown and "pw" not in shown
    assert redact_url(shown) == shown


@PROPERTY_SETTINGS
@given(url=st.text(max_size=60))
def test_redact_url_takes_any_text_without_raising_and_is_idempotent(url):
    shown = redact_url(url)
    assert redact_url(shown) == shown
