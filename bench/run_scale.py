#!/usr/bin/env python3
"""``make bench-scale``: how the cost of N rate-limited requests through Airflow grows with N.

Issue 12, item 2. For each N in ``--sizes`` (60, 600, 3,000) and each strategy of
:data:`STRATEGIES`, on a FRESH Airflow stack each time (the same stack as ``make bench``:
``bench/run_bench.py``'s :class:`~bench.run_bench.Stack` and :class:`~bench.run_bench.Bench`,
LocalExecutor with 4 slots, ``[workers] min_heartbeat_interval = 1``, SQLite), it sends N
GET requests to the token-bucket API at 10 requests/s (ideal makespan N / 10 s) and records
makespan / ideal, worker-slot-seconds per request, CPU-seconds per request of each component,
gate store requests per request, 429s, early requests, peak RSS (stack, per component) and
failures. ``[core] max_map_length`` is raised to the largest N (Airflow's default, 1,024,
would refuse 3,000 mapped task instances).

Run it with the project's venv Python::

    .venv/bin/python bench/run_scale.py                                  # what make bench-scale runs
    .venv/bin/python bench/run_scale.py --sizes 60 --strategies urllib3_retry

It writes ``--out`` (``bench/scale.json``; its shape is in bench/README.md) after every run,
and at the end a plot next to it (``bench/scale.png``; matplotlib, from requirements-bench.txt).
Everything stops by itself: each run is bounded by ``--timeout-per-request`` x N (at least
``--min-timeout``), the stack is stopped after each run, also on error, Ctrl-C or SIGTERM (a
second signal kills at once). Traffic goes to 127.0.0.1 only. Exit status: 0 when every
run that was not skipped finished, 1 when one timed out or failed, 2 on bad arguments, 130
when interrupted.

**Adding a strategy** (the batch mode, when ``network_requests.batch`` exists): one entry in
:data:`STRATEGIES` and a DAG ``bench_<name>`` in ``bench/dags/`` that sends ``BENCH_TASKS``
requests to ``/bench/items/<i>`` through the ``bench_api`` Connection. The ``batch_operator``
entry and its DAG file (``bench/dags/bench_batch_operator.py``) are already there; the runner
skips the strategy, and says why, while its module is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.machinery
import os
import platform
import shlex
import signal
import sqlite3
import sys
import time
import urllib.parse
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import run_bench  # noqa: E402
from bench.probes.airflow_local_settings import LOG_ENV as VARIABLE_LOG_ENV  # noqa: E402
from bench.run_bench import Bench, BenchError, Interrupted, Stack, log, shown_path, write_json  # noqa: E402
from scripts import process_tree  # noqa: E402

PROBE_DIR = BENCH_DIR / "probes"
SHAPE = "token_bucket"
DEFAULT_SIZES = (60, 600, 3000)
#: Where a gate's Variable lives: ``network_requests.gate_store.VARIABLE_PREFIX`` (not imported:
#: the package's ``__init__`` imports Airflow, which this runner keeps out of its own process;
#: tests/bench/test_bench_scale_smoke.py checks that the two agree).
GATE_VARIABLE_PREFIX = "network_requests.gate."
#: The components whose CPU is the deployment's overhead (the workers' is the tasks' own).
CONTROL_PLANE = ("scheduler", "triggerer", "api-server", "dag-processor")
#: The components that serve execution-API Variable requests (tasks through the API server,
#: triggers through the triggerer's in-process API): the probe runs in these.
PROBED_COMPONENTS = ("api-server", "triggerer")
AIRFLOW_DEFAULT_MAX_MAP_LENGTH = 1024
#: ``--gate-store redis``: the Connection id the stack reaches Redis by, and where the gates
#: live there (``network_requests.gate_store.REDIS_KEY_PREFIX``), cleared before every run.
BENCH_REDIS_CONN_ID = "bench_redis"
REDIS_GATE_KEYS = "network_requests:gate:*"


@dataclass(frozen=True)
class Strategy:
    """One way to send the N requests: the DAG ``bench_<name>`` in bench/dags/."""

    name: str
    summary: str
    #: The strategy is run at N up to this only (it is known not to get further).
    max_requests: int | None = None
    #: A module (under plugins/) the strategy needs; skipped with a message while it is missing.
    needs_module: str | None = None

    @property
    def dag_id(self) -> str:
        return f"bench_{self.name}"  # what run_bench.Bench.run_strategy triggers

    def skip_reason(self, n: int) -> str | None:
        """Why the strategy is not run at N requests, or None."""
        if self.needs_module and not module_exists(self.needs_module):
            return f"{self.needs_module} does not exist yet (issue 12 item 1): {self.name} is registered but not measured"
        if self.max_requests is not None and n > self.max_requests:
            return f"run at N <= {self.max_requests} only"
        return None


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("network_request_operator", "NetworkRequestOperator.partial().expand(): one mapped task per request"),
        Strategy(
            "batch_operator",
            "the batch mode: one task sends the whole list, paced by the shared gate, waiting in the triggerer",
            needs_module="network_requests.batch",
        ),
        Strategy("urllib3_retry", "@task.expand() with requests + urllib3 Retry(respect_retry_after_header=True)"),
        Strategy("http_operator", "stock HttpOperator.partial().expand(): a 429 fails the try", max_requests=600),
    )
}

#: Keys of every row of scale.json's ``runs`` (None where a run did not get that far).
ROW_KEYS = (
    "strategy",
    "requests",
    "status",
    "note",
    "ideal_makespan_s",
    "makespan_s",
    "makespan_over_ideal",
    "makespan_over_ideal_at_least",
    "dagrun_duration_s",
    "busy_slot_seconds",
    "slot_seconds_per_request",
    "task_process_launches",
    "cpu_s_by_component",
    "cpu_s_per_request_by_component",
    "control_plane_cpu_s_per_request",
    "cpu_cores_by_component",
    "slot_utilization",
    "gate_store_requests",
    "gate_store_requests_total",
    "gate_store_requests_per_request",
    "other_variable_requests",
    "responses_429",
    "early_requests",
    "early_requests_own",
    "peak_rss_mb",
    "peak_rss_mb_by_component",
    "peak_rss_triggerer_mb",
    "successes",
    "failures",
    "unfinished",
    "extra_tries",
    "run_wall_time_s",
    "details",
)
STATUSES = ("finished", "timed_out", "error", "skipped")


def module_exists(dotted: str) -> bool:
    """Whether ``plugins/<dotted path>`` is a module or package, found without importing its
    parent package (``network_requests/__init__`` imports Airflow)."""
    *parents, name = dotted.split(".")
    return importlib.machinery.PathFinder.find_spec(name, [str(REPO.joinpath("plugins", *parents))]) is not None


# --------------------------------------------------------------------------
# Counting the gate store's requests.
# --------------------------------------------------------------------------


def count_variable_requests(lines: Iterable[str], prefix: str = GATE_VARIABLE_PREFIX) -> tuple[Counter, Counter]:
    """From the probe's lines (``"GET <key>"``, ``"PUT <key>"``, ``"DELETE <key>"``): the gate
    Variables' requests by method, and the other Variables' requests by key."""
    gate: Counter = Counter()
    other: Counter = Counter()
    for line in lines:
        method, _, key = line.strip().partition(" ")
        if not method:
            continue
        if key.startswith(prefix):
            gate[method] += 1
        else:
            other[key] += 1
    return gate, other


class VariableRequestLogs:
    """The probe's files (bench/probes/airflow_local_settings.py), one per probed component."""

    def __init__(self, log_dir: Path) -> None:
        self.paths = {name: log_dir / f"variable-requests-{name}.log" for name in PROBED_COMPONENTS}

    def mark(self) -> dict[str, int]:
        """Where each file ends now."""
        return {name: path.stat().st_size if path.exists() else 0 for name, path in self.paths.items()}

    def since(self, marks: dict[str, int]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """Gate Variable requests per component and method since ``marks``, and the other
        Variables' requests by key."""
        by_component: dict[str, dict[str, int]] = {}
        other_total: Counter = Counter()
        for name, path in self.paths.items():
            lines: list[str] = []
            if path.exists():
                with open(path, "rb") as handle:
                    handle.seek(marks.get(name, 0))
                    lines = handle.read().decode("utf-8", "replace").splitlines()
            gate, other = count_variable_requests(lines)
            by_component[name] = {method: gate.get(method, 0) for method in ("GET", "PUT", "DELETE")}
            other_total.update(other)
        return by_component, dict(sorted(other_total.items()))


class ScaleStack(Stack):
    """``make bench``'s stack, with the Variable-request probe in the API server and the triggerer."""

    def __init__(self, args: argparse.Namespace, run_dir: Path, redis_url: str | None = None) -> None:
        super().__init__(args, run_dir)
        self.variable_requests = VariableRequestLogs(self.log_dir)
        self.redis_url = redis_url

    def airflow_env(self) -> dict[str, str]:
        env = super().airflow_env()
        if self.redis_url:  # the Redis gate store (docs/distributed.md) on this one-host stack
            env["AIRFLOW__NETWORK_REQUESTS__GATE_STORE"] = "redis"
            env["AIRFLOW__NETWORK_REQUESTS__REDIS_CONN_ID"] = BENCH_REDIS_CONN_ID
            env[f"AIRFLOW_CONN_{BENCH_REDIS_CONN_ID.upper()}"] = airflow_redis_uri(self.redis_url)
        return env

    def component_env(self, name: str) -> dict[str, str]:
        if name not in PROBED_COMPONENTS:
            return self.env
        return {
            **self.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROBE_DIR), self.env.get("PYTHONPATH")])),
            VARIABLE_LOG_ENV: str(self.variable_requests.paths[name]),
        }


