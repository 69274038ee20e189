"""``deferrable`` defaults to ``[operators] default_deferrable`` for every operator of the package (issue 11)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
import pytest

from network_requests.airflow_conventions import default_deferrable, deferrable_or_default

DEFAULT_DEFERRABLE_ENV = "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"


def operators_built_without_deferrable():
    """One task of each kind the package offers, none of them given ``deferrable``."""
    from airflow.sdk import DAG

    from network_requests import (BatchRequestOperator, GitHubApiOperator, NetworkRequestOperator, NetworkRequestSensor,
                                  network_request_task)

    with DAG("conventions", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):

        @network_request_task
        def fetch():
            return "/api/users"

        return {
            "NetworkRequestOperator": NetworkRequestOperator(task_id="request"),
            "GitHubApiOperator": GitHubApiOperator(task_id="github", endpoint="/repos/a/b"),
            "network_request_task": fetch().operator,
            "NetworkRequestSensor": NetworkRequestSensor(task_id="wait"),
            "BatchRequestOperator": BatchRequestOperator(task_id="batch", requests=["/api/a"]),
        }


@pytest.mark.parametrize("setting, expected", [("true", True), ("false", False)])
def test_every_operator_defaults_deferrable_to_operators_default_deferrable(monkeypatch, setting, expected):
    monkeypatch.setenv(DEFAULT_DEFERRABLE_ENV, setting)

    built = operators_built_without_deferrable()

    assert {name: task.deferrable for name, task in built.items()} == dict.fromkeys(built, expected)


@pytest.mark.parametrize("setting, expected_threshold", [("true", timedelta(0)), ("false", timedelta(seconds=5))])
def test_the_in_process_wait_threshold_follows_the_deferrable_the_operator_got(monkeypatch, setting,
                                                                              expected_threshold):
    from network_requests import NetworkRequestOperator

    monkeypatch.setenv(DEFAULT_DEFERRABLE_ENV, setting)

    assert NetworkRequestOperator(task_id="request").in_process_wait_threshold == expected_threshold


@pytest.mark.parametrize("setting", ["true", "false"])
@pytest.mark.parametrize("given", [True, False])
def test_a_task_that_says_deferrable_is_not_overridden_by_the_setting(monkeypatch, setting, given):
    from network_requests import BatchRequestOperator, NetworkRequestOperator, NetworkRequestSensor

    monkeypatch.setenv(DEFAULT_DEFERRABLE_ENV, setting)

    assert deferrable_or_default(given) is given
    assert NetworkRequestOperator(task_id="request", deferrable=given).deferrable is given
    assert NetworkRequestSensor(task_id="wait", deferrable=given).deferrable is given
    assert BatchRequestOperator(task_id="batch", requests=["/api/a"], deferrable=given).deferrable is given


def test_stock_airflow_ships_default_deferrable_false(monkeypatch):
    """Why the project's stacks set it: without the setting, tasks reschedule instead of deferring."""
    monkeypatch.delenv(DEFAULT_DEFERRABLE_ENV, raising=False)

    assert default_deferrable() is False
