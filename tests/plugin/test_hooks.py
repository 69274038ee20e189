"""NetworkRequestHook: the provider's HttpHook, except that https:// URIs stay HTTPS and the plugin's extra keys are no headers."""

from __future__ import annotations

import pytest

from network_requests.hooks import NetworkRequestHook


def base_url_for(hook_class, uri: str, endpoint: str = "/v1/items") -> str:
    # Parse the URI as Airflow does for AIRFLOW_CONN_* variables, and hand it to the hook
    # directly: the test needs no secrets backend (and leaves no Airflow state behind).
    from airflow.models.connection import Connection

    hook = hook_class(method="GET", http_conn_id="hook_test")
    hook._set_base_url(Connection(conn_id="hook_test", uri=uri))
    return hook.url_from_endpoint(endpoint)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://user:token@api.example.com", "https://api.example.com/v1/items"),
        ("https://api.example.com:8443", "https://api.example.com:8443/v1/items"),
        ("http://127.0.0.1:8090", "http://127.0.0.1:8090/v1/items"),
        # The provider's documented way to say HTTPS keeps working.
        ("http://api.example.com/https", "https://api.example.com/v1/items"),
    ],
)
def test_connection_uri_scheme_decides_the_url_scheme(uri, expected):
    assert base_url_for(NetworkRequestHook, uri) == expected


def test_stock_http_hook_would_downgrade_an_https_uri_which_is_why_we_subclass():
    from airflow.providers.http.hooks.http import HttpHook

    assert base_url_for(HttpHook, "https://api.example.com", "/x") == "http://api.example.com/x"


def session_headers_for(hook_class, extra: dict) -> dict:
    import requests
    from airflow.models.connection import Connection

    hook = hook_class(method="GET", http_conn_id="hook_test")
    connection = Connection(conn_id="hook_test", conn_type="http", host="api.example.com", extra=extra)
    return dict(hook._configure_session_from_extra(requests.Session(), connection, {}).headers)


def test_the_plugins_rate_limit_extra_is_no_header_while_the_other_extra_keys_still_are():
    extra = {"rate_limit": {"requests": 10, "per": "1s"}, "Accept": "application/vnd.github+json"}

    headers = session_headers_for(NetworkRequestHook, extra)

    assert "rate_limit" not in headers
    assert headers["Accept"] == "application/vnd.github+json"


def test_stock_http_hook_would_send_the_rate_limit_extra_as_a_header_which_is_why_we_drop_it():
    from airflow.providers.http.hooks.http import HttpHook

    assert session_headers_for(HttpHook, {"rate_limit": {"requests": 10, "per": "1s"}})["rate_limit"] == {
        "requests": 10, "per": "1s"}
