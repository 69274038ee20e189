"""The growth benchmark (``make bench-scale``, issue 12): its counting rules, and one tiny run.

The tiny run starts ``bench/run_scale.py`` as ``make bench-scale`` does (a fresh real stack:
scheduler, LocalExecutor, SQLite, triggerer, API server) at N=6 with the
``NetworkRequestOperator`` and the ``batch_operator`` slot, and checks only the SHAPE of what
it writes: one row per strategy and N with every key, the types, the plot. No timing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import run_scale  # noqa: E402
from bench.probes import airflow_local_settings as probe  # noqa: E402
from bench.procstats import OTHER, WORKERS, Proc, component_of  # noqa: E402
from scripts.process_tree import processes_with_env  # noqa: E402

RUNNER = REPO / "bench" / "run_scale.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
TINY_N = 6
TINY_STRATEGIES = ("network_request_operator", "batch_operator")
#: The runner's own bounds keep the whole test under 3 minutes.
RUN_TIMEOUT_S = 170


# --------------------------------------------------------------------------
# Counting rules (fast, no Airflow stack).
# --------------------------------------------------------------------------


def test_the_committed_results_name_their_run_folders_relative_to_the_repository() -> None:
    # Results are committed: they carry no path of the machine that produced them.
    from bench.run_bench import shown_path

    assert shown_path(REPO / "bench" / "runs" / "x") == "bench/runs/x"
    for name in ("results.json", "scale.json"):
        run_dir = json.loads((REPO / "bench" / name).read_text())["run_dir"]
        assert not Path(run_dir).is_absolute(), (name, run_dir)


def test_the_runner_counts_the_variables_the_gate_store_really_uses() -> None:
    from network_requests.gate_store import VARIABLE_PREFIX, variable_key

    assert run_scale.GATE_VARIABLE_PREFIX == VARIABLE_PREFIX
    assert variable_key("bench_api").startswith(run_scale.GATE_VARIABLE_PREFIX)


def test_gate_variable_requests_are_counted_by_method_and_other_variables_by_key() -> None:
    lines = [
        "GET network_requests.gate.bench_api",
        "PUT network_requests.gate.bench_api",
        "GET network_requests.gate.bench_api",
        "GET network_requests.waits.bench_api",
        "",
        "DELETE network_requests.gate.other",
    ]
    gate, other = run_scale.count_variable_requests(lines)
    assert dict(gate) == {"GET": 2, "PUT": 1, "DELETE": 1}
    assert dict(other) == {"network_requests.waits.bench_api": 1}


def test_a_strategy_is_skipped_with_its_reason_while_its_module_is_missing() -> None:
    missing = run_scale.Strategy("later", "not built yet", needs_module="network_requests.no_such_module")
    present = run_scale.Strategy("now", "built", needs_module="network_requests.gate_store")
    assert "network_requests.no_such_module does not exist yet" in missing.skip_reason(TINY_N)
    assert present.skip_reason(TINY_N) is None
    assert missing.dag_id == "bench_later"


def test_the_http_operator_is_run_up_to_600_requests_only() -> None:
    http = run_scale.STRATEGIES["http_operator"]
    assert http.skip_reason(600) is None
    assert "600" in http.skip_reason(3000)


def test_the_batch_mode_has_its_slot_in_the_registry() -> None:
    batch = run_scale.STRATEGIES["batch_operator"]
    assert batch.needs_module == "network_requests.batch"
    assert (REPO / "bench" / "dags" / f"{batch.dag_id}.py").exists()


def test_max_map_length_is_raised_to_the_largest_n() -> None:
    assert run_scale.parse_args(["--sizes", "60,3000"]).max_map_length == 3000
    assert run_scale.parse_args(["--sizes", "60"]).max_map_length == 1024  # Airflow's default


def test_the_probe_records_each_call_of_the_wrapped_modules_variable(tmp_path: Path, monkeypatch) -> None:
    # A stand-in for Airflow's route module, imported through the real import machinery.
    (tmp_path / "fake_variable_routes.py").write_text(
        "class Variable:\n"
        "    @staticmethod\n"
        "    def get(key, team_name=None):\n"
        "        return 'value of ' + key\n"
        "    @staticmethod\n"
        "    def set(key, value, description=None, team_name=None):\n"
        "        return None\n"
        "    table = 'variable'\n"
        "def get_variable(key):\n"
        "    return Variable.get(key, team_name=None)\n"
        "def put_variable(key, value):\n"
        "    return Variable.set(key=key, value=value, description='d', team_name=None)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    log_path = tmp_path / "requests.log"
    probe.install(str(log_path), module_name="fake_variable_routes")
    import fake_variable_routes

    try:
        assert fake_variable_routes.get_variable("network_requests.gate.a") == "value of network_requests.gate.a"
        fake_variable_routes.put_variable("network_requests.gate.a", "{}")
        assert fake_variable_routes.Variable.table == "variable"  # everything else is the model's
    finally:
        sys.modules.pop("fake_variable_routes", None)
    assert log_path.read_text().splitlines() == ["GET network_requests.gate.a", "PUT network_requests.gate.a"]


def test_workers_and_their_task_processes_are_one_component_apart_from_the_scheduler() -> None:
    def proc(pid: int, ppid: int) -> Proc:
        return Proc(pid, ppid, "S", 0, 0)

    # runner(1) -> scheduler(10) -> worker(11) -> task(12); triggerer(20) -> runner(21); orphan(30)
    table = {p.pid: p for p in (proc(10, 1), proc(11, 10), proc(12, 11), proc(20, 1), proc(21, 20), proc(30, 1))}
    found = component_of(table, {10: "scheduler", 20: "triggerer"}, workers={11})
    assert found == {10: "scheduler", 11: WORKERS, 12: WORKERS, 20: "triggerer", 21: "triggerer", 30: OTHER}


# --------------------------------------------------------------------------
# One tiny run through real stacks.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """Run the scale runner once at N=6; (results, the out file, the run dir)."""
    base = tmp_path_factory.mktemp("scale")
    out, run_dir = base / "scale.json", base / "run"
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    cmd = [
        str(python), str(RUNNER), "--sizes", str(TINY_N), "--strategies", ",".join(TINY_STRATEGIES),
        "--no-warmup", "--idle-seconds", "1", "--startup-timeout", "120", "--min-timeout", "60",
        "--out", str(out), "--run-dir", str(run_dir),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        stdout, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the runner then stops the stack it started
        stdout, _ = proc.communicate(timeout=60)
        pytest.fail(f"the scale runner took more than {RUN_TIMEOUT_S} s:\n{stdout[-4000:]}")
    assert proc.returncode == 0, stdout[-6000:]
    return json.loads(out.read_text()), out, run_dir


@pytest.mark.stack
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sampler reads /proc")
def test_a_tiny_scale_run_writes_one_row_of_every_key_per_strategy_and_size(tiny_run) -> None:
    results, _, run_dir = tiny_run
    assert results["sizes"] == [TINY_N] and list(results["strategies"]) == list(TINY_STRATEGIES)
    assert results["complete"] is True and results["config"]["rate_per_s"] == 10.0
    assert results["config"]["airflow_settings"]["core__max_map_length"] == 1024
    assert [(r["strategy"], r["requests"]) for r in results["runs"]] == [(s, TINY_N) for s in TINY_STRATEGIES]
    for row in results["runs"]:
        assert set(row) == set(run_scale.ROW_KEYS), row["strategy"]
        assert row["status"] in run_scale.STATUSES and row["ideal_makespan_s"] == TINY_N / 10

    operator = results["runs"][0]
    assert operator["status"] == "finished", operator["note"]
    for key in ("makespan_s", "makespan_over_ideal", "slot_seconds_per_request", "control_plane_cpu_s_per_request",
                "gate_store_requests_per_request", "peak_rss_mb", "peak_rss_triggerer_mb", "slot_utilization"):  # fmt: skip
        assert isinstance(operator[key], float), key
    for key in ("responses_429", "early_requests", "successes", "failures", "gate_store_requests_total"):
        assert isinstance(operator[key], int), key
    assert set(run_scale.CONTROL_PLANE) <= set(operator["cpu_s_per_request_by_component"])
    assert set(run_scale.CONTROL_PLANE) <= set(operator["peak_rss_mb_by_component"])
    assert set(operator["gate_store_requests"]) == set(run_scale.PROBED_COMPONENTS)
    # Not vacuous: the operator asks its shared gate before each request, so the probe saw it.
    assert operator["gate_store_requests_total"] > 0

    batch = results["runs"][1]
    if not run_scale.module_exists("network_requests.batch"):
        assert batch["status"] == "skipped" and "does not exist yet" in batch["note"]
        assert batch["makespan_s"] is None

    assert processes_with_env("AIRFLOW_HOME", str(run_dir.resolve() / "network_request_operator-6" / "airflow_home")) == []


@pytest.mark.stack
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sampler reads /proc")
def test_a_tiny_scale_run_draws_its_plot_next_to_the_results(tiny_run) -> None:
    results, out, _ = tiny_run
    if importlib.util.find_spec("matplotlib") is None:
        assert results["plot"] is None and any("no plot" in p for p in results["problems"])
        pytest.skip("matplotlib is not installed (requirements-bench.txt): the runner said so and drew nothing")
    plot = out.with_suffix(".png")
    assert results["plot"] == plot.name
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_store_redis_gives_every_component_the_redis_store_and_its_connection(tmp_path):
    options = run_scale.parse_args(["--sizes", "6", "--gate-store", "redis", "--redis-url", "redis://127.0.0.1:6379/14"])
    args = run_scale.stack_args(options, run_scale.STRATEGIES["network_request_operator"], 6)

    env = run_scale.ScaleStack(args, tmp_path, redis_url=options.redis_url).airflow_env()
    default = run_scale.ScaleStack(args, tmp_path).airflow_env()

    assert env["AIRFLOW__NETWORK_REQUESTS__GATE_STORE"] == "redis"
    assert env["AIRFLOW__NETWORK_REQUESTS__REDIS_CONN_ID"] == run_scale.BENCH_REDIS_CONN_ID
    # The Redis provider's hook takes the database from the extra, not from the path.
    assert env["AIRFLOW_CONN_BENCH_REDIS"] == "redis://127.0.0.1:6379/?db=14"
    assert "AIRFLOW__NETWORK_REQUESTS__GATE_STORE" not in default, "the Variable store by default, as make run"
    results = run_scale.new_results(options, run_scale.dt.datetime.now(run_scale.dt.timezone.utc), tmp_path)
    assert results["config"]["gate_store"] == "redis"


def test_each_redis_run_starts_without_gates_and_other_keys_stay():
    redis = pytest.importorskip("redis")
    from network_requests.gate_store import REDIS_KEY_PREFIX

    client = redis.Redis.from_url("redis://127.0.0.1:6379/14", socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({error})")
    assert run_scale.REDIS_GATE_KEYS == REDIS_KEY_PREFIX + "*", "the runner clears the keys the store writes"
    client.set(REDIS_KEY_PREFIX + "bench_api", "old gate")
    client.set("network_requests-bench-test:not-a-gate", "kept")
    try:
        assert run_scale.clear_redis_gates("redis://127.0.0.1:6379/14") >= 1
        assert client.get(REDIS_KEY_PREFIX + "bench_api") is None
        assert client.get("network_requests-bench-test:not-a-gate") == b"kept"
    finally:
        client.delete("network_requests-bench-test:not-a-gate")
        client.close()
