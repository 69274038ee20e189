"""``pip install .``: a wheel with the package, the plugin module, its data files and the entry point.

The wheel is built from a copy of the files it is made of (so the build leaves nothing in
the work tree) and never installed into the shared venv: it is unpacked into a temporary
folder, and a fresh Python process with only that folder (not ``plugins/``) on its path
must find the plugin through the ``airflow.plugins`` entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BUILD_FILES = ("pyproject.toml", "MANIFEST.in", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_FILES:
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "plugins", source / "plugins", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", str(dist), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "BuildBackendWarning" not in result.stdout + result.stderr
    (built,) = dist.glob("network_requests_airflow-*.whl")
    return built


def test_the_wheel_holds_the_package_the_plugin_module_and_the_page_files(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {path.relative_to(REPO_ROOT / "plugins").as_posix() for path in (REPO_ROOT / "plugins" / "network_requests").rglob("*.py")}
    assert package <= names
    assert {
        "network_requests_plugin.py",
        "network_requests/ui/static/rate_limits.css",
        "network_requests/ui/templates/rate_limits.html",
    } <= names
    # Nothing of the project around it.
    assert not [name for name in names if name.startswith(("tests/", "dags/", "include/", "scripts/", "plugins/"))]
    assert not [name for name in names if "__pycache__" in name]


def test_the_wheel_declares_the_airflow_plugin_entry_point_and_its_requirements(wheel: Path):
    archive = zipfile.ZipFile(wheel)
    dist_info = next(name.split("/")[0] for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert "[airflow.plugins]\nnetwork_requests = network_requests_plugin:NetworkRequestsPlugin" in entry_points
    metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert "Name: network-requests-airflow" in metadata
    assert "Requires-Dist: apache-airflow<4,>=3.3" in metadata
    assert "Requires-Dist: apache-airflow-providers-http>=6.3" in metadata


INSTALLED_PROBE = textwrap.dedent(
    """
    import json
    from airflow import plugins_manager
    import network_requests, network_requests_plugin
    from network_requests.ui.app import _templates
    plugins, errors = plugins_manager._get_plugins()
    ours = [p for p in plugins if p.name == "network_requests"]
    print(json.dumps({
        "sources": [str(p.source) for p in ours],
        "errors": errors,
        "package": network_requests.__file__,
        "template": bool(_templates.get_template("rate_limits.html")),
        "links": [l.name for p in ours for l in p.operator_extra_links],
    }))
    """
)


def test_installed_the_plugin_loads_from_the_entry_point_without_the_plugins_folder(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    empty_plugins = tmp_path / "plugins"
    empty_plugins.mkdir()
    env = {
        key: value for key, value in os.environ.items() if key != "PYTHONPATH"
    } | {"PYTHONPATH": str(site), "AIRFLOW__CORE__PLUGINS_FOLDER": str(empty_plugins)}

    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_PROBE], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )

    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    assert found["sources"] == ["network-requests-airflow==0.1.0: EntryPoint(name='network_requests', "
                                "value='network_requests_plugin:NetworkRequestsPlugin', group='airflow.plugins')"]
    assert found["package"].startswith(str(site))
    assert found["template"] and found["links"] == ["API endpoint"]
