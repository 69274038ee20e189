"""The "Rate limits" page: a FastAPI app the plugin mounts on Airflow's API server.

- ``GET {prefix}/`` is the HTML page (server-rendered, every value escaped by Jinja's
  autoescape, a strict Content-Security-Policy: no script at all, styles from this app only);
- ``GET {prefix}/api/connections`` is the same data as JSON;
- ``GET {prefix}/static/...`` is the stylesheet.

Login works like the rest of Airflow 3.3's UI: the user comes from the same JWT, the
``_token`` cookie the UI's login sets (or an ``Authorization: Bearer`` header), through
Airflow's own ``get_user`` dependency. Without one, the page redirects to the auth
manager's login page and the JSON answers 401. Each connection's data comes from two
Variables, so it is shown only when the auth manager lets the user read Variables of that
key (``is_authorized_variable(method="GET")``). With ``[network_requests] gate_store = redis``
the gates are read from Redis instead (the wait histories stay in Variables) and shown under
the same rule, as if they were the Variables ``network_requests.gate.<conn>``; if Redis cannot
be read the page says so and shows the rest.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from network_requests import gate_store, wait_history
from network_requests.ui import view

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REFRESH_SECONDS = 30
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_templates = Environment(
    loader=FileSystemLoader(str(HERE / "templates")),
    autoescape=select_autoescape(enabled_extensions=("html",), default=True),
)
_bearer = HTTPBearer(auto_error=False)


def read_variables() -> dict[str, str | None]:
    """This plugin's Variables (gates and wait histories), decrypted, from the metadata DB."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import or_, select

    with create_session() as session:
        rows = session.scalars(
            select(Variable).where(
                or_(
                    Variable.key.startswith(gate_store.VARIABLE_PREFIX, autoescape=True),
                    Variable.key.startswith(wait_history.VARIABLE_PREFIX, autoescape=True),
                )
            )
        ).all()
        return {row.key: row.val for row in rows}


@functools.lru_cache(maxsize=1)
def gate_store_for_page() -> gate_store.GateStore:
    """The configured gate store, made once per API server process (as its config is read once)."""
    return gate_store.gate_store_from_config()


def read_gates_from_store() -> tuple[dict[str, str | None], str | None]:
    """Gates the configured store holds outside Variables (Redis), keyed like their Variables,
    and what to tell the user if that store could not be read."""
    try:
        store = gate_store_for_page()
        states = getattr(store, "states", None)
        if states is None:
            return {}, None  # the Variable store: read_variables() has the gates
        return {gate_store.variable_key(key): raw for key, raw in states().items()}, None
    except Exception:
        log.warning("Rate limits page: the gate store could not be read", exc_info=True)
        return {}, "The gate store could not be read (see the API server log): gates are not shown."


def stored_values() -> tuple[dict[str, str | None], str | None]:
    gates, problem = read_gates_from_store()
    return {**read_variables(), **gates}, problem


async def current_user(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Any:
    """The logged-in user, exactly as Airflow's own API resolves it; raises 401/403 otherwise."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, credentials)


def readable(values: dict[str, str | None], user: Any) -> tuple[dict[str, str | None], int]:
    """The Variables the user may read, and how many connections were left out."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import VariableDetails

    manager = get_auth_manager()
    allowed = {
        key: value
        for key, value in values.items()
        if manager.is_authorized_variable(method="GET", details=VariableDetails(key=key), user=user)
    }
    hidden = len(view.connections_from_variables(values)) - len(view.connections_from_variables(allowed))
    return allowed, max(hidden, 0)


def login_redirect(request: Request) -> Response:
    from airflow.api_fastapi.app import get_auth_manager

    next_url = str(request.url.path) + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(get_auth_manager().get_url_login(next_url=next_url), status_code=303)


def create_app() -> FastAPI:
    app = FastAPI(
        title="network_requests: rate limits",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Response:
        try:
            user = await current_user(request, credentials)
        except HTTPException as error:
            if error.status_code == 401:
                return login_redirect(request)
            raise
        stored, store_problem = stored_values()
        values, hidden = readable(stored, user)
        now = time.time()
        html = _templates.get_template("rate_limits.html").render(
            connections=view.page_data(values, now),
            hidden=hidden,
            store_problem=store_problem,
            generated=view.utc(now),
            refresh_seconds=REFRESH_SECONDS,
            static_url=str(request.url_for("static", path="rate_limits.css").path),
            legend=[(css, label) for css, label in view.SOURCE_LABELS.items() if css != "other"],
        )
        return HTMLResponse(html)

    @app.get("/api/connections")
    async def connections(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> JSONResponse:
        user = await current_user(request, credentials)
        stored, store_problem = stored_values()
        values, hidden = readable(stored, user)
        now = time.time()
        return JSONResponse(
            {
                "generated_at": now,
                "hidden_connections": hidden,
                "gate_store_problem": store_problem,
                "connections": [view.as_json(item) for item in view.page_data(values, now)],
            }
        )

    return app
