"""Case 11: durability of ``output_path``.

* Clearing a task re-runs it, and the re-run replaces its own output file: same path, the new
  body, nothing else left in the folder (idempotent).
* A write killed half-way never leaves a partial target: the body goes to a temporary file
  that is renamed over the target (plugins/network_requests/output.py). The exception paths
  are unit-tested in tests/plugin/test_output.py
  (test_a_write_failing_half_way_keeps_the_old_file_and_removes_the_temporary_file,
  test_an_interrupted_write_keeps_the_old_file_and_removes_the_temporary_file,
  test_a_failed_first_write_leaves_no_target_at_all,
  test_a_concurrent_reader_only_ever_sees_a_whole_old_or_whole_new_file); here the writer
  process is SIGKILLed, which no ``except`` can see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.scripted_api import ScriptedResponse

from .conftest import DAG_IDS, REPO_ROOT

pytestmark = pytest.mark.reliability

FIRST = {"version": 1, "items": list(range(50))}
SECOND = {"version": 2, "items": list(range(10))}


def _return_value(stack, dag_id: str, run_id: str) -> dict:
    value = {e["key"]: e["value"] for e in stack.xcom_entries(dag_id, run_id, "request")}["return_value"]
    return json.loads(value) if isinstance(value, str) else value


def test_clearing_a_task_rewrites_its_own_output_file(stack, api):
    dag_id = DAG_IDS["c11"]
    api.route("/c11/data", ScriptedResponse(body=FIRST), ScriptedResponse(body=SECOND))

    run_id = stack.trigger(dag_id)
    assert stack.wait_for_run(dag_id, run_id, timeout=120)["state"] == "success"
    first = _return_value(stack, dag_id, run_id)
    path = Path(first["path"])
    assert path.read_bytes() == json.dumps(FIRST).encode()
    first_inode = path.stat().st_ino

    stack.clear_task(dag_id, run_id, ["request"])
    stack.wait_for(
        "the cleared task to run again",
        lambda: (ti := stack.task_instance(dag_id, run_id, "request"))["try_number"] == 2 and ti["state"] == "success",
        timeout=120,
    )
    second = _return_value(stack, dag_id, run_id)

    assert second["path"] == first["path"], "a re-run writes the same path"
    assert path.read_bytes() == json.dumps(SECOND).encode(), "the re-run replaced the file with its own body"
    assert second["bytes"] == len(json.dumps(SECOND))
    assert path.stat().st_ino != first_inode, "replaced by a rename, not rewritten in place"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no temporary or second file left"


WRITER = """
import os, sys, time
sys.path.insert(0, {plugins!r})
from network_requests import output
def slow_fsync(fd):  # a slow disk: the body is in the temporary file, the rename has not happened
    print("WRITTEN", flush=True)
    time.sleep(60)
output.os.fsync = slow_fsync
output.write_atomically({target!r}, b"N" * (8 * 1024 * 1024))
"""


def test_a_sigkilled_write_never_leaves_a_partial_target(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(b'{"old": "complete"}')
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(plugins=str(REPO_ROOT / "plugins"), target=str(target))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "WRITTEN"
        partials = list(tmp_path.glob(".out.json.*.partial"))
        assert partials and partials[0].stat().st_size == 8 * 1024 * 1024
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert target.read_bytes() == b'{"old": "complete"}', "the target is the old file, whole"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "out.json")
    # A SIGKILL runs no clean-up: the temporary file stays (hidden, never read as the target).
    print(f"\n[case 11] after SIGKILL mid-write: target intact; left behind: {leftovers}")
    assert all(name.startswith(".out.json.") and name.endswith(".partial") for name in leftovers)
