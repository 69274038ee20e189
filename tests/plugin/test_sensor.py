"""The sensor's pure parts: the "what next" after a poke (sensor_engine), what an answer means
(sensor_pokes), and what its trigger may carry. A fixed clock; no Airflow run, no network.

The sensor run through real Airflow against a real server is tests/integration_airflow/test_airflow_sensor.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from network_requests.engine import Answered, Fail, GateAnswer, Mode, Place, Wait, WaitBudget, next_step
from network_requests.exceptions import PermanentRequestError, RateLimitExceededError, TransientRequestError
from network_requests.rate_limit import Outcome, RateLimitWait, WaitSource
from network_requests.request_spec import TaskRef, WaitSettings
from network_requests.sensor_engine import (Done, Held, NotReady, PokeAgain, RateLimited, Ready, SensorPlace,
                                            SensorRules, SensorState, TimedOut, next_poke)
from network_requests.sensor_pokes import (SensorSettings, import_check, reading_of_answer, reading_of_no_answer,
                                           status_codes)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
HALF = lambda: 0.5  # noqa: E731 - the jitter source
SETTINGS = WaitSettings(retry_delay=10.0)


def rules(place: SensorPlace = SensorPlace.TRIGGERER, *, interval: float = 1.0, timeout: float = 60.0,
          leave: float = 0.0) -> SensorRules:
    return SensorRules(place, timedelta(seconds=interval), timedelta(seconds=timeout), timedelta(seconds=leave))


def state(started_seconds_ago: float = 0.0, **kwargs) -> SensorState:
    return SensorState(NOW - timedelta(seconds=started_seconds_ago), **kwargs)


def server_wait(seconds: float, budget: WaitBudget = WaitBudget()) -> Wait:
    """The engine's real step for a 429 asking for ``seconds``."""
    wait = RateLimitWait(seconds, WaitSource.RETRY_AFTER, NOW + timedelta(seconds=seconds))
    step = next_step(Answered(Outcome.RATE_LIMITED, wait, 429), budget, SETTINGS.rules(Place.TRIGGERER), now=NOW,
                     rand=HALF)
    assert isinstance(step, Wait)
    return step


def gate_wait(seconds: float) -> Wait:
    step = next_step(GateAnswer(NOW + timedelta(seconds=seconds), "another task holds the turn"), WaitBudget(),
                     SETTINGS.rules(Place.TRIGGERER), now=NOW, rand=HALF)
    assert isinstance(step, Wait)
    return step


# --------------------------------------------------------------------------
# next_poke: what the sensor does after a poke.
# --------------------------------------------------------------------------


def test_a_ready_answer_finishes_with_its_xcom():
    assert next_poke(Ready({"id": 7}), state(), rules(), now=NOW) == Done({"id": 7})


def test_a_not_ready_answer_is_poked_again_after_poke_interval():
    step = next_poke(NotReady("response_check returned False"), state(), rules(interval=30), now=NOW)

    assert isinstance(step, PokeAgain)
    assert step.at == step.resume_at == NOW + timedelta(seconds=30)
    assert step.paced_by is None, "an ordinary poke is not a rate-limit wait"
    assert "poke_interval=30s" in step.why


def test_a_rate_limited_answer_waits_for_the_servers_time_when_it_is_longer_than_poke_interval():
    step = next_poke(RateLimited(server_wait(5)), state(), rules(interval=1), now=NOW)

    assert isinstance(step, PokeAgain)
    assert step.at == NOW + timedelta(seconds=5)
    assert step.paced_by is not None and step.paced_by.source is WaitSource.RETRY_AFTER
    assert step.state.budget.rate_limit_waits == 1, "the wait is counted in the try's budget"


def test_a_rate_limited_answer_never_comes_back_before_poke_interval():
    step = next_poke(RateLimited(server_wait(0.5)), state(), rules(interval=2), now=NOW)

    assert isinstance(step, PokeAgain)
    assert step.at == NOW + timedelta(seconds=2)
    assert "poke_interval=2s is longer" in step.why


def test_a_request_held_by_the_shared_gate_is_sent_at_the_gates_time_without_an_interval():
    step = next_poke(Held(gate_wait(0.25)), state(), rules(interval=30), now=NOW)

    assert isinstance(step, PokeAgain)
    assert step.at == NOW + timedelta(milliseconds=250), "nothing was sent: no interval to keep"
    assert "shared gate" in step.why


