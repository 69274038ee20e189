"""``HttpHook`` with one safety fix: an ``https://`` Connection URI is called over HTTPS.

Airflow parses ``AIRFLOW_CONN_X='https://user:token@api.example.com'`` into a Connection of
type ``https`` with no ``schema``, and the stock ``HttpHook`` then builds
``http://api.example.com``: the credentials would travel in clear text. Here the
Connection type fills in the scheme when the ``schema`` field is empty.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook


class NetworkRequestHook(HttpHook):
    """The provider's ``HttpHook``; ``conn_type`` ``https`` means HTTPS when ``schema`` is empty."""

    def _set_base_url(self, connection: Any) -> None:
        if (
            getattr(connection, "conn_type", None) == "https"
            and not connection.schema
            and "://" not in (connection.host or "")
        ):
            connection.schema = "https"
        super()._set_base_url(connection)
