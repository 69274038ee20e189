"""End-to-end tests in the CeleryExecutor topology (``make test-distributed``).

One stack for the whole module (see conftest.py): PostgreSQL, Redis, api-server,
scheduler, dag-processor, triggerer and two Celery workers, ``worker-a`` (queues
``default`` and ``handoff``) and ``worker-b`` (``default``), two task slots each.

The periodic/burst test comes first on purpose: the periodic DAG is unpaused at
creation, so its first run starts as soon as the stack has parsed it, and the burst
of one-off runs is triggered right then, while it is running.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.scripted_api import ScriptedResponse

from .conftest import HANDOFF_DAG_ID, HANDOFF_QUEUE

pytestmark = pytest.mark.distributed

ONCE = "network_request_once"
PERIODIC = "network_request_periodic"
PERIODIC_FILES = ("users", "orders", "products", "inventory", "weather", "exchange-rates")
BURST = 6
RUN_TIMEOUT = 240.0


def run_folder(run_id: str) -> str:
    """network_requests.paths.RUN_FOLDER_TEMPLATE, applied to one run id."""
    return run_id.replace(":", "").replace("+", "_").replace("/", "_")


def only_files(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ``.*.partial`` leftovers included."""
    return sorted(path.name for path in folder.iterdir())


def when(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        time.sleep(poll)


def test_periodic_dag_and_a_burst_of_one_off_runs_share_the_rate_limit(stack, demo_api):
    begin = time.monotonic()
    # A burst of one-off runs, through the REST API, each fetching its own item (its own
    # "client" for the early-request check).
    once_runs: dict[str, int] = {}
    for item in range(1, BURST + 1):
        response = stack.trigger(ONCE, {"endpoint": f"/api/items/{item}"})
        assert response.status == 200, response
        once_runs[response.json()["dag_run_id"]] = item

    # The periodic DAG's first run, created by the scheduler when the DAG was parsed.
    periodic_runs = wait_until(lambda: stack.dag_runs(PERIODIC), 60, "a run of the periodic DAG")
    periodic_run_id = periodic_runs[0]["dag_run_id"]

    finished = {run_id: stack.wait_for_run(ONCE, run_id, RUN_TIMEOUT) for run_id in once_runs}
    finished[periodic_run_id] = stack.wait_for_run(PERIODIC, periodic_run_id, RUN_TIMEOUT)
    elapsed = time.monotonic() - begin
    assert {run_id: run["state"] for run_id, run in finished.items()} == dict.fromkeys(finished, "success")

    # Every task succeeded in its first try: 429s were waited out by deferrals, not retries.
    instances = {run_id: stack.task_instances(ONCE, run_id) for run_id in once_runs}
    instances[periodic_run_id] = stack.task_instances(PERIODIC, periodic_run_id)
    all_tis = [ti for tis in instances.values() for ti in tis]
    assert len(instances[periodic_run_id]) == len(PERIODIC_FILES)
    assert [(ti["dag_id"], ti["task_id"], ti["map_index"], ti["state"], ti["try_number"]) for ti in all_tis] == [
        (ti["dag_id"], ti["task_id"], ti["map_index"], "success", 1) for ti in all_tis
    ]
    # Both workers ran tasks, and the periodic run overlapped the burst.
    assert {ti["hostname"] for ti in all_tis} == {"worker-a", "worker-b"}
    periodic = finished[periodic_run_id]
    assert when(periodic["start_date"]) < max(when(finished[r]["end_date"]) for r in once_runs)
    assert when(periodic["end_date"]) > min(when(finished[r]["start_date"]) for r in once_runs)

    # The limit was reached (the server told clients to wait), and no client sent a request
    # before the time the server had told it to wait until (Retry-After after a 429, or
    # RateLimit-Reset with RateLimit-Remaining: 0).
    exchanges = demo_api.exchanges()
    told_to_wait = [e for e in exchanges if e.wait_until is not None]
    rate_limited = [e for e in exchanges if e.status == 429]
    assert told_to_wait, "the demo API never ran out of tokens: the test did not exercise the limit"
    assert demo_api.early_requests() == [], demo_api.timeline()
    # Against what the server told *another* client, a request can come early only in the moment
    # before that client has shared it (the operator's shared gate, in Redis here): a request let
    # out while the quota was counted left, arriving after another's answer said it was spent.
    # Not asserted, reported: see docs/distributed.md. (While pacing with the quota counted
    # spent, a request waits for the answers before it: test_mapped_at_scale asserts 0 there.)
    shared_early = demo_api.early_requests(shared=True)

    # Each client got exactly one successful answer: nothing fetched twice, nothing lost.
    periodic_paths = {f"/api/{name}" for name in PERIODIC_FILES}
    once_paths = {f"/api/items/{item}" for item in once_runs.values()}
    successes: dict[str, int] = {}
    for exchange in exchanges:
        if exchange.status == 200 and exchange.path in periodic_paths | once_paths:
            successes[exchange.path] = successes.get(exchange.path, 0) + 1
    assert successes == dict.fromkeys(periodic_paths | once_paths, 1)

    # Each run's output exists exactly once, as complete JSON, with nothing half-written beside it.
    for run_id, item in once_runs.items():
        folder = stack.data_dir / ONCE / run_folder(run_id)
        assert only_files(folder) == ["response"], folder
        document = json.loads((folder / "response").read_text())
        assert document["item"]["id"] == item
    folder = stack.data_dir / PERIODIC / run_folder(periodic_run_id)
    assert only_files(folder) == sorted(f"api_{name}.json" for name in PERIODIC_FILES), folder
    for name in PERIODIC_FILES:
        assert json.loads((folder / f"api_{name}.json").read_text())["endpoint"] == name
    # No output for runs that do not exist (a lost run id, a duplicated folder).
    assert sorted(p.name for p in (stack.data_dir / ONCE).iterdir()) == sorted(map(run_folder, once_runs))

    print(
        f"\n[distributed] burst of {BURST} one-off runs + periodic run ({len(PERIODIC_FILES)} tasks): "
        f"{elapsed:.0f}s, {len(exchanges)} API requests, {len(rate_limited)} answered 429, "
        f"{len(told_to_wait)} told to wait, {len(shared_early)} sent before a wait told to another client "
        f"({', '.join(f'{e.path} {e.early_by:.2f}s' for e in shared_early) or '-'}), "
        f"tasks per worker: "
        f"{ {h: sum(ti['hostname'] == h for ti in all_tis) for h in ('worker-a', 'worker-b')} }"
    )


def test_rescheduled_task_runs_on_the_other_worker_after_retry_after(stack, handoff_api):
    assert stack.active_queues() == {"worker-a": ["default", HANDOFF_QUEUE], "worker-b": ["default"]}
    handoff_api.clear()
    handoff_api.script(
        # Longer than the 5 s the operator sleeps in-process by default: a real reschedule.
        ScriptedResponse.too_many_requests(retry_after=8),
        ScriptedResponse(body={"handed": "over"}),
    )
    response = stack.trigger(HANDOFF_DAG_ID)
    assert response.status == 200, response
    run_id = response.json()["dag_run_id"]

    # The first try can only run on worker-a, the one consumer of the queue. The moment its
    # request reaches the server, move the queue to worker-b: worker-a's try is still waiting
    # for the 429, and the re-run cannot be queued before Retry-After (8 s) has passed.
    first = handoff_api.wait_for_requests(1, timeout=180)[0]
    control = stack.celery_control()
    added = control.add_consumer(HANDOFF_QUEUE, destination=[stack.node("worker-b")], reply=True, timeout=5)
    cancelled = control.cancel_consumer(HANDOFF_QUEUE, destination=[stack.node("worker-a")], reply=True, timeout=5)
    switched_at = time.monotonic()
    assert [list(reply.values())[0] for reply in added] == [{"ok": f"add consumer {HANDOFF_QUEUE}"}]
    assert [list(reply.values())[0] for reply in cancelled] == [{"ok": f"no longer consuming from {HANDOFF_QUEUE}"}]
    assert switched_at - first.received_monotonic < 3.0, "the queue moved too late to prove anything"

    # Watch the task instance: which states and hostnames did it go through?
    seen: list[tuple[str | None, str | None, int]] = []
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        ti = stack.task_instances(HANDOFF_DAG_ID, run_id, tries=False)[0]
        observed = (ti["state"], ti["hostname"], ti["try_number"])
        if not seen or seen[-1] != observed:
            seen.append(observed)
        if ti["state"] in ("success", "failed"):
            break
        time.sleep(0.2)
    run = stack.wait_for_run(HANDOFF_DAG_ID, run_id, 30)
    assert run["state"] == "success", seen

    requests = handoff_api.requests
    assert len(requests) == 2, requests
    assert [r.header("X-Airflow-Hostname") for r in requests] == ["worker-a", "worker-b"]
    assert {r.header("X-Airflow-Run-Id") for r in requests} == {run_id}
    gap = requests[1].received_monotonic - requests[0].received_monotonic
    assert gap >= 8.0, f"second request {gap:.3f}s after the 429 with Retry-After: 8"
    assert requests[1].received_monotonic > switched_at

    # The metadata database tells the same story: up for reschedule after worker-a's request,
    # success on worker-b, one try only (a reschedule spends none).
    assert ("up_for_reschedule", "worker-a", 1) in seen, seen
    assert seen[-1] == ("success", "worker-b", 1), seen
    ti = stack.task_instances(HANDOFF_DAG_ID, run_id)[0]
    assert (ti["state"], ti["hostname"], ti["try_number"]) == ("success", "worker-b", 1)
    assert [(t["try_number"], t["state"], t["hostname"]) for t in ti["tries"]] == [(1, "success", "worker-b")]
    print(f"\n[distributed] hand-off: 429 on worker-a, 200 on worker-b {gap:.2f}s later; states seen: {seen}")


def test_one_off_runs_from_cli_and_rest_and_invalid_params_refused_by_both(stack, demo_api):
    # A valid one-off run from the CLI ...
    cli_run_id = f"cli__{uuid.uuid4().hex[:12]}"
    cli_conf = {"endpoint": "/api/items/201", "method": "GET"}
    result = stack.cli("dags", "trigger", ONCE, "--run-id", cli_run_id, "--conf", json.dumps(cli_conf))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # ... and one through the REST API with a Bearer token from /auth/token.
    token = stack.token(refresh=True)
    assert token.count(".") == 2  # a JWT
    rest_conf = {"endpoint": "/api/items/202", "method": "GET", "initial_delay_seconds": 1}
    response = stack.trigger(ONCE, rest_conf)
    assert response.status == 200, response
    rest_run = response.json()
    assert (rest_run["logical_date"], rest_run["triggered_by"], rest_run["conf"]) == (None, "rest_api", rest_conf)
    rest_run_id = rest_run["dag_run_id"]

    for run_id, conf, item in ((cli_run_id, cli_conf, 201), (rest_run_id, rest_conf, 202)):
        run = stack.wait_for_run(ONCE, run_id, RUN_TIMEOUT)
        assert (run["state"], run["conf"]) == ("success", conf), run
        [ti] = stack.task_instances(ONCE, run_id)
        assert (ti["state"], ti["try_number"]) == ("success", 1)
        document = json.loads((stack.data_dir / ONCE / run_folder(run_id) / "response").read_text())
        assert document["item"]["id"] == item

    # A conf that breaks the Params schema is refused by both, with the same message naming the param.
    runs_before = len(stack.dag_runs(ONCE))
    bad_conf = {"endpoint": "https://evil.example/x"}
    refused_cli = stack.cli("dags", "trigger", ONCE, "--conf", json.dumps(bad_conf))
    refused_rest = stack.trigger(ONCE, bad_conf)
    assert refused_cli.returncode != 0
    assert 400 <= refused_rest.status < 500, refused_rest
    rest_message = refused_rest.json()["detail"]
    assert isinstance(rest_message, str), rest_message
    headline = rest_message.splitlines()[0]
    assert headline.startswith("Invalid input for param endpoint: 'https://evil.example/x'"), headline
    assert headline in refused_cli.stderr, refused_cli.stderr[-3000:]
    assert len(stack.dag_runs(ONCE)) == runs_before, "a refused conf still created a run"


def test_every_component_runs_with_its_own_tmpdir_and_the_redis_gate_store(stack):
    # As separate containers: no file lock (tempfile.gettempdir()) is shared between the
    # workers and the triggerer. Read from the live supervisors, whose environment their
    # component inherits (Airflow's own processes overwrite theirs with setproctitle).
    environments = {name: psutil.Process(c.proc.pid).environ() for name, c in stack.components.items()}
    tmpdirs = {name: env.get("TMPDIR") for name, env in environments.items()}
    assert {"worker-a", "worker-b", "triggerer"} <= set(tmpdirs)
    assert None not in tmpdirs.values() and len(set(tmpdirs.values())) == len(tmpdirs), tmpdirs
    assert all(Path(path).is_dir() for path in tmpdirs.values()), tmpdirs
    stores = {name: env.get("AIRFLOW__NETWORK_REQUESTS__GATE_STORE") for name, env in environments.items()}
    assert set(stores.values()) == {"redis"}, stores


def test_the_shared_gate_lives_in_redis_and_not_in_a_variable(stack, demo_api):
    response = stack.trigger(ONCE, {"endpoint": "/api/items/301"})
    assert response.status == 200, response
    run = stack.wait_for_run(ONCE, response.json()["dag_run_id"], RUN_TIMEOUT)
    assert run["state"] == "success", run

    key = "network_requests:gate:network_request_api"
    redis = stack.redis()
    try:
        found = sorted(redis.scan_iter(match="network_requests:*"))
        assert redis.type(key) == b"hash", f"no Redis gate at {key}; keys of the plugin: {found}"
        assert set(redis.hkeys(key)) == {b"state", b"version"}
        assert redis.pttl(key) > 0, "the gate's key has no expiry of its own"
    finally:
        redis.close()
    variable = stack.rest("GET", "/api/v2/variables/network_requests.gate.network_request_api")
    assert variable.status == 404, f"the gate was (also) written to a Variable: {variable}"
