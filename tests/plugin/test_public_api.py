"""The package root exports every public name, and importing it alone loads nothing else (issue 11)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

import network_requests
from tests.conftest import PLUGINS_DIR

#: What a user imports from ``network_requests``, and where it is defined.
PUBLIC = {
    "NetworkRequestOperator": "network_requests.operators",
    "GitHubApiOperator": "network_requests.github",
    "network_request_task": "network_requests.taskflow",
    "NetworkRequestSensor": "network_requests.sensors",
    "BatchRequestOperator": "network_requests.batch",
    "RetryAfterPolicy": "network_requests.retry_policy",
    "NetworkRequestError": "network_requests.exceptions",
    "TransientRequestError": "network_requests.exceptions",
    "PermanentRequestError": "network_requests.exceptions",
    "ResponseTooLargeError": "network_requests.exceptions",
    "ResponseCheckFailed": "network_requests.exceptions",
    "RateLimitExceededError": "network_requests.exceptions",
    "BatchFailedError": "network_requests.batch",
    "BatchFailedPermanentlyError": "network_requests.batch",
}


def test_all_lists_exactly_the_public_names():
    assert sorted(network_requests.__all__) == sorted(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_imports_from_the_package_root(name):
    namespace: dict = {}
    exec(f"from network_requests import {name}", namespace)  # the statement a DAG file writes

    imported = namespace[name]
    assert imported.__module__ == PUBLIC[name]
    assert imported is getattr(sys.modules[PUBLIC[name]], name), "the root hands out the defining module's object"


def test_every_exception_a_task_can_fail_with_is_exported():
    from network_requests import batch, exceptions

    raised = {
        name
        for module in (exceptions, batch)
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == module.__name__
    }

    assert raised, "no exception class was found"
    assert raised <= set(network_requests.__all__), f"not exported: {sorted(raised - set(network_requests.__all__))}"


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from network_requests import *", namespace)

    assert set(PUBLIC) <= set(namespace)


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchOperator'"):
        network_requests.NoSuchOperator  # noqa: B018

    namespace: dict = {}
    exec("from network_requests import wait_delays", namespace)
    assert namespace["wait_delays"].__name__ == "network_requests.wait_delays"


def test_importing_the_package_loads_no_module_until_a_name_is_used():
    code = (
        "import sys, network_requests\n"
        "before = sorted(m for m in sys.modules if m.startswith('network_requests.'))\n"
        "network_requests.NetworkRequestOperator\n"
        "after = {m for m in sys.modules if m.startswith('network_requests.')}\n"
        "print(before, 'network_requests.operators' in after, 'network_requests.sensors' in after)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(PLUGINS_DIR)})

    assert result.returncode == 0, result.stderr[-2000:]
    # Nothing at first; the operator on first use, without the sensor a DAG did not ask for.
    assert result.stdout.split()[-3:] == ["[]", "True", "False"], result.stdout