def test_a_not_ready_answer_ends_the_run_of_immediate_retries_in_a_row():
    step = next_poke(NotReady("no"), state(budget=WaitBudget(immediate_in_a_row=3, rate_limit_waits=3)), rules(),
                     now=NOW)

    assert isinstance(step, PokeAgain)
    assert step.state.budget.immediate_in_a_row == 0
    assert step.state.budget.rate_limit_waits == 3


@pytest.mark.parametrize(
    "place, mode, resume_after",
    [
        (SensorPlace.WORKER_POKING, Mode.IN_PROCESS, 1.0),
        (SensorPlace.WORKER_RESCHEDULING, Mode.RESCHEDULE, 10.0),
        (SensorPlace.WORKER_DEFERRABLE, Mode.DEFER, 10.0),
        (SensorPlace.TRIGGERER, Mode.DEFER, 1.0),
    ],
    ids=["poke", "reschedule", "deferrable", "triggerer"],
)
def test_how_the_sensor_waits_depends_on_where_it_runs(place, mode, resume_after):
    step = next_poke(NotReady("no"), state(), rules(place, interval=1, leave=10), now=NOW)

    assert isinstance(step, PokeAgain)
    assert step.mode is mode
    assert step.at == NOW + timedelta(seconds=1), "the earliest poke does not move"
    assert step.resume_at == NOW + timedelta(seconds=resume_after), "leaving a worker has a minimum delay"


def test_a_wait_the_server_set_is_announced_with_the_sensors_mode_and_return_time():
    step = next_poke(RateLimited(server_wait(3)), state(), rules(SensorPlace.WORKER_RESCHEDULING, leave=10), now=NOW)

    assert isinstance(step, PokeAgain) and step.paced_by is not None
    assert (step.paced_by.mode, step.paced_by.resume_at) == (Mode.RESCHEDULE, NOW + timedelta(seconds=10))
    assert step.paced_by.not_before == NOW + timedelta(seconds=3)


def test_the_sensor_times_out_as_soon_as_the_next_poke_lies_beyond_the_timeout():
    step = next_poke(NotReady("no"), state(started_seconds_ago=59.5), rules(interval=1, timeout=60), now=NOW)

    assert isinstance(step, TimedOut)
    assert "timed out" in step.message and "60s" in step.message


def test_a_poke_due_exactly_at_the_timeout_still_happens():
    step = next_poke(NotReady("no"), state(started_seconds_ago=59), rules(interval=1, timeout=60), now=NOW)

    assert isinstance(step, PokeAgain)


def test_a_server_wait_beyond_the_timeout_times_out_now_instead_of_waiting_to_time_out():
    step = next_poke(RateLimited(server_wait(3600)), state(), rules(timeout=60), now=NOW)

    assert isinstance(step, TimedOut)
    assert "rate limited (Retry-After)" in step.message


def test_a_late_poke_that_finds_the_resource_ready_succeeds_after_the_timeout():
    assert next_poke(Ready(), state(started_seconds_ago=600), rules(timeout=60), now=NOW) == Done()


@given(
    kind=st.sampled_from(["not_ready", "rate_limited", "held"]),
    server_s=st.floats(min_value=0, max_value=7200),
    interval_s=st.floats(min_value=0, max_value=600),
    timeout_s=st.floats(min_value=0, max_value=10_000),
    elapsed_s=st.floats(min_value=0, max_value=10_000),
    place=st.sampled_from(list(SensorPlace)),
)
def test_no_poke_is_ever_early_and_every_wait_fits_in_the_timeout(kind, server_s, interval_s, timeout_s, elapsed_s,
                                                                  place):
    reading = {"not_ready": lambda: NotReady("no"), "rate_limited": lambda: RateLimited(server_wait(server_s)),
               "held": lambda: Held(gate_wait(max(server_s, 0.001)))}[kind]()
    the_rules = rules(place, interval=interval_s, timeout=timeout_s, leave=5)
    the_state = state(started_seconds_ago=elapsed_s)

    step = next_poke(reading, the_state, the_rules, now=NOW)

    floor = NOW + timedelta(seconds=interval_s) if kind != "held" else NOW
    if kind != "not_ready":
        floor = max(floor, reading.wait.not_before)
    if floor > the_state.deadline(the_rules):
        assert isinstance(step, TimedOut)
    else:
        assert isinstance(step, PokeAgain)
        assert step.at == floor, "never before the server's time or poke_interval, and no later"
        assert step.resume_at >= step.at
        assert step.at <= the_state.deadline(the_rules)


# --------------------------------------------------------------------------
# The state and the settings a trigger carries.
# --------------------------------------------------------------------------


