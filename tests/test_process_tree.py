"""scripts/process_tree.py on real process trees: a parent, a child, and an orphan that left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from scripts import process_tree
from scripts.process_tree import descendants, processes_with_env, stop_processes, stop_tree

REPO = str(Path(__file__).resolve().parents[1])

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")

SLEEPER = "import time; time.sleep(300)"  # bounded: a leak ends by itself
#: A root that starts a child, and a grandchild whose parent exits at once: an orphan that is
#: no longer below the root. It prints their pids and waits.
TREE = textwrap.dedent(
    f"""
    import json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])
    middle = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]).pid)"],
        stdout=subprocess.PIPE, text=True,
    )
    orphan = int(middle.stdout.readline())
    middle.wait()
    print(json.dumps({{"child": child.pid, "orphan": orphan}}), flush=True)
    time.sleep(300)
    """
)


@dataclass
class Tree:
    root: subprocess.Popen
    child: psutil.Process
    orphan: psutil.Process
    marker: tuple[str, str]


@pytest.fixture
def tree() -> Iterator[Tree]:
    marker = ("PROCESS_TREE_TEST_MARKER", uuid.uuid4().hex)
    root = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, env={**os.environ, marker[0]: marker[1]}
    )
    pids = json.loads(root.stdout.readline())
    made = Tree(root, psutil.Process(pids["child"]), psutil.Process(pids["orphan"]), marker)
    try:
        yield made
    finally:
        for process in (made.orphan, made.child):
            if process.is_running():
                process.kill()
        root.kill()
        root.wait()
        root.stdout.close()


def test_the_orphan_has_left_the_tree_and_only_the_marker_finds_it(tree: Tree):
    below = descendants(tree.root.pid)
    assert tree.child in below
    assert tree.orphan not in below and tree.orphan.is_running()
    assert tree.orphan.ppid() != tree.root.pid
    assert set(processes_with_env(*tree.marker)) == {psutil.Process(tree.root.pid), tree.child, tree.orphan}


def test_stop_tree_with_the_marker_stops_the_root_its_child_and_the_orphan(tree: Tree):
    assert tree.orphan.is_running() and tree.orphan not in descendants(tree.root.pid)  # the fault is there

    stop_tree(tree.root.pid, timeout=10, marker=tree.marker)

    assert tree.root.wait(timeout=5) == -signal.SIGTERM
    assert process_tree.alive([tree.child, tree.orphan]) == []
    assert processes_with_env(*tree.marker) == []


def test_stop_tree_without_the_marker_leaves_the_orphan_running(tree: Tree):
    stop_tree(tree.root.pid, timeout=10)

    assert tree.root.wait(timeout=5) == -signal.SIGTERM
    assert not process_tree.is_alive(tree.child)
    assert process_tree.is_alive(tree.orphan)


@pytest.fixture
def sigterm_ignorer() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(sigterm_ignorer: subprocess.Popen):
    told = []

    left = stop_processes([psutil.Process(sigterm_ignorer.pid)], timeout=1, on_kill=told.extend)

    assert left == []
    assert [p.pid for p in told] == [sigterm_ignorer.pid]  # it outlasted the grace period
    assert sigterm_ignorer.wait(timeout=5) == -signal.SIGKILL


def test_a_process_known_to_ignore_sigterm_is_killed_without_waiting_out_the_grace_period(sigterm_ignorer):
    told = []

    left = stop_processes(
        [psutil.Process(sigterm_ignorer.pid)], timeout=60, on_kill=told.extend, ignores_sigterm=lambda _p: True
    )

    assert left == [] and told == []  # gone before the grace period ended
    assert sigterm_ignorer.wait(timeout=5) == -signal.SIGKILL


def test_a_marker_in_the_callers_own_environment_spares_the_caller_and_its_parent():
    marker = ("PROCESS_TREE_TEST_MARKER", uuid.uuid4().hex)
    # The parent carries the marker; its child looks for it and reports what it found.
    look = (
        "import json, os, sys; sys.path.insert(0, sys.argv[1]); from scripts.process_tree import processes_with_env; "
        f"print(json.dumps([os.getpid(), os.getppid(), [p.pid for p in processes_with_env({marker[0]!r}, {marker[1]!r})]]))"
    )
    parent = (
        "import subprocess, sys; "
        f"print(subprocess.run([sys.executable, '-c', {look!r}, sys.argv[1]], capture_output=True, text=True).stdout)"
    )
    output = subprocess.run(
        [sys.executable, "-c", parent, REPO], env={**os.environ, marker[0]: marker[1]},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    me, my_parent, found = json.loads(output)

    assert me not in found and my_parent not in found


def test_a_subreaper_keeps_orphans_in_its_tree_and_reaps_them():
    script = textwrap.dedent(
        f"""
        import json, os, subprocess, sys
        import psutil
        sys.path.insert(0, sys.argv[1])
        from scripts import process_tree
        assert process_tree.become_subreaper()
        middle = subprocess.Popen(
            [sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]).pid)"],
            stdout=subprocess.PIPE, text=True,
        )
        orphan = int(middle.stdout.readline())
        middle.wait()
        adopted = orphan in [p.pid for p in process_tree.descendants(os.getpid())]
        os.kill(orphan, 9)
        os.waitid(os.P_PID, orphan, os.WEXITED | os.WNOWAIT)  # a zombie now, not reaped yet
        zombie = psutil.Process(orphan).status()
        process_tree.reap_children(keep=[middle.pid])
        reaped = not psutil.pid_exists(orphan)
        print(json.dumps({{"adopted": adopted, "zombie": zombie, "reaped": reaped}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script, REPO], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    assert json.loads(result.stdout) == {"adopted": True, "zombie": psutil.STATUS_ZOMBIE, "reaped": True}
