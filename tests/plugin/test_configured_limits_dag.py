"""Declared limits and gate keys through real Airflow (``dag.test()``) against servers on 127.0.0.1.

- An API that sends no rate-limit header (a bare 429 beyond its limit): with the limit declared
  in the Connection's ``extra``, mapped tasks send nothing early and get no 429; without it,
  the same tasks are refused (so the server really enforces what is declared).
- ``gate_key`` scopes a block: a ``Retry-After: 30`` on one route holds the tasks of that key
  only; one key across two Connections is one block.
- A declaration that cannot be used fails the task at its start, naming the field.

Tasks of a ``dag.test()`` run one after the other; a task that fails at once on a long wait
(``max_rate_limit_wait``) leaves the block in the gate for the next one to find.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from network_requests.gate import GateState
from network_requests.gate_store import variable_key
from tests.integration_airflow.airflow_helpers import dag_id_for, delete_variable, one_task_dag, read_variable, run_source
from tests.reliability.servers import RoutedApi
from tests.support.dag_runner import set_connection
from tests.support.scripted_api import RecordedRequest, ScriptedApi, ScriptedResponse

pytestmark = pytest.mark.usefixtures("airflow_db")

IMPORTS = "from network_requests import NetworkRequestOperator"


class HeaderlessLimitedApi(ScriptedApi):
    """Accepts at most ``limit`` requests in any ``per`` seconds (a sliding log, by arrival) and
    answers a bare 429, no header at all, beyond: an API whose limits only its docs state."""

    def __init__(self, limit: int, per: float) -> None:
        super().__init__()
        self.limit, self.per = limit, per
        self._accepted: list[float] = []

    def _record_and_pick_response(self, request: RecordedRequest) -> ScriptedResponse:
        with self._lock:
            arrived = request.received_monotonic
            if sum(1 for at in self._accepted if arrived - at < self.per) >= self.limit:
                response = ScriptedResponse(status=429, body={"error": "slow down"})
            else:
                self._accepted.append(arrived)
                response = ScriptedResponse(body={"ok": True})
            self._requests.append(replace(request, response=response))
            self._request_arrived.notify_all()
            return response


@pytest.fixture(autouse=True)
def short_deferrals(monkeypatch):
    """A deferral from a worker is due no sooner than [workers] min_heartbeat_interval: 1 s, as in the project's stacks."""
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")


def connection(base_url: str, **extra) -> str:
    """A Connection in Airflow's JSON form (``extra`` needs it; a URI's query can't hold an object)."""
    host, port = base_url.removeprefix("http://").split(":")
    return json.dumps({"conn_type": "http", "host": host, "port": int(port), "extra": extra})


def stored_gate(name: str) -> GateState:
    return GateState.from_json(read_variable(variable_key(name)), now=time.time())


def run_dag(request, tasks: str, *, default_args: str = "{'retries': 0, 'retry_delay': timedelta(seconds=1)}"):
    dag_id = dag_id_for(request)
    return run_source(dag_id, one_task_dag(dag_id, tasks, default_args=default_args, imports=IMPORTS))


def states(result) -> dict[tuple[str, int], str | None]:
    return {key: task.state for key, task in result.tasks.items()}


# -- a header-less API ------------------------------------------------------------------------------

EIGHT_MAPPED = """
NetworkRequestOperator.partial(task_id="fetch", http_conn_id="network_request_api").expand(
    endpoint=[f"/items/{i}" for i in range(8)])
"""


@pytest.fixture
def headerless_api():
    with HeaderlessLimitedApi(limit=3, per=2.0) as api:
        yield api


def test_without_a_declared_limit_the_header_less_api_refuses_requests_sent_too_soon(request, headerless_api):
    """The control: these tasks do send faster than the server allows, so the next test's 0 is earned."""
    set_connection(connection(headerless_api.base_url))

    result = run_dag(request, EIGHT_MAPPED)

    assert set(states(result).values()) == {"success"}, "a bare 429 is waited out (backoff), no try spent"
    refused = [r for r in headerless_api.requests if r.response.status == 429]
    assert refused, "the fault is real: some request went before the server allowed it"


def test_a_limit_declared_in_the_connection_extra_keeps_mapped_tasks_within_a_header_less_api(request, headerless_api):
    set_connection(connection(headerless_api.base_url, rate_limit={"requests": 3, "per": "2s"}))

    result = run_dag(request, EIGHT_MAPPED)

    assert states(result) == {("fetch", i): "success" for i in range(8)}
    assert all(task.try_number == 1 for task in result.tasks.values())
    answered = [r.response.status for r in headerless_api.requests]
    assert answered == [200] * 8, "each task sent once, none early: no 429 at all"
    arrivals = sorted(r.received_monotonic for r in headerless_api.requests)
    assert all(later - earlier >= 2.0 for earlier, later in zip(arrivals, arrivals[3:])), "never 4 in 2 s"
    assert not any(r.header("rate_limit") for r in headerless_api.requests), "the extra is not a header"