def test_the_state_survives_a_json_round_trip():
    original = SensorState(NOW, WaitBudget(rate_limit_waits=2, immediate_in_a_row=1, waiting_since=NOW), pokes=5)

    assert SensorState.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_the_settings_survive_a_json_round_trip():
    original = SensorSettings(poke_interval=2.5, timeout=30, check="pkg.mod.fn", not_ready_status_codes=(404, 425),
                              transient_errors_mean_not_ready=False, check_errors_mean_not_ready=True,
                              min_leave_delay=5, label="http://127.0.0.1:1/x")

    assert SensorSettings.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_poke_mode_sleeps_every_wait_in_the_worker_however_long():
    engine_rules = rules(SensorPlace.WORKER_POKING).engine_rules(SETTINGS)
    wait = RateLimitWait(3600, WaitSource.RETRY_AFTER, NOW + timedelta(hours=1))

    step = next_step(Answered(Outcome.RATE_LIMITED, wait, 429), WaitBudget(in_process_waits=50), engine_rules,
                     now=NOW, rand=HALF)

    assert isinstance(step, Wait) and step.mode is Mode.IN_PROCESS
    assert engine_rules.gate_hints(WaitBudget())[0] >= 3600, "the gate is told the task can be back at any moment"


def test_status_codes_accept_strings_from_a_template():
    assert status_codes(["404", 425, 404]) == (404, 425)


# --------------------------------------------------------------------------
# What an answer means for the sensor.
# --------------------------------------------------------------------------


def response(status: int, body: object = b"", headers: dict[str, str] | None = None) -> requests.Response:
    answer = requests.Response()
    answer.status_code, answer.reason = status, requests.status_codes._codes.get(status, ("",))[0].upper()
    answer._content = json.dumps(body).encode() if not isinstance(body, bytes) else body
    answer.headers.update(headers or {})
    return answer


