"""Helpers for the Airflow-integration tests: DAG files from source, the API server in-process."""

from __future__ import annotations

import re
import textwrap
from typing import Any

from tests.conftest import TEST_DAGS_DIR
from tests.support.dag_runner import DagRunResult, run_dag, set_connection, write_dag_file

DAG_HEADER = """
from datetime import timedelta
import pendulum
from airflow.sdk import DAG, task
"""


def dag_id_for(request: Any, suffix: str = "") -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)
    return f"{name[:180]}{suffix}"


def run_source(dag_id: str, body: str, *, base_url: str | None = None, run_conf: dict | None = None) -> DagRunResult:
    """Write a DAG file (``DAG_HEADER`` + ``body``, which must define ``dag_id``) and ``dag.test()`` it."""
    if base_url is not None:
        set_connection(base_url)
    source = DAG_HEADER + textwrap.dedent(body)
    path = write_dag_file(TEST_DAGS_DIR, dag_id, source)
    return run_dag(path, dag_id, run_conf=run_conf)


def one_task_dag(dag_id: str, task_source: str, default_args: str = "{'retries': 0}", imports: str = "") -> str:
    """A DAG body with ``task_source`` (indented inside ``with DAG(...)``)."""
    return (
        textwrap.dedent(imports)
        + f"""
with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, default_args={default_args}) as dag:
"""
        + textwrap.indent(textwrap.dedent(task_source).strip() + "\n", "    ")
    )


def read_variable(key: str) -> str | None:
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalar(select(Variable).where(Variable.key == key))
        return None if row is None else row.val


def delete_variable(key: str) -> None:
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(Variable).where(Variable.key == key))


def set_variable(key: str, value: str) -> None:
    from airflow.models.variable import Variable

    Variable.set(key, value)


def xcom_value(dag_id: str, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
    import json

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == dag_id,
                XComModel.run_id == run_id,
                XComModel.task_id == task_id,
                XComModel.map_index == map_index,
                XComModel.key == key,
            )
        )
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


_API = None


def api_client():
    """A TestClient of the whole Airflow API server app (plugins mounted), made once."""
    global _API
    if _API is None:
        from airflow.api_fastapi.app import create_app
        from fastapi.testclient import TestClient

        _API = TestClient(create_app(), base_url="http://127.0.0.1")
    return _API


def token(role: str | None = "ADMIN", username: str = "admin") -> str:
    """A JWT for the simple auth manager, as the UI's login hands out."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    api_client()  # the auth manager is initialised with the app
    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))