# --------------------------------------------------------------------------
# One run: a fresh stack, one strategy, N requests.
# --------------------------------------------------------------------------


class SignalGuard:
    """The first SIGINT/SIGTERM/SIGHUP raises :class:`Interrupted` (after the stack being
    stopped, if one is); any signal during a stop, or a second one, makes it kill at once."""

    def __init__(self) -> None:
        self.stack: Stack | None = None
        self.stopping = False
        self.received: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self)

    def __call__(self, signum: int, _frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first and not self.stopping:
            raise Interrupted(self.received)
        if self.stack is not None:
            self.stack.force_kill = True

    def raise_if_received(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)


def timeout_for(n: int, options: argparse.Namespace) -> float:
    return max(options.min_timeout, options.timeout_per_request * n)


def stack_args(options: argparse.Namespace, strategy: Strategy, n: int) -> argparse.Namespace:
    """``run_bench``'s arguments for one run (its parser supplies every default it needs)."""
    argv = [
        "--tasks", str(n), "--rate", str(options.rate), "--burst", str(options.burst),
        "--parallelism", str(options.parallelism), "--shape", SHAPE,
        "--timeout", str(timeout_for(n, options)), "--startup-timeout", str(options.startup_timeout),
        "--idle-seconds", str(options.idle_seconds), "--sample-interval", str(options.sample_interval),
        "--warmup" if options.warmup else "--no-warmup",
        "--airflow-setting", f"core__max_map_length={options.max_map_length}",
    ]  # fmt: skip
    for setting in options.airflow_setting:
        argv += ["--airflow-setting", setting]
    args = run_bench.parse_args(argv)
    args.strategies = [strategy.name]  # run_bench's parser knows only its own three
    return args


def measure(strategy: Strategy, n: int, options: argparse.Namespace, run_dir: Path, guard: SignalGuard) -> dict[str, Any]:
    """Start a fresh stack, run ``strategy`` with N requests, stop the stack; one row."""
    args = stack_args(options, strategy, n)
    redis_url = options.redis_url if options.gate_store == "redis" else None
    if redis_url:
        clear_redis_gates(redis_url)
    stack = ScaleStack(args, run_dir, redis_url=redis_url)
    bench = Bench(args, stack)
    started = time.monotonic()
    metrics: dict[str, Any] | None = None
    gate_requests: dict[str, dict[str, int]] | None = None
    other_requests: dict[str, int] | None = None
    idle: dict[str, Any] = {}
    error: str | None = None
    guard.stack = stack
    try:
        idle = bench.start()
        marks = stack.variable_requests.mark()
        metrics = bench.run_strategy(SHAPE, strategy.name)
        gate_requests, other_requests = stack.variable_requests.since(marks)
    except BenchError as exc:
        log(f"{strategy.name} N={n}: {exc}")
        error = str(exc)
    finally:
        guard.stopping = True
        if bench.sampler is not None:
            bench.sampler.stop()
        stack.stop()
        guard.stopping = False
        guard.stack = None
    # What only the stopped stack's database and logs tell (as run_bench does after its run).
    with contextlib.suppress(sqlite3.Error, ValueError):
        run_bench.add_reschedule_latency(stack.home / "airflow.db", bench.finished_runs)
    with contextlib.suppress(OSError):
        run_bench.add_scheduler_log_counts(stack.log_dir / "scheduler.log", bench.finished_runs)
    settings: dict[str, Any] = {}
    with contextlib.suppress(sqlite3.Error, KeyError, IndexError, ValueError, zlib.error):
        settings = run_bench.task_settings(stack.home / "airflow.db", [strategy.name])
    guard.raise_if_received()
    return make_row(
        strategy, n, options.rate, options.parallelism, metrics, gate_requests, other_requests,
        error=error, problems=bench.problems, idle=idle, task_settings=settings.get(strategy.name),
        wall_s=time.monotonic() - started, run_dir=run_dir, timeout_s=timeout_for(n, options),
    )  # fmt: skip


def airflow_redis_uri(url: str) -> str:
    """``redis://host:port/<db>`` (redis-py's form) as an Airflow Connection URI: the Redis
    provider's hook reads the database from the extra (``?db=``), not from the path."""
    parts = urllib.parse.urlsplit(url)
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"--redis-url: the database must be a number, got {url!r}")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/", f"db={db}", ""))