def read(status: int, *, check=None, settings: SensorSettings | None = None, body: object = b""):
    outcome = {2: Outcome.SUCCESS, 4: Outcome.PERMANENT, 5: Outcome.TRANSIENT}[status // 100]
    from network_requests.engine import Finish

    return reading_of_answer(Finish(outcome), response(status, body), check=check,
                             settings=settings or SensorSettings(poke_interval=1, timeout=60), method="GET",
                             safe_url="http://127.0.0.1:1/x")


def test_any_2xx_is_ready_by_default():
    assert read(204) == Ready()


def test_a_check_that_says_no_means_not_ready():
    assert read(200, check=lambda r: r.json()["ready"], body={"ready": False}) == NotReady("response_check returned False")


def test_a_check_may_return_a_poke_return_value_whose_value_becomes_the_xcom():
    from airflow.sdk import PokeReturnValue

    check = lambda r: PokeReturnValue(r.json()["ready"], xcom_value=r.json())  # noqa: E731

    assert read(200, check=check, body={"ready": True, "id": 3}) == Ready({"ready": True, "id": 3})
    assert isinstance(read(200, check=check, body={"ready": False}), NotReady)


def test_a_client_error_fails_the_try_at_once():
    with pytest.raises(PermanentRequestError) as raised:
        read(404)
    assert raised.value.status_code == 404


def test_a_status_listed_as_not_ready_is_poked_again():
    assert isinstance(read(404, settings=SensorSettings(1, 60, not_ready_status_codes=(404,))), NotReady)


def test_a_server_error_means_not_ready_by_default_and_fails_the_try_when_told():
    assert read(502) == NotReady("answered 502 BAD_GATEWAY")
    with pytest.raises(TransientRequestError):
        read(502, settings=SensorSettings(1, 60, transient_errors_mean_not_ready=False))


def test_a_connection_error_means_not_ready_by_default_and_fails_the_try_when_told():
    error = TransientRequestError("GET http://127.0.0.1:1/x could not connect", method="GET", url="http://127.0.0.1:1/x")

    assert isinstance(reading_of_no_answer(error, settings=SensorSettings(1, 60)), NotReady)
    with pytest.raises(TransientRequestError):
        reading_of_no_answer(error, settings=SensorSettings(1, 60, transient_errors_mean_not_ready=False))


def test_a_check_that_raises_fails_the_try_unless_silent_fail():
    def broken(_response):
        raise KeyError("ready")

    with pytest.raises(KeyError):
        read(200, check=broken)
    assert isinstance(read(200, check=broken, settings=SensorSettings(1, 60, check_errors_mean_not_ready=True)), NotReady)


def test_a_rate_limited_answer_is_a_wait_and_a_wait_past_max_rate_limit_wait_fails():
    wait = server_wait(5)
    assert reading_of_answer(wait, response(429), check=None, settings=SensorSettings(1, 60), method="GET",
                             safe_url="u") == RateLimited(wait)

    from network_requests.engine import FailKind

    fail = Fail(FailKind.RATE_LIMIT_EXCEEDED, "longer than max_rate_limit_wait=1s", status_code=429, wait_seconds=5)
    with pytest.raises(RateLimitExceededError):
        reading_of_answer(fail, response(429), check=None, settings=SensorSettings(1, 60), method="GET", safe_url="u")


def test_a_check_is_named_by_its_import_path():
    assert import_check("json.dumps") is json.dumps
    with pytest.raises(ValueError):
        import_check("dumps")


# --------------------------------------------------------------------------
# The sensor: where it pokes from, and what its trigger carries.
# --------------------------------------------------------------------------


def sensor(**kwargs):
    from network_requests.sensors import NetworkRequestSensor

    kwargs.setdefault("endpoint", "/api/report")
    kwargs.setdefault("deferrable", True)
    return NetworkRequestSensor(task_id="wait", **kwargs)


TASK = TaskRef("dag", "run", "wait")


def test_the_trigger_pokes_itself_with_the_default_check_or_a_check_named_by_import_path():
    assert sensor().why_poke_from_worker(TASK) is None
    assert sensor(response_check="json.loads").why_poke_from_worker(TASK) is None


def test_a_callable_check_makes_the_worker_poke():
    assert "callable" in sensor(response_check=lambda r: True).why_poke_from_worker(TASK)


def test_a_header_that_may_hold_a_secret_makes_the_worker_poke():
    reason = sensor(headers={"Authorization": "Bearer tok-123456"}).why_poke_from_worker(TASK)

    assert reason and "Authorization" in reason


def test_a_subclass_that_reads_answers_its_own_way_pokes_from_the_worker():
    from network_requests.sensors import NetworkRequestSensor

    class Custom(NetworkRequestSensor):
        def classify_response(self, response):
            return Outcome.SUCCESS

    assert "classify_response" in Custom(task_id="t", endpoint="/x", deferrable=True).why_poke_from_worker(TASK)


def test_the_trigger_holds_no_secret_of_the_connection(monkeypatch):
    from network_requests.sensor_engine import SensorState
    from network_requests.sensor_triggers import NetworkRequestSensorTrigger

    monkeypatch.setenv("AIRFLOW_CONN_NETWORK_REQUEST_API", "http://robot:pa55word@127.0.0.1:1?X-Conn-Key=conn-s3cret")
    the_sensor = sensor(http_conn_id="network_request_api")
    the_sensor.hook.url_from_endpoint("/x")  # the worker has read the Connection by the time it defers
    trigger = NetworkRequestSensorTrigger(NOW, the_sensor.request_spec(TASK).to_dict(),
                                          the_sensor.sensor_settings("http://127.0.0.1:1/api/report").to_dict(),
                                          SensorState(NOW).to_dict())

    classpath, kwargs = trigger.serialize()
    stored = json.dumps(kwargs, default=str)

    assert classpath == "network_requests.sensor_triggers.NetworkRequestSensorTrigger"
    assert "pa55word" not in stored and "conn-s3cret" not in stored and "robot" not in stored
    assert type(trigger)(**kwargs).serialize() == (classpath, kwargs), "it rebuilds from what it stored"


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False)])
def test_deferrable_defaults_to_operators_default_deferrable(monkeypatch, value, expected):
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", value)

    assert sensor(deferrable=None).deferrable is expected


def test_exponential_backoff_is_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="exponential_backoff"):
        sensor(exponential_backoff=True)


def first_event(trigger):
    import asyncio

    async def first():
        return await anext(trigger.run())

    return asyncio.run(first()).payload


def test_a_trigger_without_a_request_only_waits_and_hands_the_state_to_a_worker():
    from network_requests.sensor_triggers import NetworkRequestSensorTrigger

    the_state = SensorState(NOW, WaitBudget(rate_limit_waits=2), pokes=3)
    trigger = NetworkRequestSensorTrigger(NOW, None, SensorSettings(1, 60).to_dict(), the_state.to_dict())

    assert first_event(trigger) == {"poke": the_state.to_dict()}


def test_a_check_the_triggerer_cannot_import_is_left_to_a_worker_before_any_poke():
    from network_requests.sensor_triggers import NetworkRequestSensorTrigger

    spec = sensor().request_spec(TASK).to_dict()
    settings = SensorSettings(1, 60, check="no_such_package_here.checks.ready").to_dict()

    assert first_event(NetworkRequestSensorTrigger(NOW, spec, settings, SensorState(NOW).to_dict())) == {
        "poke": SensorState(NOW).to_dict()
    }
