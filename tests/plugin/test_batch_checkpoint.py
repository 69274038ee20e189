"""The batch's journal (network_requests.batch_checkpoint): durable, one writer, and only the
crashed last line is ever lost. The lock is tested across real processes, one SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from network_requests.batch_checkpoint import Checkpoint, CheckpointBusy, ManifestChanged, local_folder, read_journal
from network_requests.batch_plan import plan_batch
from network_requests.request_spec import TaskRef
from tests.conftest import PLUGINS_DIR

TASK = TaskRef("dag", "run_1", "fetch", 3)


def _started(folder, task=TASK) -> Checkpoint:
    checkpoint = Checkpoint(folder, task)
    with checkpoint.exclusive():
        checkpoint.start()
    return checkpoint


def test_a_recorded_outcome_is_read_back_and_the_last_one_of_an_item_wins(tmp_path):
    checkpoint = Checkpoint(tmp_path, TASK)
    with checkpoint.exclusive():
        assert checkpoint.start() == {}
        checkpoint.record({"key": "a", "status": "failed", "try": 1})
        checkpoint.record({"key": "b", "status": "ok", "try": 1})
        checkpoint.record({"key": "a", "status": "ok", "try": 2})

    records = Checkpoint(tmp_path, TASK).load()

    assert {key: record["status"] for key, record in records.items()} == {"a": "ok", "b": "ok"}
    assert checkpoint.path.parent == tmp_path / ".batch"


def test_each_mapped_task_instance_has_its_own_journal_in_a_shared_folder(tmp_path):
    paths = {Checkpoint(tmp_path, TaskRef("dag", "run", "fetch", index)).path for index in (-1, 0, 1)}
    other_dag = Checkpoint(tmp_path, TaskRef("other", "run", "fetch", 0)).path

    assert len(paths | {other_dag}) == 4


def test_a_journal_of_another_dag_run_is_not_read_and_is_replaced_when_the_new_run_starts(tmp_path):
    old = Checkpoint(tmp_path, TaskRef("dag", "run_1", "fetch"))
    with old.exclusive():
        old.start()
        old.record({"key": "a", "status": "ok", "try": 1})
    new = Checkpoint(tmp_path, TaskRef("dag", "run_2", "fetch"))

    assert new.path == old.path, "the same folder and task: the same file"
    assert new.load() == {}, "the earlier run's outcomes are not this run's"
    with new.exclusive():
        assert new.start() == {}
    header, records = read_journal(new.path)
    assert header["run_id"] == "run_2" and records == {}


def test_a_last_line_cut_short_by_a_crash_is_dropped_and_the_next_line_starts_clean(tmp_path):
    checkpoint = _started(tmp_path)
    with checkpoint.exclusive():
        checkpoint.start()
        checkpoint.record({"key": "a", "status": "ok", "try": 1})
    with open(checkpoint.path, "ab") as stream:
        stream.write(b'{"key": "b", "status": "o')  # the process died in the middle of this write

    assert set(checkpoint.load()) == {"a"}, "a torn line is not an outcome"
    with checkpoint.exclusive():
        checkpoint.start()
        checkpoint.record({"key": "c", "status": "ok", "try": 2})

    assert set(checkpoint.load()) == {"a", "c"}
    assert checkpoint.path.read_bytes().count(b"\n") == 3, "header, a, c: the torn bytes are gone"


def test_recording_before_start_is_a_bug_not_a_silent_loss(tmp_path):
    with pytest.raises(RuntimeError, match="not started"):
        Checkpoint(tmp_path, TASK).record({"key": "a"})


HOLDER = """
import sys, time
sys.path.insert(0, {plugins!r})
from network_requests.batch_checkpoint import Checkpoint
from network_requests.request_spec import TaskRef
checkpoint = Checkpoint({folder!r}, TaskRef("dag", "run_1", "fetch", 3))
with checkpoint.exclusive():
    checkpoint.start()
    print("HOLDING", flush=True)
    time.sleep(120)
"""


def test_one_process_at_a_time_runs_a_batch_and_a_killed_holder_releases_it(tmp_path):
    source = textwrap.dedent(HOLDER).format(plugins=str(PLUGINS_DIR), folder=str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        checkpoint = Checkpoint(tmp_path, TASK)
        with pytest.raises(CheckpointBusy):
            with checkpoint.exclusive():
                pass
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=10) == -signal.SIGKILL, "the holder really died, no clean-up ran"
        with checkpoint.exclusive():
            assert checkpoint.start() == {}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_the_request_list_is_read_back_only_when_it_is_the_one_the_trigger_was_given(tmp_path):
    items = plan_batch(["/a", {"endpoint": "/b", "method": "POST", "data": {"x": [1]}}])
    checkpoint = Checkpoint(tmp_path, TASK)
    digest = checkpoint.write_manifest(items)

    assert checkpoint.read_manifest(digest) == items
    stored = json.loads(checkpoint.manifest_path.read_bytes())
    checkpoint.manifest_path.write_text(json.dumps({**stored, "items": stored["items"][:1]}))
    with pytest.raises(ManifestChanged):
        checkpoint.read_manifest(digest)
    checkpoint.manifest_path.unlink()
    with pytest.raises(ManifestChanged):
        checkpoint.read_manifest(digest)


def test_the_checkpoint_needs_a_local_folder():
    assert str(local_folder("file:///data/out")) == "/data/out"
    with pytest.raises(ValueError, match="local path"):
        local_folder("s3://bucket/out")
