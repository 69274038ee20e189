"""``HttpHook`` with two fixes for this plugin's Connections.

- An ``https://`` Connection URI is called over HTTPS. Airflow parses
  ``AIRFLOW_CONN_X='https://user:token@api.example.com'`` into a Connection of type ``https``
  with no ``schema``, and the stock ``HttpHook`` then builds ``http://api.example.com``: the
  credentials would travel in clear text. Here the Connection type fills in the scheme when
  the ``schema`` field is empty.
- The ``extra`` keys this plugin reads (``rate_limit``, see
  :mod:`network_requests.configured_limits`) are not sent as request headers: the stock hook
  turns every ``extra`` key it does not know into a header, and a declared limit (an object)
  would make every request fail.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook

from network_requests.configured_limits import EXTRA_KEY as RATE_LIMIT_EXTRA_KEY

#: Keys of a Connection's ``extra`` that are this plugin's settings, never headers.
PLUGIN_EXTRA_KEYS = (RATE_LIMIT_EXTRA_KEY,)


class NetworkRequestHook(HttpHook):
    """The provider's ``HttpHook``; ``conn_type`` ``https`` means HTTPS when ``schema`` is empty,
    and the plugin's own ``extra`` keys are no headers."""

    def _set_base_url(self, connection: Any) -> None:
        if (
            getattr(connection, "conn_type", None) == "https"
            and not connection.schema
            and "://" not in (connection.host or "")
        ):
            connection.schema = "https"
        super()._set_base_url(connection)

    def _configure_session_from_extra(self, session: Any, connection: Any, extra_options: dict[str, Any]) -> Any:
        session = super()._configure_session_from_extra(session, connection, extra_options)
        for key in PLUGIN_EXTRA_KEYS:
            session.headers.pop(key, None)
        return session