def test_the_tasks_rate_limit_argument_replaces_the_connections_declaration(request, headerless_api):
    """The Connection declares a looser limit than the server's; the task's argument is the real one."""
    set_connection(connection(headerless_api.base_url, rate_limit={"requests": 100, "per": "1s"}))

    result = run_dag(request, """
NetworkRequestOperator.partial(task_id="fetch", http_conn_id="network_request_api",
                               rate_limit=[{"requests": 3, "per": "2s"}]).expand(
    endpoint=[f"/items/{i}" for i in range(5)])
""")

    assert set(states(result).values()) == {"success"}
    assert [r.response.status for r in headerless_api.requests] == [200] * 5


@pytest.mark.parametrize("declared", [False, True], ids=["undeclared", "declared"])
def test_a_batch_sending_four_at_once_keeps_within_a_limit_declared_for_a_header_less_api(
    request, headerless_api, tmp_path, declared
):
    """Real concurrency: up to four requests under way at once, all through one gate. Without
    the declaration the server refuses some (the control); with it, none."""
    extra = {"rate_limit": {"requests": 3, "per": "2s"}} if declared else {}
    set_connection(connection(headerless_api.base_url, **extra))

    result = run_dag(request, f"""
from network_requests.batch import BatchRequestOperator
BatchRequestOperator(task_id="batch", http_conn_id="network_request_api", max_in_flight=4,
                     requests=[f"/items/{{i}}" for i in range(8)], output_folder={str(tmp_path)!r})
""")

    assert result.task("batch").state == "success"
    statuses = [r.response.status for r in headerless_api.requests]
    if declared:
        assert statuses == [200] * 8, "no request early, so no 429"
    else:
        assert 429 in statuses, "the fault is real: four at once go beyond 3 per 2 s"


def test_a_sensor_pokes_no_faster_than_its_declared_limit_in_the_worker_and_the_triggerer(request, scripted_api):
    """The limit is the sensor's argument; its trigger, which pokes after the first deferral,
    reads it from the request description. Each poke counts from its answer: 3 s apart at least."""
    set_connection(scripted_api.base_url)
    scripted_api.script(ScriptedResponse(status=404), ScriptedResponse(status=404))
    scripted_api.default_response = ScriptedResponse(body={"ready": True})

    result = run_dag(request, """
from network_requests.sensors import NetworkRequestSensor
NetworkRequestSensor(task_id="wait", endpoint="/report", not_ready_status_codes=[404], poke_interval=0.5,
                     timeout=60, rate_limit={"requests": 1, "per": "3s"}, deferrable=True)
""")

    assert result.task("wait").state == "success"
    assert [r.response.status for r in scripted_api.requests] == [404, 404, 200]
    assert all(gap >= 3.0 for gap in scripted_api.gaps()), scripted_api.gaps()


# -- gate keys ----------------------------------------------------------------------------------------


@pytest.fixture
def routed_api():
    with RoutedApi() as api:
        yield api


def test_a_block_on_one_routes_gate_key_does_not_hold_another_route(request, routed_api):
    """``orders`` is told to wait 30 s. ``search`` has its own key and goes at once; a task on
    ``search``'s route that names ``orders`` is held (it fails at once on the 30 s wait, sending nothing)."""
    for key in ("key:orders", "key:search"):
        delete_variable(variable_key(key))
    set_connection(routed_api.base_url)
    routed_api.route("/orders", ScriptedResponse.too_many_requests(retry_after=30))
    routed_api.route_default("/search", ScriptedResponse(body={"hits": []}))

    result = run_dag(request, """
orders = NetworkRequestOperator(task_id="orders", endpoint="/orders", gate_key="orders",
                                max_rate_limit_wait=timedelta(seconds=5))
search = NetworkRequestOperator(task_id="search", endpoint="/search", gate_key="search", trigger_rule="all_done")
held = NetworkRequestOperator(task_id="held", endpoint="/search", gate_key="orders", trigger_rule="all_done",
                              max_rate_limit_wait=timedelta(seconds=5))
orders >> search >> held
""")

    assert states(result) == {("orders", -1): "failed", ("search", -1): "success", ("held", -1): "failed"}
    (refused,) = routed_api.requests_for("/orders")
    (searched,) = routed_api.requests_for("/search")
    assert searched.received_at < refused.received_at + 30, "the route's block held only its own key"
    assert stored_gate("key:orders").blocked_until >= refused.received_at + 29, "the fault: orders is blocked"
    assert stored_gate("key:search").blocked_until < refused.received_at + 1
    assert result.task("search").xcom == {"hits": []}


