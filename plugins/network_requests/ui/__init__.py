"""The plugin's page in the Airflow 3 UI: "Browse → Rate limits" (see :mod:`network_requests.ui.app`)."""

from __future__ import annotations

#: Where the plugin mounts the app on the API server (below ``[api] base_url``'s path).
URL_PREFIX = "/network-requests"
#: The UI route of the embedded page: ``<airflow>/plugin/rate-limits``.
UI_ROUTE = "rate-limits"


def create_app():  # noqa: ANN201 - FastAPI is imported only when the API server asks
    from network_requests.ui.app import create_app as _create_app

    return _create_app()
