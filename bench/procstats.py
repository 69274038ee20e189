"""Sample the Airflow stack's processes: worker slots, waiting tasks, memory.

Linux only. Read through psutil where it gives the same figure (PSS, command line or title,
the machine's CPU times, the list of processes); from /proc where it cannot: each process's
``stat`` (:func:`read_proc`), its threads' children (:func:`_children_of`) and ``wchan``
(:func:`read_wchan`).
:class:`Sampler` is a thread that, every ``interval`` seconds,
reads the process table and classifies what it finds below a *root* process (the bench
runner; it is a child subreaper, so orphaned task processes stay below it too):

* **stack processes**: every live descendant of the root except the excluded subtrees (the
  rate-limited server). Their summed RSS (and, every few samples, PSS) is the stack's memory.
* **LocalExecutor workers**: processes titled ``airflow worker -- LocalExecutor: ...``
  (Airflow sets the title, see airflow/executors/local_executor.py). One worker is one
  slot; it is *busy* while its title is not ``... <idle>``, i.e. from the moment it takes a
  workload off the queue until the task's supervisor has reported the end state. That
  includes forking the task process, parsing the DAG file and every start-up cost.
  A task process keeps that title for a moment after the fork, so only a titled process
  whose parent is not titled counts as a worker.
* **task processes**: live children of busy workers (the task process the supervisor forks).
  A slot is *waiting* in a sample when its task process's main thread is blocked in a
  sleep system call (``/proc/<pid>/wchan`` names a ``*nanosleep`` kernel function): that is
  ``time.sleep``, which is how ``urllib3.util.Retry`` waits out ``Retry-After`` and how an
  operator waits in-process. Waiting for a response (socket reads), for the supervisor
  or for the disk is not counted.

Per phase (:meth:`Sampler.begin` .. :meth:`Sampler.end`) the sampler integrates with a
zero-order hold (each sample's state lasts until the next sample): busy slots x seconds,
waiting slots x seconds, and keeps the peaks. Given the stack's *components* (the pid each
one was started as, and its name), it also splits CPU time and RSS by component: each
process belongs to its nearest listed ancestor, except LocalExecutor workers and their task
processes, which form the component :data:`WORKERS` (they are the scheduler's children, but
their cost is the tasks', not the scheduler's). The resolution is ``interval``; a state
shorter than that may be missed or over-counted by up to one interval.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from scripts.process_tree import command_line

WORKER_TITLE_PREFIX = "airflow worker -- LocalExecutor"
IDLE_SUFFIX = "<idle>"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: PSS needs /proc/<pid>/smaps_rollup, which is costlier to read: do it every Nth sample.
PSS_EVERY = 5
ZOMBIE = psutil.STATUS_ZOMBIE
#: The component of LocalExecutor workers and everything below them (task processes).
WORKERS = "workers"
#: The component of stack processes below no listed component (e.g. an orphaned task process).
OTHER = "other"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    rss_bytes: int
    cpu_ticks: int  # utime + stime
    child_cpu_ticks: int = 0  # cutime + cstime: children this process has reaped


def read_process_table() -> dict[int, Proc]:
    """Every process of the machine (zombies included, with their state :data:`ZOMBIE`)."""
    table: dict[int, Proc] = {}
    for pid in psutil.pids():
        if (proc := read_proc(pid)) is not None:
            table[proc.pid] = proc
    return table


def read_proc(pid: int) -> Proc | None:
    """One process's /proc/<pid>/stat, or None when it is gone.

    Read from /proc, not psutil: psutil takes the RSS from /proc/<pid>/statm, the kernel's
    exact sum, while the RSS in /proc/<pid>/stat (which every earlier run of this benchmark
    reported) is its cheaper approximation; they differ by about 1%. One read per process
    and sample also keeps the sampler light.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("utf-8", "replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ")".
    fields = raw.rpartition(")")[2].split()
    try:
        return Proc(
            pid,
            int(fields[1]),
            ZOMBIE if fields[0] == "Z" else fields[0],
            int(fields[21]) * PAGE_SIZE,
            int(fields[11]) + int(fields[12]),
            int(fields[13]) + int(fields[14]),
        )
    except (IndexError, ValueError):
        return None


