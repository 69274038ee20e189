"""The Airflow plugin of ``network_requests``: extra link, metrics listener, "Rate limits" page.

Airflow finds it in two ways, and registers it once:

- from the plugins folder (``plugins/``, this file; the package itself is in
  ``.airflowignore``), when the project is used as an Airflow project;
- from the ``airflow.plugins`` entry point, when the package is installed
  (``pip install .``: this module is installed as the top-level ``network_requests_plugin``).

When both are there (installed *and* this folder is the plugins folder), the copy loaded
from the folder hides its plugin class from the folder scan and lets the entry point
register it, so Airflow does not report "Plugin 'network_requests' already registered"
as an import error (in the Task SDK's loader a duplicate would even stop registration of
the plugins after it).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from airflow.plugins_manager import AirflowPlugin

from network_requests import metrics
from network_requests.links import ApiEndpointLink
from network_requests.operators import NetworkRequestOperator
from network_requests.ui import UI_ROUTE, URL_PREFIX

PLUGIN_NAME = "network_requests"
ENTRY_POINT_GROUP = "airflow.plugins"
#: This file's module name, installed or loaded from the plugins folder.
MODULE_NAME = "network_requests_plugin"


def _ui_base_path() -> str:
    """The path of ``[api] base_url`` (``""`` at the root), so links work behind a prefix."""
    try:
        from airflow.configuration import conf

        return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    except Exception:
        return ""


# The task types the API server attaches the link to. Set here, not in ``links.py``, so the
# package's modules never import each other in a circle (the operator lists the link).
ApiEndpointLink.operators = [NetworkRequestOperator]


class NetworkRequestsPlugin(AirflowPlugin):
    """Registers the "API endpoint" link, the metrics listener and the "Rate limits" page."""

    name = PLUGIN_NAME
    operator_extra_links = [ApiEndpointLink()]
    listeners = [metrics]
    external_views = [
        {
            "name": "Rate limits",
            # Embedded (an iframe) at <airflow>/plugin/rate-limits, listed under Browse.
            "href": f"{_ui_base_path()}{URL_PREFIX}/",
            "url_route": UI_ROUTE,
            "destination": "nav",
            "category": "browse",
        }
    ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # Built on first use, which is the API server: task processes load plugins too
        # (for the listener) and need no web app.
        if not hasattr(self, "_fastapi_apps"):
            from network_requests.ui import create_app

            self._fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Network requests"}]
        return self._fastapi_apps


def _installed_entry_point() -> bool:
    """Does an installed distribution declare this plugin under ``airflow.plugins``?"""
    from importlib.metadata import entry_points

    try:
        return any(
            entry_point.value.split(":")[0].strip() == MODULE_NAME for entry_point in entry_points(group=ENTRY_POINT_GROUP)
        )
    except Exception:
        return False


def _loaded_from_plugins_folder() -> bool:
    try:
        from airflow import settings

        folder = os.path.realpath(settings.PLUGINS_FOLDER or "")
    except Exception:
        return False
    return bool(folder) and os.path.dirname(os.path.realpath(__file__)) == folder


if _loaded_from_plugins_folder() and _installed_entry_point():
    # Hidden from the folder scan (it looks at the module's values), still importable by name
    # (``entry_point.load()`` uses getattr, which falls back to the module's __getattr__).
    _HIDDEN = {"NetworkRequestsPlugin": NetworkRequestsPlugin}
    del NetworkRequestsPlugin

    def __getattr__(name: str) -> Any:
        try:
            return _HIDDEN[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
