"""The issue-3 benchmark: its scoring rules, and one tiny end-to-end run (N=4).

The end-to-end test runs ``bench/run_bench.py`` exactly as ``make bench`` does (a real
scheduler, LocalExecutor, SQLite, triggerer, API server), only smaller, and checks the
results file's contract, that every request was served, that the NetworkRequestOperator
never sent before the server told it to, and that nothing the runner started is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import rate_limited_server  # noqa: E402
from bench.rate_limited_server import (  # noqa: E402
    FixedWindowLimiter,
    LimiterConfig,
    Recorder,
    TokenBucketLimiter,
    percentile,
    summarize,
)
from scripts.process_tree import processes_with_env  # noqa: E402

RUNNER = REPO / "bench" / "run_bench.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
STRATEGIES = ("network_request_operator", "http_operator", "urllib3_retry")
REQUIRED_METRICS = {
    "makespan_s",
    "successes",
    "failures",
    "responses_429",
    "early_requests",
    "slot_seconds_waiting",
    "busy_slot_seconds",
    "lateness_p95_s",
    "peak_rss_mb",
}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------
# Scoring rules (fast, no Airflow).
# --------------------------------------------------------------------------


def test_token_bucket_headers_follow_the_ietf_draft() -> None:
    limiter = TokenBucketLimiter(rate=1.0, burst=2)
    first, second, refused = (limiter.decide(100.0) for _ in range(3))
    assert first.allowed and first.headers["RateLimit-Remaining"] == "1" and first.not_before is None
    assert first.headers["RateLimit-Policy"] == "2;w=2"
    # The quota is spent: the headers announce when the next token comes.
    assert second.allowed and second.headers["RateLimit-Remaining"] == "0"
    assert second.not_before == 100.0 + int(second.headers["RateLimit-Reset"])
    assert not refused.allowed and refused.headers["Retry-After"] == "1"
    assert refused.not_before == 101.0


def test_fixed_window_announces_the_window_end_in_epoch_seconds() -> None:
    limiter = FixedWindowLimiter(limit=2, window_s=20)
    a, b, c = limiter.decide(1000.4), limiter.decide(1001.0), limiter.decide(1005.5)
    assert a.headers["X-RateLimit-Reset"] == "1020" and a.headers["X-RateLimit-Remaining"] == "1"
    assert b.allowed and b.not_before == 1020.0
    assert not c.allowed and c.headers["Retry-After"] == "15" and c.not_before == 1020.5
    assert limiter.decide(1020.0).allowed  # a new window


def test_a_request_before_the_announced_time_is_early_even_when_it_gets_a_token() -> None:
    clock = Clock(100.0)
    recorder = Recorder(TokenBucketLimiter(rate=1.0, burst=2), clock)
    assert recorder.handle("a", "/bench/items/0").allowed
    assert recorder.handle("b", "/bench/items/1").allowed  # quota spent: announces 101
    clock.now = 101.7
    assert recorder.handle("c", "/bench/items/2").allowed  # 0.7 token left: announces 102.7
    clock.now = 102.2  # 1.2 tokens by now, but the headers said 102.7
    assert recorder.handle("d", "/bench/items/3").allowed
    assert [r["early"] for r in recorder.snapshot()] == [False, False, False, True]
    assert [r["early_own"] for r in recorder.snapshot()] == [False] * 4


def test_lateness_is_measured_from_the_time_the_429_allowed() -> None:
    clock = Clock(100.0)
    recorder = Recorder(FixedWindowLimiter(limit=1, window_s=10), clock)
    recorder.handle("a", "/bench/items/0")
    clock.now = 101.0
    assert not recorder.handle("b", "/bench/items/1").allowed  # Retry-After 9 -> 110
    clock.now = 112.5
    recorder.handle("b", "/bench/items/1")
    summary = summarize(recorder.snapshot())
    assert summary["responses_429"] == 1
    assert summary["lateness_p95_s"] == pytest.approx(2.5)
    assert summary["early_requests"] == 1 and summary["early_requests_own"] == 0
    assert summary["makespan_s"] == pytest.approx(12.5)
    assert summary["wait_after_429_s"] == pytest.approx(11.5)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 95) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([float(v) for v in range(1, 21)], 95) == 19.0


def test_a_stop_signal_landing_while_a_request_is_accepted_still_stops_the_server(monkeypatch) -> None:
    from tests.support.servers import assert_a_stop_raised_while_accepting_leaves_the_loop

    assert_a_stop_raised_while_accepting_leaves_the_loop(
        monkeypatch, rate_limited_server.make_server(), rate_limited_server._Stop("SIGTERM")
    )


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        LimiterConfig(shape="leaky").validated()
    with pytest.raises(ValueError):
        LimiterConfig(shape="fixed_window", window_s=2.5).validated()


# --------------------------------------------------------------------------
# One tiny run through the real stack.
# --------------------------------------------------------------------------


@pytest.mark.stack
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sampler reads /proc")
def test_a_tiny_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run_dir = tmp_path / "run"
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    cmd = [
        str(python), str(RUNNER),
        "--tasks", "4", "--rate", "2", "--burst", "2", "--parallelism", "2",
        "--shape", "token_bucket", "--idle-seconds", "2", "--no-warmup", "--timeout", "90",
        "--out", str(out), "--run-dir", str(run_dir),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        stdout, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the runner then stops the Airflow stack it started.
        proc.terminate()
        stdout, _ = proc.communicate(timeout=120)
        pytest.fail(f"the benchmark took more than 400 s:\n{stdout[-4000:]}")
    assert proc.returncode == 0, stdout[-6000:]

    results = json.loads(out.read_text())
    assert results["tasks"] == 4 and results["rate_per_s"] == 2.0 and results["ideal_makespan_s"] == 2.0
    assert set(results["strategies"]) == set(STRATEGIES)
    assert results["idle_rss_mb"] > 0 and results["complete"] is True
    for name, metrics in results["strategies"].items():
        assert REQUIRED_METRICS <= set(metrics), name
        assert metrics["successes"] == 4 and metrics["failures"] == 0, (name, metrics)
        assert metrics["busy_slot_seconds"] > 0 and metrics["peak_rss_mb"] > results["idle_rss_mb"] / 2, name
    # The operator's promise: never send before the time the server gave that same task.
    assert results["strategies"]["network_request_operator"]["early_requests_own"] == 0
    # urllib3 waits inside the task: if it was refused, it held a slot while sleeping.
    urllib3 = results["strategies"]["urllib3_retry"]
    if urllib3["responses_429"]:
        assert urllib3["slot_seconds_waiting"] > 0
    assert "N=4" in format_of(stdout)

    # Nothing the runner started is left (best effort: processes that set a title hide their
    # environment; the runner's own clean-up walks its process tree, see bench/run_bench.py).
    assert processes_with_env("AIRFLOW_HOME", str(run_dir.resolve() / "airflow_home")) == []


def format_of(stdout: str) -> str:
    """The printed table's header line, e.g. ``token_bucket: N=4, rate 2.0/s ...``."""
    return next((line for line in stdout.splitlines() if line.startswith("token_bucket:")), "")