def _children_of(pid: int) -> list[int] | None:
    """Children of every thread of ``pid`` (Linux's /proc/<pid>/task/<tid>/children);
    None when the kernel does not provide that file.

    Read from /proc because psutil's ``children()`` reads the parent of every process of the
    machine at each call, which on a shared machine costs far more than this subtree."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                found.extend(int(child) for child in handle.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return None
        except (OSError, ValueError):
            continue
    return found


def read_subtree(root: int, exclude: set[int] = frozenset()) -> dict[int, Proc]:
    """``root`` and its descendants (zombies included), leaving out ``exclude`` and their
    subtrees. Reads only the processes of the subtree where the kernel lists children,
    which costs far less than a scan of every process on a shared machine."""
    subtree: dict[int, Proc] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        proc = read_proc(pid)
        if proc is None:
            continue
        subtree[pid] = proc
        children = _children_of(pid)
        if children is None:  # no children files: fall back to a full scan
            table = read_process_table()
            keep = {root, *live_descendants(table, root, exclude)}
            return {p: table[p] for p in keep if p in table} | {
                p: q for p, q in table.items() if q.state == ZOMBIE and q.ppid in keep and p not in exclude
            }
        todo.extend(child for child in children if child not in exclude and child not in subtree)
    return subtree


def children_map(table: dict[int, Proc]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for proc in table.values():
        children[proc.ppid].append(proc.pid)
    return children


def live_descendants(table: dict[int, Proc], root: int, exclude: set[int] = frozenset()) -> list[int]:
    """Non-zombie descendants of ``root``, leaving out ``exclude`` and everything below them."""
    children = children_map(table)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child in exclude:
                continue
            todo.append(child)
            if table[child].state != ZOMBIE:
                found.append(child)
    return found


def read_cmdline(pid: int) -> str:
    return command_line(pid)


def read_wchan(pid: int) -> str:
    """The kernel function the process's main thread is blocked in ("0" or "" when running).
    From /proc: psutil does not read ``wchan``."""
    try:
        with open(f"/proc/{pid}/wchan") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def read_pss_bytes(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_full_info().pss
    except (psutil.Error, OSError):
        return None


def read_system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    # Guest time is already counted in user.
    total = sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"))
    return total - idle, total


def is_sleep(wchan: str) -> bool:
    """True for the kernel functions a ``time.sleep`` blocks in (nanosleep/clock_nanosleep)."""
    return "nanosleep" in wchan


def component_of(table: dict[int, Proc], roots: dict[int, str], workers: set[int]) -> dict[int, str]:
    """Each process of ``table`` -> its component: :data:`WORKERS` for a worker and the
    processes below it, else the name in ``roots`` of its nearest ancestor there (itself
    included), else :data:`OTHER`."""
    found: dict[int, str] = {}
    for pid in table:
        chain: list[int] = []
        current: int | None = pid
        name = OTHER
        while current in table and len(chain) <= len(table):  # bounded, even on a ppid cycle
            if current in found:
                name = found[current]
                break
            if current in workers:
                name = WORKERS
                break
            if current in roots:
                name = roots[current]
                break
            chain.append(current)
            current = table[current].ppid
        for member in chain:
            found[member] = name
        found.setdefault(pid, name)  # a listed process or a worker itself
    return found


def cpu_ticks_by_component(
    before: dict[int, tuple[int, int, int]],
    after: dict[int, tuple[int, int, int]],
    component_before: dict[int, str],
    component_after: dict[int, str],
) -> dict[str, int]:
    """:func:`cpu_ticks_between`, per component (a process that ended keeps the component it
    had in ``before``)."""
    names = set(component_before.values()) | set(component_after.values())
    totals = {}
    for name in names:
        totals[name] = cpu_ticks_between(
            {pid: v for pid, v in before.items() if component_before.get(pid, OTHER) == name},
            {pid: v for pid, v in after.items() if component_after.get(pid, component_before.get(pid, OTHER)) == name},
        )
    return totals


def cpu_ticks_between(before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]]) -> int:
    """CPU ticks the processes used between two samples (``pid -> (own, reaped children, ppid)``).

    A process born since counts from 0. A child reaped since moved its whole CPU time into
    its parent's "reaped children" count; the part already counted while it was alive is
    taken off, so only its last interval is added (processes born and reaped between two
    samples are counted whole).
    """
    reaped: dict[int, int] = {}
    for pid, (own, kids, ppid) in before.items():
        if pid not in after:
            reaped[ppid] = reaped.get(ppid, 0) + own + kids
    total = 0
    for pid, (own, kids, _ppid) in after.items():
        previous = before.get(pid)
        if previous is None:
            total += own + kids
        else:
            total += max(0, own - previous[0]) + max(0, kids - previous[1] - reaped.get(pid, 0))
    return total


@dataclass
class Snapshot:
    """One sample of the stack."""

    at: float  # time.time()
    stack_pids: list[int]
    rss_bytes: int
    pss_bytes: int | None
    workers: int
    busy_workers: int
    waiting_slots: int
    task_pids: list[int]
    task_wchans: list[str]
    #: busy worker pid -> the workload in its title (for a task: the task instance's id)
    worker_workloads: dict[int, str]
    #: pid -> (own ticks, reaped children's ticks, ppid) for the stack's processes, zombies
    #: included (a zombie's final CPU time moves to its parent when it is reaped)
    cpu: dict[int, tuple[int, int, int]]
    system_cpu: tuple[float, float]  # (busy, total) seconds since boot
    loadavg_1m: float
    #: pid -> component (see :func:`component_of`) for ``cpu``'s processes; empty when the
    #: sampler was given no components
    components: dict[int, str] = field(default_factory=dict)
    #: component -> summed RSS of its live processes
    rss_bytes_by_component: dict[str, int] = field(default_factory=dict)


@dataclass
class PhaseStats:
    """What a phase looked like; every field is safe to put in JSON."""

    name: str
    started_at: float
    ended_at: float = 0.0
    samples: int = 0
    busy_slot_seconds: float = 0.0
    slot_seconds_waiting: float = 0.0
    peak_rss_mb: float = 0.0
    peak_pss_mb: float | None = None
    max_busy_slots: int = 0
    max_workers: int = 0
    max_stack_processes: int = 0
    task_processes_seen: int = 0
    max_sample_gap_s: float = 0.0
    #: CPU seconds used by the stack's processes (a process that exits between two samples
    #: loses its last interval), by the whole machine, and the mean 1-minute load average.
    stack_cpu_s: float = 0.0
    system_cpu_busy_s: float = 0.0
    system_cpu_total_s: float = 0.0
    loadavg_1m_mean: float = 0.0
    #: Seconds task processes spent blocked in each kernel function (top entries), so a
    #: reader can check what was, and was not, counted as waiting.
    task_wchan_seconds: dict[str, float] = field(default_factory=dict)
    #: CPU seconds and peak RSS of each component (when the sampler knows the components).
    cpu_s_by_component: dict[str, float] = field(default_factory=dict)
    peak_rss_mb_by_component: dict[str, float] = field(default_factory=dict)
    #: (workload id, epoch seconds) each time a worker was first seen running a workload
    #: (at most one sample interval late). Not in :meth:`as_dict`: one entry per launch.
    pickups: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "duration_s": round(self.ended_at - self.started_at, 3),
            "samples": self.samples,
            "busy_slot_seconds": round(self.busy_slot_seconds, 2),
            "slot_seconds_waiting": round(self.slot_seconds_waiting, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_pss_mb": None if self.peak_pss_mb is None else round(self.peak_pss_mb, 1),
            "max_busy_slots": self.max_busy_slots,
            "max_workers": self.max_workers,
            "max_stack_processes": self.max_stack_processes,
            "task_processes_seen": self.task_processes_seen,
            "max_sample_gap_s": round(self.max_sample_gap_s, 3),
            "stack_cpu_s": round(self.stack_cpu_s, 1),
            "system_cpu_busy_s": round(self.system_cpu_busy_s, 1),
            "system_cpu_busy_pct": (
                round(100 * self.system_cpu_busy_s / self.system_cpu_total_s, 1) if self.system_cpu_total_s else None
            ),
            "other_cpu_s": round(max(0.0, self.system_cpu_busy_s - self.stack_cpu_s), 1),
            "loadavg_1m_mean": round(self.loadavg_1m_mean, 2),
            "task_wchan_seconds": {k: round(v, 2) for k, v in self.task_wchan_seconds.items()},
            "cpu_s_by_component": {k: round(v, 2) for k, v in sorted(self.cpu_s_by_component.items())},
            "peak_rss_mb_by_component": {k: round(v, 1) for k, v in sorted(self.peak_rss_mb_by_component.items())},
        }


class Sampler(threading.Thread):
    """Samples the stack below ``root_pid`` every ``interval`` seconds until :meth:`stop`.

    ``exclude`` returns the pids whose subtrees are not part of the stack (read at every
    sample, so it may change); ``components``, when given, returns ``{pid: name}`` of the
    processes each component was started as, likewise. :attr:`latest` is the most recent
    :class:`Snapshot`.
    """

    def __init__(
        self,
        root_pid: int,
        exclude: Callable[[], set[int]],
        interval: float = 0.2,
        components: Callable[[], dict[int, str]] | None = None,
    ) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.root_pid = root_pid
        self.exclude = exclude
        self.components = components
        self.interval = interval
        self.latest: Snapshot | None = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._phase: PhaseStats | None = None
        self._phase_tasks: set[int] = set()
        self._wchan_seconds: collections.Counter[str] = collections.Counter()
        self._previous: Snapshot | None = None
        self._count = 0

    # -- public ---------------------------------------------------------------------------

    def begin(self, name: str) -> None:
        """Start integrating a new phase (ends any phase in progress, discarding it)."""
        with self._lock:
            self._phase = PhaseStats(name=name, started_at=time.time())
            self._phase_tasks = set()
            self._wchan_seconds = collections.Counter()

    def end(self) -> PhaseStats:
        """Stop integrating and return the phase's statistics."""
        with self._lock:
            phase, self._phase = self._phase, None
            if phase is None:
                raise RuntimeError("no phase in progress")
            phase.ended_at = time.time()
            phase.task_processes_seen = len(self._phase_tasks)
            phase.task_wchan_seconds = dict(self._wchan_seconds.most_common(8))
            return phase

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                self._record(self.sample())
            except Exception:  # noqa: BLE001 - a sampler hiccup must not end the benchmark
                pass
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def sample(self) -> Snapshot:
        self._count += 1
        table = read_subtree(self.root_pid, set(self.exclude()))
        stack = live_descendants(table, self.root_pid)
        children = children_map(table)
        workers = busy = waiting = 0
        worker_pids: set[int] = set()
        workloads: dict[int, str] = {}
        task_pids: list[int] = []
        task_wchans: list[str] = []
        titles = {pid: read_cmdline(pid) for pid in stack}
        for pid in stack:
            title = titles[pid]
            # A task process keeps its worker's title until the task runner renames it, so a
            # worker is a titled process whose parent (the scheduler) is not titled.
            parent_title = titles.get(table[pid].ppid, "")
            if not title.startswith(WORKER_TITLE_PREFIX) or parent_title.startswith(WORKER_TITLE_PREFIX):
                continue
            workers += 1
            worker_pids.add(pid)
            if title.endswith(IDLE_SUFFIX):
                continue
            busy += 1
            workloads[pid] = title.rpartition(" ")[2]
            slot_waiting = False
            for child in children.get(pid, []):
                if table[child].state == ZOMBIE:
                    continue
                wchan = read_wchan(child)
                task_pids.append(child)
                task_wchans.append(wchan or "running")
                slot_waiting = slot_waiting or is_sleep(wchan)
            waiting += slot_waiting
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        pss = None
        if self._count % PSS_EVERY == 1:
            values = [read_pss_bytes(pid) for pid in stack]
            pss = sum(v for v in values if v is not None)
        components: dict[int, str] = {}
        rss_by_component: dict[str, int] = collections.Counter()
        if self.components is not None:
            cpu_table = {pid: proc for pid, proc in table.items() if pid != self.root_pid}
            components = component_of(cpu_table, self.components(), worker_pids)
            for pid in stack:
                rss_by_component[components.get(pid, OTHER)] += table[pid].rss_bytes
        return Snapshot(
            at=time.time(),
            stack_pids=stack,
            rss_bytes=sum(table[pid].rss_bytes for pid in stack),
            pss_bytes=pss,
            workers=workers,
            busy_workers=busy,
            waiting_slots=waiting,
            task_pids=task_pids,
            task_wchans=task_wchans,
            worker_workloads=workloads,
            cpu={
                pid: (proc.cpu_ticks, proc.child_cpu_ticks, proc.ppid)
                for pid, proc in table.items()
                if pid != self.root_pid
            },
            system_cpu=read_system_cpu(),
            loadavg_1m=load,
            components=components,
            rss_bytes_by_component=dict(rss_by_component),
        )

    # -- internals ------------------------------------------------------------------------

    def _record(self, snap: Snapshot) -> None:
        with self._lock:
            previous, self._previous, self.latest = self._previous, snap, snap
            phase = self._phase
            if phase is None:
                return
            phase.samples += 1
            # Running mean of the load average over the phase's samples.
            phase.loadavg_1m_mean += (snap.loadavg_1m - phase.loadavg_1m_mean) / phase.samples
            phase.peak_rss_mb = max(phase.peak_rss_mb, snap.rss_bytes / 2**20)
            if snap.pss_bytes is not None:
                phase.peak_pss_mb = max(phase.peak_pss_mb or 0.0, snap.pss_bytes / 2**20)
            for name, rss in snap.rss_bytes_by_component.items():
                peak = phase.peak_rss_mb_by_component.get(name, 0.0)
                phase.peak_rss_mb_by_component[name] = max(peak, rss / 2**20)
            phase.max_busy_slots = max(phase.max_busy_slots, snap.busy_workers)
            phase.max_workers = max(phase.max_workers, snap.workers)
            phase.max_stack_processes = max(phase.max_stack_processes, len(snap.stack_pids))
            self._phase_tasks.update(snap.task_pids)
            for pid, workload in snap.worker_workloads.items():
                if previous is None or previous.worker_workloads.get(pid) != workload:
                    phase.pickups.append((workload, snap.at))
            if previous is None or previous.at < phase.started_at:
                return  # the first sample of a phase only opens the first interval
            # Zero-order hold: the previous sample's state lasted until this one.
            dt = snap.at - previous.at
            phase.max_sample_gap_s = max(phase.max_sample_gap_s, dt)
            phase.busy_slot_seconds += previous.busy_workers * dt
            phase.stack_cpu_s += cpu_ticks_between(previous.cpu, snap.cpu) / CLOCK_TICKS
            if snap.components:
                by_component = cpu_ticks_by_component(previous.cpu, snap.cpu, previous.components, snap.components)
                for name, ticks in by_component.items():
                    spent = phase.cpu_s_by_component.get(name, 0.0)
                    phase.cpu_s_by_component[name] = spent + ticks / CLOCK_TICKS
            phase.system_cpu_busy_s += snap.system_cpu[0] - previous.system_cpu[0]
            phase.system_cpu_total_s += snap.system_cpu[1] - previous.system_cpu[1]
            phase.slot_seconds_waiting += previous.waiting_slots * dt
            for wchan in previous.task_wchans:
                self._wchan_seconds[wchan] += dt