def test_one_gate_key_across_two_connections_is_one_block(request, routed_api, monkeypatch):
    """One token, two Connections (two base URLs): a block told through one holds the other's
    task until it ends; that Connection's task without the key is not held."""
    delete_variable(variable_key("key:github-token"))
    with RoutedApi() as other_api:
        set_connection(routed_api.base_url)
        monkeypatch.setenv("AIRFLOW_CONN_OTHER_API", other_api.base_url)
        routed_api.route("/repos", ScriptedResponse.too_many_requests(retry_after=4))

        result = run_dag(request, """
repos = NetworkRequestOperator(task_id="repos", endpoint="/repos", gate_key="github-token",
                               max_rate_limit_wait=timedelta(seconds=1))
unkeyed = NetworkRequestOperator(task_id="unkeyed", http_conn_id="other_api", endpoint="/free",
                                 trigger_rule="all_done")
search = NetworkRequestOperator(task_id="search", http_conn_id="other_api", endpoint="/search",
                                gate_key="github-token", trigger_rule="all_done")
repos >> unkeyed >> search
""")

        (refused,) = routed_api.requests_for("/repos")
        (free,) = other_api.requests_for("/free")
        (searched,) = other_api.requests_for("/search")
    assert states(result) == {("repos", -1): "failed", ("unkeyed", -1): "success", ("search", -1): "success"}
    assert free.received_at < refused.received_at + 4, "the other Connection's own gate was not blocked"
    assert searched.received_at >= refused.received_at + 4, "the shared key's block held the other Connection"
    assert result.task("search").try_number == 1


# -- declarations that cannot be used ----------------------------------------------------------------


@pytest.mark.parametrize(
    "where, expected",
    [
        ("extra", ["Connection 'network_request_api'", "rate_limit.per", "'fast'"]),
        ("argument", ["rate_limit argument", "rate_limit.requests", "-1"]),
    ],
)
def test_a_rate_limit_that_cannot_be_used_fails_the_task_at_its_start_naming_the_field(
    request, scripted_api, tmp_path, where, expected
):
    extra = {"rate_limit": {"requests": 10, "per": "fast"}} if where == "extra" else {}
    argument = ", rate_limit={'requests': -1, 'per': '1s'}" if where == "argument" else ""
    set_connection(connection(scripted_api.base_url, **extra))
    message_file = tmp_path / "failure.txt"

    result = run_dag(request, f"""
def keep_message(context):
    open({str(message_file)!r}, "w").write(str(context["exception"]))

NetworkRequestOperator(task_id="request", endpoint="/x", on_failure_callback=keep_message{argument})
""", default_args="{'retries': 2, 'retry_delay': timedelta(seconds=1)}")

    task = result.task("request")
    assert (task.state, task.try_number) == ("failed", 1), "no retry: the same settings would fail again"
    assert scripted_api.request_count == 0, "nothing was sent"
    message = message_file.read_text()
    assert all(part in message for part in expected), message


# -- 409 to a keyed request -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["worker", "triggerer"])
def test_a_keyed_post_answered_409_while_its_first_send_is_processed_is_sent_again_with_the_same_key(
    request, scripted_api, monkeypatch, where
):
    from tests.support.dag_runner import SendCounter

    scripted_api.script(ScriptedResponse(status=409, headers={"Retry-After": "1"}, body={"error": "in progress"}),
                        ScriptedResponse(status=201, body={"id": 7}))
    set_connection(scripted_api.base_url)
    sends = SendCounter(monkeypatch)
    waits = "deferrable=False, in_process_wait_threshold=5" if where == "worker" else "deferrable=True"

    result = run_dag(request, f"""
NetworkRequestOperator(task_id="request", endpoint="/orders", method="POST", data='{{"sku": 1}}', {waits})
""", default_args="{'retries': 2, 'retry_delay': timedelta(seconds=1)}")

    task = result.task("request")
    assert (task.state, task.try_number, task.xcom) == ("success", 1, {"id": 7}), "the 409 spent no try"
    first, second = scripted_api.requests
    assert first.response.status == 409, "the fault happened"
    assert first.header("Idempotency-Key") == second.header("Idempotency-Key") is not None
    assert second.received_at - first.received_at >= 1.0, "Retry-After honoured"
    assert (sends.worker, sends.triggerer) == ((2, 0) if where == "worker" else (1, 1))


def test_a_409_to_a_post_without_an_idempotency_key_fails_without_a_retry(request, scripted_api):
    scripted_api.script(ScriptedResponse(status=409, headers={"Retry-After": "1"}, body={"error": "exists"}))
    set_connection(scripted_api.base_url)

    result = run_dag(request, """
NetworkRequestOperator(task_id="request", endpoint="/users", method="POST", idempotency_key=False)
""", default_args="{'retries': 2, 'retry_delay': timedelta(seconds=1)}")

    task = result.task("request")
    assert (task.state, task.try_number) == ("failed", 1)
    assert scripted_api.request_count == 1
    assert scripted_api.requests[0].header("Idempotency-Key") is None