def clear_redis_gates(url: str) -> int:
    """Delete every gate in the Redis database at ``url``: each run starts with none, as with
    the Variable store (whose Variables are deleted before each strategy)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(REDIS_GATE_KEYS, count=1000))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()


def per_request(value: float | None, n: int, digits: int = 4) -> float | None:
    return None if value is None else round(value / n, digits)


def skipped_row(strategy: Strategy, n: int, rate: float, reason: str) -> dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(strategy=strategy.name, requests=n, status="skipped", note=reason, ideal_makespan_s=round(n / rate, 3))
    return row


def make_row(
    strategy: Strategy,
    n: int,
    rate: float,
    parallelism: int,
    metrics: dict[str, Any] | None,
    gate_requests: dict[str, dict[str, int]] | None,
    other_requests: dict[str, int] | None,
    *,
    error: str | None,
    problems: list[str],
    idle: dict[str, Any],
    task_settings: Any,
    wall_s: float,
    run_dir: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """One row of scale.json's ``runs`` from run_bench's metrics of the run (None: it failed before)."""
    ideal = n / rate
    row = dict.fromkeys(ROW_KEYS)
    row.update(strategy=strategy.name, requests=n, ideal_makespan_s=round(ideal, 3), run_wall_time_s=round(wall_s, 1))
    notes = [error] if error else []
    notes += [p for p in problems if p != error]
    if metrics is None:
        row.update(status="error", note="; ".join(notes) or None, details={"idle": idle, "run_dir": shown_path(run_dir)})
        return row
    cpu = metrics.get("cpu_s_by_component") or {}
    rss = metrics.get("peak_rss_mb_by_component") or {}
    timed_out = bool(metrics.get("timed_out"))
    makespan = metrics.get("makespan_s")
    partial_makespan = metrics.get("last_success_after_first_request_s")
    window = metrics.get("measured_window_s")  # trigger -> slots idle again
    gate_total = None if gate_requests is None else sum(sum(c.values()) for c in gate_requests.values())
    if timed_out:
        notes.insert(0, f"timed out after {timeout_s:.0f} s; makespan at least the time to the timeout")
    row.update(
        status="timed_out" if timed_out else "finished",
        note="; ".join(notes) or None,
        makespan_s=makespan,
        makespan_over_ideal=None if makespan is None else round(makespan / ideal, 3),
        makespan_over_ideal_at_least=(
            round(at_least_makespan(metrics, timeout_s) / ideal, 3) if timed_out else None
        ),
        dagrun_duration_s=metrics.get("dagrun_duration_s"),
        busy_slot_seconds=metrics.get("busy_slot_seconds"),
        slot_seconds_per_request=per_request(metrics.get("busy_slot_seconds"), n),
        task_process_launches=metrics.get("task_process_launches"),
        cpu_s_by_component=cpu,
        cpu_s_per_request_by_component={name: per_request(value, n) for name, value in cpu.items()},
        control_plane_cpu_s_per_request=per_request(sum(cpu.get(name, 0.0) for name in CONTROL_PLANE), n),
        cpu_cores_by_component={name: per_request(value, window, 3) for name, value in cpu.items()} if window else None,
        slot_utilization=per_request(metrics.get("busy_slot_seconds"), parallelism * window, 3) if window else None,
        gate_store_requests=gate_requests,
        gate_store_requests_total=gate_total,
        gate_store_requests_per_request=per_request(gate_total, n, 3),
        other_variable_requests=other_requests,
        responses_429=metrics.get("responses_429"),
        early_requests=metrics.get("early_requests"),
        early_requests_own=metrics.get("early_requests_own"),
        peak_rss_mb=metrics.get("peak_rss_mb"),
        peak_rss_mb_by_component=rss,
        peak_rss_triggerer_mb=rss.get("triggerer"),
        successes=metrics.get("successes"),
        failures=metrics.get("failures"),
        unfinished=metrics.get("unfinished"),
        extra_tries=metrics.get("extra_tries"),
        details={
            **metrics,
            "partial_makespan_s": partial_makespan,
            "idle": idle,
            "task_settings": task_settings,
            "run_dir": shown_path(run_dir),
        },
    )
    return row


def at_least_makespan(metrics: dict[str, Any], timeout_s: float) -> float:
    """A run cut at the timeout took at least the time from its first request to the timeout."""
    first_after_start = metrics.get("first_request_after_run_start_s") or 0.0
    return max(timeout_s - first_after_start, metrics.get("last_success_after_first_request_s") or 0.0)


# --------------------------------------------------------------------------
# Output: the table and the plot.
# --------------------------------------------------------------------------


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(results: dict[str, Any]) -> str:
    """The runs as a Markdown table (for the terminal and for bench/README.md)."""
    head = (
        "| strategy | N | makespan / ideal | slot-s / request | CPU-s / request: scheduler · triggerer · "
        "API server · dag-processor | gate store requests / request | 429s | early | peak RSS MB: stack · "
        "triggerer | failed (extra tries) | status |"
    )
    lines = [head, "|" + "---|" * 12]
    store = results.get("config", {}).get("gate_store", "variable")
    for row in results["runs"]:
        per = row["cpu_s_per_request_by_component"] or {}
        ratio = row["makespan_over_ideal"]
        ratio_text = _cell(ratio) if ratio is not None else (
            f"≥ {row['makespan_over_ideal_at_least']:.2f}" if row["makespan_over_ideal_at_least"] else "–"
        )
        cpu = " · ".join(_cell(per.get(name), 3) for name in CONTROL_PLANE) if per else "–"
        rss = f"{_cell(row['peak_rss_mb'], 0)} · {_cell(row['peak_rss_triggerer_mb'], 0)}" if row["peak_rss_mb"] else "–"
        status = row["status"] if row["status"] != "skipped" else f"skipped: {row['note']}"
        failed = "–" if row["failures"] is None else f"{row['failures']} ({_cell(row['extra_tries'])})"
        # The probe counts the Variable store's requests only: the Redis store's are not counted.
        label, gate_cell = (row["strategy"], _cell(row["gate_store_requests_per_request"])) if store == "variable" \
            else (f"{row['strategy']} ({store} store)", "not counted")
        lines.append(
            f"| {label} | {row['requests']} | {ratio_text} | {_cell(row['slot_seconds_per_request'])} | "
            f"{cpu} | {gate_cell} | {_cell(row['responses_429'])} | "
            f"{_cell(row['early_requests'])} | {rss} | {failed} | {status} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Write the plot (makespan / ideal and slot-seconds per request against N, one line per
    strategy); returns why not when it could not."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (make bench-scale installs requirements-bench.txt)"
    figure, (ratio_axes, slot_axes) = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (
        (ratio_axes, "makespan_over_ideal", "makespan / ideal (N / rate)"),
        (slot_axes, "slot_seconds_per_request", "worker-slot-seconds per request"),
    )
    not_measured = []
    for name in results["strategies"]:
        rows = sorted((r for r in results["runs"] if r["strategy"] == name), key=lambda r: r["requests"])
        if not any(r["status"] in ("finished", "timed_out") for r in rows):
            not_measured.append(name)
            continue
        for axes, key, _ in panels:
            points = [(r["requests"], r[key]) for r in rows if r[key] is not None]
            (line,) = axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            if key == "makespan_over_ideal":  # a run cut at its timeout: a lower bound, hollow
                bounds = [(r["requests"], r["makespan_over_ideal_at_least"]) for r in rows if r["makespan_over_ideal_at_least"]]
                if bounds:
                    axes.plot([b[0] for b in bounds], [b[1] for b in bounds], linestyle="none", marker="^",
                              markerfacecolor="none", color=line.get_color())  # fmt: skip
    sizes = sorted({r["requests"] for r in results["runs"]})
    for axes, _, title in panels:
        axes.set_xscale("log")
        axes.set_xticks(sizes, [f"{n:,}" for n in sizes])
        axes.minorticks_off()
        axes.set_xlabel("N requests (log)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.set_ylim(0, axes.get_ylim()[1] * 1.6)  # room above the highest point for the legend
    ratio_axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    handles, labels = ratio_axes.get_legend_handles_labels()
    if handles:
        ratio_axes.legend(handles, labels, fontsize="small", loc="upper left")
    config = results["config"]
    figure.suptitle(
        f"N GET requests at {config['rate_per_s']:g}/s (token bucket), LocalExecutor with {config['parallelism']} slots, "
        f"SQLite; a fresh stack per run",
        fontsize="medium",
    )
    if not_measured:
        figure.text(0.01, 0.01, "not measured: " + ", ".join(not_measured), fontsize="small", color="grey")
    figure.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="How the cost of N rate-limited requests through Airflow grows with N (issue 12).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated N values")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES),
        help=f"comma-separated, run in this order at each N; any of {', '.join(STRATEGIES)}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "scale.json", help="results; the plot goes next to it (.png)")
    parser.add_argument("--rate", type=float, default=10.0, help="token bucket: requests per second")
    parser.add_argument("--burst", type=int, default=10, help="token bucket: capacity (one second of tokens)")
    parser.add_argument("--parallelism", type=int, default=4, help="LocalExecutor worker slots (make run's value)")
    parser.add_argument(
        "--timeout-per-request", type=float, default=1.0,
        help="a run may take this many seconds per request (at least --min-timeout), then it is cut",
    )  # fmt: skip
    parser.add_argument("--min-timeout", type=float, default=300, help="seconds any run may take")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds for a stack to come up")
    parser.add_argument("--idle-seconds", type=float, default=5, help="how long each fresh stack is measured idle")
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True,
        help="run bench_warmup (no requests) on each stack before its strategy",
    )  # fmt: skip
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between /proc samples")
    parser.add_argument(
        "--airflow-setting", action="append", default=[], metavar="SECTION__KEY=VALUE",
        help="extra Airflow setting for every stack (repeatable)",
    )  # fmt: skip
    parser.add_argument("--run-dir", type=Path, help="one sub-folder per run goes here (default bench/runs/scale-<stamp>)")
    parser.add_argument(
        "--gate-store", choices=("variable", "redis"), default="variable",
        help="where the shared gates live: make run's Variable store, or the Redis store (docs/distributed.md)",
    )  # fmt: skip
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/15",
        help="with --gate-store redis: the Redis database (its gate keys are deleted before each run)",
    )  # fmt: skip
    options = parser.parse_args(argv)

    try:
        options.sizes = [int(s) for s in options.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: whole numbers expected, got {options.sizes!r}")
    if not options.sizes or min(options.sizes) < 1:
        parser.error("--sizes: at least one N, each >= 1")
    options.strategies = [s.strip() for s in options.strategies.split(",") if s.strip()]
    unknown = [s for s in options.strategies if s not in STRATEGIES]
    if unknown or not options.strategies:
        parser.error(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    if not options.rate > 0 or options.burst < 1 or options.parallelism < 1:
        parser.error("--rate must be > 0, --burst and --parallelism >= 1")
    if not (options.timeout_per_request > 0 and options.min_timeout > 0):
        parser.error("--timeout-per-request and --min-timeout must be > 0")
    options.max_map_length = max(AIRFLOW_DEFAULT_MAX_MAP_LENGTH, max(options.sizes))
    return options


def new_results(options: argparse.Namespace, started_at: dt.datetime, run_dir: Path) -> dict[str, Any]:
    return {
        "benchmark": "scale (issue 12)",
        "sizes": options.sizes,
        "strategies": {
            name: {"summary": STRATEGIES[name].summary, "dag_id": STRATEGIES[name].dag_id,
                   "max_requests": STRATEGIES[name].max_requests, "needs_module": STRATEGIES[name].needs_module}
            for name in options.strategies
        },  # fmt: skip
        "runs": [],
        "complete": False,
        "problems": [],
        "plot": None,
        "config": {
            "shape": SHAPE,
            "rate_per_s": options.rate,
            "burst": options.burst,
            "parallelism": options.parallelism,
            "executor": "LocalExecutor",
            "database": "sqlite",
            "gate_store": options.gate_store,
            "fresh_stack_per_run": True,
            "airflow_settings": {
                "core__max_map_length": options.max_map_length,
                "workers__min_heartbeat_interval": 1,
                "workers__max_failed_heartbeats": 15,
                **dict(s.partition("=")[::2] for s in options.airflow_setting),
            },
            "timeout_per_request_s": options.timeout_per_request,
            "min_timeout_s": options.min_timeout,
            "warmup": options.warmup,
            "idle_seconds": options.idle_seconds,
            "sample_interval_s": options.sample_interval,
        },
        "environment": {
            **run_bench.source_fingerprint(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_time_s": None,
        "run_dir": shown_path(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    wall_started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    base_dir = (options.run_dir or BENCH_DIR / "runs" / f"scale-{started_at.strftime('%Y%m%d-%H%M%S')}").resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    process_tree.become_subreaper()  # orphaned task processes stay below us, to be stopped
    guard = SignalGuard()
    guard.install()
    results = new_results(options, started_at, base_dir)
    code = 0

    def save() -> None:
        results["wall_time_s"] = round(time.monotonic() - wall_started, 1)
        results["environment"]["loadavg_at_end"] = list(os.getloadavg())
        write_json(options.out, results)

    try:
        for n in options.sizes:
            for name in options.strategies:
                strategy = STRATEGIES[name]
                reason = strategy.skip_reason(n)
                if reason is not None:
                    log(f"{name} N={n}: skipped: {reason}")
                    results["runs"].append(skipped_row(strategy, n, options.rate, reason))
                    continue
                log(f"{name} N={n}: a fresh stack; ideal makespan {n / options.rate:g} s, cut after {timeout_for(n, options):.0f} s")
                code_before = run_bench.source_fingerprint()
                row = measure(strategy, n, options, base_dir / f"{name}-{n}", guard)
                code_after = run_bench.source_fingerprint()
                # Task processes import the plugin afresh at every launch: a change during the
                # run mixes two versions (the tree is shared with other engineers' edits).
                row["details"].update(
                    operator_package_sha256=code_before["operator_package_sha256"],
                    plugins_uncommitted=code_before["plugins_uncommitted"],
                    operator_changed_during_run=code_before["operator_package_sha256"] != code_after["operator_package_sha256"],
                )
                results["runs"].append(row)
                if row["status"] != "finished":
                    code = 1
                    results["problems"].append(f"{name} N={n}: {row['status']}: {row['note']}")
                log(
                    f"{name} N={n}: {row['status']}, makespan/ideal {_cell(row['makespan_over_ideal'])}, "
                    f"{_cell(row['slot_seconds_per_request'])} slot-s/request, {_cell(row['failures'])} failed, "
                    f"{_cell(row['run_wall_time_s'], 0)} s of wall time"
                )
                save()
        guard.stopping = True  # from here on a signal interrupts nothing: the plot is quick
    except Interrupted as stop:
        log(f"{stop}: stopped")
        results["problems"].append(f"interrupted by {stop}")
        code = 130
    except Exception as error:  # noqa: BLE001 - write what we have
        log(f"unexpected error: {error!r}")
        results["problems"].append(f"unexpected error: {error!r}")
        code = 1
    results["complete"] = code == 0
    plot_path = options.out.with_suffix(".png")
    why_not = plot(results, plot_path)
    results["plot"] = plot_path.name if why_not is None else None
    if why_not:
        results["problems"].append(f"no plot: {why_not}")
        log(f"no plot: {why_not}")
    save()
    print("\n" + format_table(results), flush=True)
    log(f"wrote {options.out}{'' if why_not else f' and {plot_path}'} in {results['wall_time_s']} s of wall time")
    return code


if __name__ == "__main__":
    sys.exit(main())
