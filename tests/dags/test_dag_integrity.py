"""DAG integrity: every file in dags/ imports cleanly, fast and offline, with tags and retries."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DAG_FILES = sorted((REPO_ROOT / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def dag_bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO_ROOT / "dags"))


def test_the_project_ships_dag_files():
    assert {path.name for path in DAG_FILES} >= {"network_request_periodic.py", "network_request_once.py"}


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda path: path.name)
def test_dag_file_imports_without_errors(dag_bag, dag_file: Path):
    assert str(dag_file) not in dag_bag.import_errors, dag_bag.import_errors.get(str(dag_file))


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda path: path.name)
def test_dag_file_opens_no_network_connection_at_import(dag_file: Path, monkeypatch):
    import runpy

    def refuse(*args, **kwargs):
        raise AssertionError(f"{dag_file.name} opened a network connection while being parsed")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    runpy.run_path(str(dag_file))


def test_every_dag_has_tags_retries_and_docs(dag_bag):
    assert dag_bag.dags, "no DAG was found in dags/"
    for dag_id, dag in dag_bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has retries={task.retries}"


def test_periodic_dag_runs_every_5_minutes_without_catchup_or_pile_up(dag_bag):
    from datetime import timedelta

    dag = dag_bag.dags["network_request_periodic"]
    assert dag.schedule == timedelta(minutes=5)
    assert dag.catchup is False
    assert dag.max_active_runs == 1


def test_consumer_dag_is_scheduled_on_the_asset_the_periodic_fetches_update(dag_bag):
    fetch = dag_bag.dags["network_request_periodic"].get_task("fetch")
    consumer = dag_bag.dags["network_request_consumer"]

    assert fetch.outlets, "the periodic fetches declare no Asset"
    assert list(consumer.timetable.asset_condition.objects) == fetch.outlets


def test_once_dag_is_only_triggered_by_hand(dag_bag):
    dag = dag_bag.dags["network_request_once"]
    assert dag.schedule is None
