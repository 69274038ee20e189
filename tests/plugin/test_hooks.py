"""NetworkRequestHook: the provider's HttpHook, except that https:// URIs stay HTTPS."""

from __future__ import annotations

import pytest

from network_requests.hooks import NetworkRequestHook


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
def test_connection_uri_scheme_decides_the_url_scheme(monkeypatch, uri, expected):
    monkeypatch.setenv("AIRFLOW_CONN_HOOK_TEST", uri)

    hook = NetworkRequestHook(method="GET", http_conn_id="hook_test")

    assert hook.url_from_endpoint("/v1/items") == expected


def test_stock_http_hook_would_downgrade_an_https_uri_which_is_why_we_subclass(monkeypatch):
    from airflow.providers.http.hooks.http import HttpHook

    monkeypatch.setenv("AIRFLOW_CONN_HOOK_TEST", "https://api.example.com")

    assert HttpHook(method="GET", http_conn_id="hook_test").url_from_endpoint("/x").startswith("http://")
