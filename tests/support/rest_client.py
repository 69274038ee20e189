"""Airflow 3's REST API (``/api/v2``) for the tests that run a real stack (e2e, UI, reliability):
the one client they share. Stdlib only.

It logs in as the simple auth manager's admin (``POST /auth/token``) and logs in again once
when a token expires (401), or sends no token at all when built without a password (a stack
run with ``simple_auth_manager_all_admins``).
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ADMIN_USER = "admin"
TERMINAL_RUN_STATES = ("success", "failed")
HEALTH_COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")

# Never send 127.0.0.1 traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ApiError(AssertionError):
    """An answer the test did not expect, or a wait that timed out (a test failure, not a crash)."""


@dataclass
class Response:
    status: int  # 0: no answer (connection refused, timed out)
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def quote(value: str) -> str:
    """One path segment (a DAG id, run id, task id, key)."""
    return urllib.parse.quote(value, safe="")


class AirflowRestClient:
    """The REST calls the tests make. ``password`` is read when a token is needed (the stack
    writes it at its first start); None sends requests without a token."""

    def __init__(self, base_url: str, password: Callable[[], str] | None, *, user: str = ADMIN_USER) -> None:
        self.base_url = base_url
        self._password = password
        self._user = user
        self._token: str | None = None

    # -- waiting -------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise when waiting any longer is pointless (the stack died). Nothing to check here."""

    def describe(self) -> str:
        """What to show with a timeout (a stack adds the tail of its output)."""
        return ""

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
        """Poll ``condition`` until it returns something truthy, which is returned."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            self.check_alive()
            if time.monotonic() > deadline:
                raise ApiError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.describe()}")
            time.sleep(interval)

    # -- plumbing ------------------------------------------------------------------------

    def token(self, *, refresh: bool = False) -> str:
        if self._token and not refresh:
            return self._token
        assert self._password is not None, "this client sends no token"
        answer = self.rest("POST", "/auth/token", {"username": self._user, "password": self._password()}, auth=False)
        if not answer.ok:
            raise ApiError(f"POST /auth/token answered {answer.status}: {answer.text[:500]}")
        self._token = answer.json()["access_token"]
        return self._token

    def forget_token(self) -> None:
        """After a restart: the next call logs in again."""
        self._token = None

    def rest(self, method: str, path: str, body: Any = None, *, auth: bool = True, timeout: float = 30) -> Response:
        """One call; an expired token is renewed once. Never raises for an HTTP or network error."""
        auth = auth and self._password is not None
        for attempt in (1, 2):
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            if auth:
                headers["Authorization"] = f"Bearer {self.token(refresh=attempt == 2)}"
            request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
            try:
                with _OPENER.open(request, timeout=timeout) as answer:
                    response = Response(answer.status, answer.read())
            except urllib.error.HTTPError as error:
                response = Response(error.code, error.read())
            except OSError as error:
                response = Response(0, str(error).encode())
            if response.status == 401 and auth and attempt == 1:
                continue
            return response
        return response

    def rest_json(self, method: str, path: str, body: Any = None) -> Any:
        """The parsed answer of a call that must succeed."""
        answer = self.rest(method, path, body)
        if not answer.ok:
            raise ApiError(f"{method} {path} answered {answer.status}: {answer.text[:2000]}")
        return answer.json()

    def get_or_none(self, path: str) -> Any:
        """The parsed answer of a GET, or None when it is not there (404)."""
        answer = self.rest("GET", path)
        if answer.status == 404:
            return None
        if not answer.ok:
            raise ApiError(f"GET {path} answered {answer.status}: {answer.text[:2000]}")
        return answer.json()

    # -- the stack -----------------------------------------------------------------------

    def health(self) -> dict[str, Any] | None:
        """``/api/v2/monitor/health`` (no login needed), or None when the API server does not answer."""
        answer = self.rest("GET", "/api/v2/monitor/health", auth=False, timeout=5)
        if not answer.ok:
            return None
        with contextlib.suppress(ValueError):
            return answer.json()
        return None

    def healthy(self, *, components: bool = True) -> bool:
        """The API server answers and, with ``components``, every component reports healthy."""
        health = self.health()
        if health is None or not components:
            return health is not None
        return all((health.get(name) or {}).get("status") == "healthy" for name in HEALTH_COMPONENTS)

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float) -> None:
        """Until every DAG of ``dag_ids`` is registered; the import errors when one is not."""
        pending = set(dag_ids)

        def registered() -> bool:
            for dag_id in sorted(pending):
                if self.rest("GET", f"/api/v2/dags/{quote(dag_id)}").ok:
                    pending.discard(dag_id)
            return not pending

        try:
            self.wait_for(f"DAGs {sorted(pending)} to be registered", registered, timeout, interval=1)
        except ApiError:
            errors = self.rest("GET", "/api/v2/importErrors").text[:4000]
            raise ApiError(f"DAGs not registered: {sorted(pending)}; import errors: {errors}") from None

    # -- DAGs and runs -------------------------------------------------------------------

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """A manual run without a logical date; its run id."""
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
        if run_id:
            body["dag_run_id"] = run_id
        return self.rest_json("POST", f"/api/v2/dags/{quote(dag_id)}/dagRuns", body)["dag_run_id"]

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.rest_json("PATCH", f"/api/v2/dags/{quote(dag_id)}", {"is_paused": paused})

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.rest_json("GET", f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}")

    def dag_runs(self, dag_id: str, order_by: str = "run_after", limit: int = 100) -> list[dict[str, Any]]:
        return self.rest_json("GET", f"/api/v2/dags/{quote(dag_id)}/dagRuns?limit={limit}&order_by={order_by}")["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 180, interval: float = 1) -> dict[str, Any]:
        """Until the run is ``success`` or ``failed``; the run. A timeout names each task's state."""

        def finished():
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in TERMINAL_RUN_STATES else None

        try:
            return self.wait_for(f"{dag_id}/{run_id} to finish", finished, timeout, interval)
        except ApiError as error:
            states = [(ti["task_id"], ti["state"], ti["try_number"]) for ti in self.task_instances(dag_id, run_id)]
            raise ApiError(f"{error}\ntasks: {states}") from None

    # -- task instances ------------------------------------------------------------------

    def _task_path(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
        suffix = f"/{map_index}" if map_index >= 0 else ""
        return f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}{suffix}"

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances?limit=1000"
        return sorted(self.rest_json("GET", path)["task_instances"], key=lambda ti: (ti["task_id"], ti["map_index"]))

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        return self.rest_json("GET", self._task_path(dag_id, run_id, task_id, map_index))

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        """Every try of a task instance, oldest first."""
        path = self._task_path(dag_id, run_id, task_id, map_index) + "/tries"
        return sorted(self.rest_json("GET", path)["task_instances"], key=lambda t: t["try_number"])

    def xcom_entries(self, dag_id: str, run_id: str, task_id: str = "~") -> list[dict[str, Any]]:
        """Every XCom of the run (``task_id="~"``) or of one task, each with its value."""
        path = f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}/xcomEntries?limit=1000"
        entries = self.rest_json("GET", path)["xcom_entries"]
        for entry in entries:
            value_path = (
                f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(entry['task_id'])}"
                f"/xcomEntries/{quote(entry['key'])}?map_index={entry['map_index']}&stringify=false"
            )
            entry["value"] = self.rest_json("GET", value_path).get("value")
        return entries

    def clear_task(self, dag_id: str, run_id: str, task_ids: list[str]) -> Any:
        return self.rest_json(
            "POST",
            f"/api/v2/dags/{quote(dag_id)}/clearTaskInstances",
            {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False, "reset_dag_runs": True},
        )

    def rest_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """A try's log as the UI reads it."""
        path = (
            f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}/logs/{try_number}"
            f"?full_content=true&map_index={map_index}"
        )
        return self.rest("GET", path).text

    # -- variables -----------------------------------------------------------------------

    def variable(self, key: str) -> str | None:
        """A Variable's value, or None when there is none."""
        found = self.get_or_none(f"/api/v2/variables/{quote(key)}")
        return None if found is None else found["value"]
