"""Find and stop process trees with psutil: the one place the scripts, the benchmark and the
tests do that (``make run``, the stacks the tests start, ``make bench``).

Why a tree, and not a process group: Airflow runs each task process in a session of its own,
and ``airflow standalone`` dies alone on SIGTERM and leaves its components and LocalExecutor
workers running. So whoever started a stack stops it by walking the processes below it. Two
things keep that walk complete:

* :func:`become_subreaper`: processes orphaned below the caller (a task whose worker died)
  re-parent to the caller instead of to init, so they stay in its tree;
* a *marker*: an environment variable with a value unique to one stack, given to its first
  process and inherited by every process below. :func:`processes_with_env` finds the ones that
  left the tree. Best effort: a process that sets its title (setproctitle, which Airflow's
  workers, task processes and the API server use) overwrites the memory that
  ``/proc/<pid>/environ`` shows, so it no longer carries the marker. The tree walk is the
  main mechanism; the marker catches what escaped it before setting a title.

Processes are ``psutil.Process`` objects: they compare by pid *and* start time, so a pid reused
by an unrelated process is never signalled. A zombie counts as gone (it only needs reaping).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Collection, Iterable

import psutil

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
POLL_SECONDS = 0.2
#: After SIGKILL, how long to wait for the kernel to take the processes away.
KILL_WAIT_SECONDS = 5.0


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process, not to init (Linux only; elsewhere
    a no-op). True when it worked."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_alive(process: psutil.Process) -> bool:
    """Still running as the same process (not a reused pid) and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The ones of ``processes`` that are still alive, ordered by pid."""
    return sorted((p for p in set(processes) if is_alive(p)), key=lambda p: p.pid)


def _children_by_parent() -> dict[int, list[psutil.Process]]:
    """Live (non-zombie) processes by parent pid: one pass over the process table. (A zombie
    has no children: they were re-parented when it exited.)"""
    children: dict[int, list[psutil.Process]] = {}
    for process in psutil.process_iter(["ppid", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and process.info["ppid"] is not None:
            children.setdefault(process.info["ppid"], []).append(process)
    return children


def _below(pids: Iterable[int], children: dict[int, list[psutil.Process]]) -> set[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in found:
                found[child.pid] = child
                todo.append(child.pid)
    return set(found.values())


def descendants(pid: int) -> list[psutil.Process]:
    """Every live (non-zombie) process below ``pid``, ordered by pid; none when ``pid`` is gone."""
    return alive(_below([pid], _children_by_parent()))


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` itself (when alive) and its :func:`descendants`."""
    try:
        root = {psutil.Process(pid)}
    except psutil.Error:
        root = set()
    return alive(root | _below([pid], _children_by_parent()))


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has ``name=value`` (best effort, see the module's
    docstring). Never this process or one of its ancestors: a marker that leaked into the
    caller's own environment must not make a caller stop itself or its shell."""
    me = psutil.Process()
    spared = {me.pid, *(parent.pid for parent in me.parents())}
    found = []
    for process in psutil.process_iter():
        if process.pid in spared:
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(name) == value:
                found.append(process)
    return alive(found)


def command_line(process: psutil.Process | int) -> str:
    """The command line as ``ps`` shows it, or its title once it set one; "" when it is gone."""
    try:
        process = process if isinstance(process, psutil.Process) else psutil.Process(process)
        # setproctitle pads the title with empty arguments.
        return " ".join(part for part in process.cmdline() if part).strip()
    except psutil.Error:
        return ""


def signal_all(processes: Iterable[psutil.Process], sig: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def stop_processes(
    processes: Iterable[psutil.Process],
    *,
    timeout: float = 15.0,
    marker: tuple[str, str] | None = None,
    term_again_after: float | None = None,
    kill_now: Callable[[], bool] = lambda: False,
    on_kill: Callable[[list[psutil.Process]], None] = lambda _left: None,
    ignores_sigterm: Callable[[psutil.Process], bool] = lambda _process: False,
) -> list[psutil.Process]:
    """SIGTERM ``processes``, wait up to ``timeout`` seconds, then SIGKILL what is left.
    Returns the processes still alive after that (normally none).

    Children they start meanwhile, and, with ``marker=(name, value)``, every process carrying
    that environment variable, are stopped with them. ``term_again_after`` sends a second
    SIGTERM after that many seconds (an Airflow scheduler waits for its running tasks on the
    first one). ``kill_now()`` returning True skips the rest of the grace period (a second
    Ctrl-C). ``on_kill`` is told which processes are about to get SIGKILL. A process for
    which ``ignores_sigterm`` is true gets SIGKILL at once: waiting for it would only use up
    the grace period.
    """
    known = set(processes)

    def remaining() -> list[psutil.Process]:
        living = alive(known)
        found = set(living) | _below([p.pid for p in living], _children_by_parent())
        if marker is not None:
            found.update(processes_with_env(*marker))
        known.update(found)
        return alive(found)

    begin = time.monotonic()
    termed: set[psutil.Process] = set()
    term_again_at = None if term_again_after is None else begin + term_again_after
    while (left := remaining()) and time.monotonic() - begin < timeout and not kill_now():
        if term_again_at is not None and time.monotonic() >= term_again_at:
            termed.clear()
            term_again_at = None
        new = [p for p in left if p not in termed]  # all at first, then what was born since
        signal_all([p for p in new if ignores_sigterm(p)], signal.SIGKILL)
        signal_all([p for p in new if not ignores_sigterm(p)], signal.SIGTERM)
        termed.update(new)
        time.sleep(POLL_SECONDS)
    if left:
        on_kill(left)
    killed_at = time.monotonic()
    while (left := remaining()) and time.monotonic() - killed_at < KILL_WAIT_SECONDS:
        signal_all(left, signal.SIGKILL)
        time.sleep(POLL_SECONDS)
    return left


def stop_tree(pid: int, *, timeout: float = 15.0, marker: tuple[str, str] | None = None) -> None:
    """Stop ``pid`` and every process below it: SIGTERM, then SIGKILL what is left after
    ``timeout`` seconds; with ``marker=(name, value)`` also the processes carrying that
    environment variable (orphans that left the tree). See :func:`stop_processes`."""
    stop_processes(tree(pid), timeout=timeout, marker=marker)


def reap_children(keep: Collection[int] = ()) -> None:
    """Collect the exit status of this process's exited children, except the pids in ``keep``
    (children a ``subprocess.Popen`` waits for itself). A child subreaper inherits orphans it
    never started: without this they stay zombies until it exits."""
    for child in psutil.Process().children():
        if child.pid in keep:
            continue
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
