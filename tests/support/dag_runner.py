"""Run a DAG through real Airflow (``dag.test()`` on the test SQLite DB) and read what happened.

``dag.test()`` in Airflow 3.3 follows reschedules and retries in real time and needs
the DAG in a file inside the dags folder, so each test writes its DAG there first.
"""

from __future__ import annotations

import importlib.util
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TaskResult:
    """One task instance after the run."""

    task_id: str
    map_index: int
    state: str | None
    try_number: int
    #: Reschedules recorded for the final try (Airflow deletes them when a new try starts).
    reschedules: int
    xcom: Any = None
    #: States of the earlier tries, oldest first (from TaskInstanceHistory).
    earlier_tries: list[str | None] = field(default_factory=list)


@dataclass
class DagRunResult:
    dag_id: str
    run_id: str
    state: str
    tasks: dict[tuple[str, int], TaskResult]

    def task(self, task_id: str, map_index: int = -1) -> TaskResult:
        return self.tasks[(task_id, map_index)]


def write_dag_file(dags_dir: Path, dag_id: str, source: str) -> Path:
    path = dags_dir / f"{dag_id}.py"
    path.write_text(textwrap.dedent(source))
    return path


def load_dag(path: Path, dag_id: str):
    spec = importlib.util.spec_from_file_location(f"test_dag_{dag_id}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for value in vars(module).values():
        if getattr(value, "dag_id", None) == dag_id and hasattr(value, "test"):
            return value
    raise LookupError(f"no DAG {dag_id!r} in {path}")


def run_dag(path: Path, dag_id: str, *, run_conf: dict | None = None) -> DagRunResult:
    """``dag.test()`` the DAG in ``path`` and collect its task instances from the metadata DB."""
    dag = load_dag(path, dag_id)
    dag_run = dag.test(run_conf=run_conf)
    return collect(dag_id, dag_run.run_id, str(dag_run.state))


def collect(dag_id: str, run_id: str, state: str) -> DagRunResult:
    from airflow.models import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    tasks: dict[tuple[str, int], TaskResult] = {}
    with create_session() as session:
        for ti in session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)):
            reschedules = session.scalar(select(func.count(TaskReschedule.id)).where(TaskReschedule.ti_id == ti.id))
            xcom = session.scalar(
                select(XComModel.value).where(
                    XComModel.dag_id == dag_id,
                    XComModel.run_id == run_id,
                    XComModel.task_id == ti.task_id,
                    XComModel.map_index == ti.map_index,
                    XComModel.key == "return_value",
                )
            )
            history = session.scalars(
                select(TaskInstanceHistory.state)
                .where(
                    TaskInstanceHistory.dag_id == dag_id,
                    TaskInstanceHistory.run_id == run_id,
                    TaskInstanceHistory.task_id == ti.task_id,
                    TaskInstanceHistory.map_index == ti.map_index,
                )
                .order_by(TaskInstanceHistory.try_number)
            ).all()
            tasks[(ti.task_id, ti.map_index)] = TaskResult(
                task_id=ti.task_id,
                map_index=ti.map_index,
                state=str(ti.state) if ti.state else None,
                try_number=ti.try_number,
                reschedules=reschedules or 0,
                xcom=_decode_xcom(xcom),
                earlier_tries=[str(s) if s else None for s in history],
            )
    return DagRunResult(dag_id=dag_id, run_id=run_id, state=state, tasks=tasks)


def _decode_xcom(value: Any) -> Any:
    import json

    if isinstance(value, (bytes, str)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def operator_dag_source(dag_id: str, operator_kwargs: str, default_args: str = "{}") -> str:
    """Source of a one-task DAG running ``NetworkRequestOperator(task_id="request", <operator_kwargs>)``."""
    return f'''
from datetime import timedelta
import pendulum
from airflow.sdk import DAG
from network_requests import NetworkRequestOperator

with DAG(
    dag_id={dag_id!r},
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={default_args},
) as dag:
    NetworkRequestOperator(task_id="request", http_conn_id="network_request_api", {operator_kwargs})
'''


def run_operator_task(
    request: Any, api_url: str, operator_kwargs: str, default_args: str = "{}", *, connection: str | None = None
) -> DagRunResult:
    """``dag.test()`` a one-task DAG (see operator_dag_source) named after the test, against ``api_url``
    (or a whole Connection: a URI or Airflow's JSON form)."""
    from tests.conftest import TEST_DAGS_DIR

    dag_id = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:200]
    set_connection(connection or api_url)
    path = write_dag_file(TEST_DAGS_DIR, dag_id, operator_dag_source(dag_id, operator_kwargs, default_args))
    return run_dag(path, dag_id)


def rescheduling(operator_kwargs: str) -> str:
    """Operator kwargs with in-process waiting off and deferral off (unless the kwargs set them),
    so even a 1 s wait takes the reschedule path."""
    if "in_process_wait_threshold" not in operator_kwargs:
        operator_kwargs = f"{operator_kwargs}, in_process_wait_threshold=0"
    if "deferrable" not in operator_kwargs:
        operator_kwargs = f"{operator_kwargs}, deferrable=False"
    return operator_kwargs


def set_connection(base_url: str) -> None:
    os.environ["AIRFLOW_CONN_NETWORK_REQUEST_API"] = base_url


class SendCounter:
    """Counts the requests sent from a worker (``sending.send``) and from the triggerer
    (``sending_async.send``) while ``dag.test()`` runs both in this process. A spy: the
    real senders still send."""

    def __init__(self, monkeypatch: Any) -> None:
        from network_requests import sending, triggers

        self.worker = 0
        self.triggerer = 0
        real_sync, real_async = sending.send, triggers.send

        def sync_spy(*args: Any, **kwargs: Any) -> Any:
            self.worker += 1
            return real_sync(*args, **kwargs)

        async def async_spy(*args: Any, **kwargs: Any) -> Any:
            self.triggerer += 1
            return await real_async(*args, **kwargs)

        monkeypatch.setattr(sending, "send", sync_spy)
        monkeypatch.setattr(triggers, "send", async_spy)
