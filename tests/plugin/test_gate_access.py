"""Which gate a request counts against, with which declared limits (network_requests.gate_access).

The settings come from the task's ``rate_limit``/``gate_key`` arguments, else the Connection's
``extra``; a bad one is a clear error naming the field. The gate itself is exercised here on a
store in memory; tests/plugin/test_configured_limits_dag.py runs the same through Airflow.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from network_requests.attempts import StandardBehaviour, judge_answer
from network_requests.configured_limits import ConfiguredLimit, GateKey
from network_requests.engine import Place, Send, Wait, WaitBudget, WaitRules
from network_requests.gate_access import GateSettingsError, SharedGate, gate_settings
from network_requests.gate_store import MemoryGateStore
from network_requests.rate_limit import Backoff, Outcome
from network_requests.rate_limit_headers import RateLimitInfo
from network_requests.request_spec import RequestSpec, TaskRef, declaration_as_json

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
PER_SECOND = {"requests": 10, "per": "1s"}
RULES = WaitRules(place=Place.TRIGGERER, backoff=Backoff(retry_delay=timedelta(seconds=5)))


# -- which limits -----------------------------------------------------------------------------------


def test_the_connections_extra_declares_the_limits_when_the_task_declares_none():
    key, limits = gate_settings("api", conn_extra={"rate_limit": PER_SECOND, "Accept": "application/json"})

    assert key == GateKey("api", checks_origin=True)
    assert limits == (ConfiguredLimit(10, 1.0, 10),)


def test_the_tasks_rate_limit_replaces_the_connections():
    _, limits = gate_settings("api", rate_limit=[{"requests": 5000, "per": "1h", "burst": 100}],
                              conn_extra={"rate_limit": PER_SECOND})

    assert limits == (ConfiguredLimit(5000, 3600.0, 100),)


def test_an_empty_list_declares_no_limits_whatever_the_connection_says():
    assert gate_settings("api", rate_limit=[], conn_extra={"rate_limit": PER_SECOND})[1] == ()


@pytest.mark.parametrize("rendered", ["", "  "])
def test_a_template_rendering_to_nothing_leaves_the_limits_to_the_connection(rendered):
    assert gate_settings("api", rate_limit=rendered, conn_extra={"rate_limit": PER_SECOND})[1] == (
        ConfiguredLimit(10, 1.0, 10),
    )


def test_a_rate_limit_rendered_as_json_text_is_read():
    assert gate_settings("api", rate_limit='{"requests": 3, "per": "2s"}')[1] == (ConfiguredLimit(3, 2.0, 3),)


def test_a_bad_limit_in_the_connections_extra_names_the_connection_the_field_and_the_rule():
    with pytest.raises(GateSettingsError) as raised:
        gate_settings("github", conn_extra={"rate_limit": {"requests": 10, "per": "fast"}})

    message = str(raised.value)
    assert "Connection 'github'" in message and "rate_limit.per" in message and "'fast'" in message
    assert "'1h'" in message, "the message shows what a valid value looks like"


def test_a_bad_rate_limit_argument_names_the_argument_not_the_connection():
    with pytest.raises(GateSettingsError) as raised:
        gate_settings("github", rate_limit=[PER_SECOND, {"requests": 0, "per": "1s"}],
                      conn_extra={"rate_limit": PER_SECOND})

    message = str(raised.value)
    assert "rate_limit argument" in message and "rate_limit[1].requests" in message
    assert "Connection" not in message


def test_a_bad_gate_key_names_the_field():
    with pytest.raises(GateSettingsError, match="gate_key"):
        gate_settings("api", gate_key="a\nb")


def test_a_gate_key_names_a_shared_quota_whose_origin_is_not_checked():
    key, _ = gate_settings("github_repos", gate_key="github-token")

    assert key == GateKey("key:github-token", checks_origin=False)


def test_a_settings_error_fails_the_task_without_a_retry():
    from airflow.sdk.exceptions import AirflowFailException

    assert issubclass(GateSettingsError, AirflowFailException)


# -- what the trigger is handed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument, expected",
    [
        (None, None),
        ("", None),
        ([], []),
        (PER_SECOND, [{"requests": 10, "per": 1.0, "burst": 10}]),
        ('[{"requests": 3, "per": "2s", "burst": 1}]', [{"requests": 3, "per": 2.0, "burst": 1}]),
        (ConfiguredLimit(5000, 3600.0, 100), [{"requests": 5000, "per": 3600.0, "burst": 100}]),
    ],
)
def test_the_rate_limit_argument_travels_to_the_triggerer_as_plain_json_and_reads_back_the_same(argument, expected):
    as_json = declaration_as_json(argument)

    assert as_json == expected
    assert gate_settings("api", rate_limit=as_json)[1] == gate_settings("api", rate_limit=argument)[1]


def test_a_request_description_from_an_earlier_version_has_no_limits_of_its_own():
    spec = RequestSpec.from_dict({"conn_id": "api", "endpoint": "/", "method": "GET",
                                  "task": {"dag_id": "d", "run_id": "r", "task_id": "t"}})

    assert (spec.rate_limit, spec.gate_key) == (None, None)
    assert RequestSpec.from_dict(spec.to_dict()) == spec


# -- one gate per key -----------------------------------------------------------------------------------


def _answer(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code, response.headers, response._content = status, CaseInsensitiveDict(headers or {}), b"{}"
    return response


def test_a_shared_key_is_one_gate_for_two_connections_with_different_base_urls():
    store = MemoryGateStore(clock=lambda: NOW.timestamp())
    shared = GateKey("key:token", checks_origin=False)
    first = SharedGate(store, "repos", "https://api.github.com", key=shared)
    second = SharedGate(store, "search", "https://uploads.github.com", key=shared)

    first.tell(RateLimitInfo(), now=NOW, rate_limited_until=NOW + timedelta(seconds=30), ticket="a")

    answer = second.ask("b", now=NOW, in_process_up_to=0.0, min_wait=0.0)
    assert answer.send_at == NOW + timedelta(seconds=30), "the block of one Connection holds the other"
    assert store.read("repos") == store.read("search") == type(store.read("x"))(), "nothing under the Connection ids"


def test_a_connections_own_gate_forgets_what_another_api_said():
    store = MemoryGateStore(clock=lambda: NOW.timestamp())
    SharedGate(store, "api", "https://old.example").tell(RateLimitInfo(), now=NOW,
                                                        rate_limited_until=NOW + timedelta(seconds=30), ticket="a")

    assert SharedGate(store, "api", "https://new.example").ask("b", now=NOW, in_process_up_to=0, min_wait=0).send_at is None


def test_declared_limits_hold_requests_back_before_any_429():
    store = MemoryGateStore(clock=lambda: NOW.timestamp())
    gate = SharedGate(store, "api", "http://api", limits=(ConfiguredLimit(2, 10.0, 2),), reports_answers=True)
    answers = []
    for ticket in "abc":
        answers.append(gate.ask(ticket, now=NOW, in_process_up_to=0.0, min_wait=0.0))
        if answers[-1].send_at is None:
            gate.tell(RateLimitInfo(), now=NOW, rate_limited_until=None, ticket=ticket)

    assert [answer.send_at for answer in answers[:2]] == [None, None], "two of two per 10 s go at once"
    third = answers[2]
    assert third.send_at is not None and third.send_at >= NOW + timedelta(seconds=10), "the third waits for the window"
    assert "2 per 10s" in (third.reason or ""), "the log says which declared limit holds it"


def test_a_409_to_a_keyed_request_waits_that_request_and_holds_no_other_task():
    store = MemoryGateStore(clock=lambda: NOW.timestamp())
    gate = SharedGate(store, "api", "http://api", reports_answers=True)
    assert gate.ask("post", now=NOW, in_process_up_to=0.0, min_wait=0.0).send_at is None
    behaviour = StandardBehaviour(method="POST", backoff=RULES.backoff, rand=lambda: 0.0, sent_idempotency_key=True)

    step, _ = judge_answer(behaviour, _answer(409, {"Retry-After": "30"}), elapsed=0.1, conn_id="api", method="POST",
                           safe_url="http://api/orders", budget=WaitBudget(), rules=RULES, now=NOW,
                           rand=lambda: 0.0, gate=gate, ticket="post", log=logging.getLogger("test"))

    assert isinstance(step, Wait) and step.not_before == NOW + timedelta(seconds=30)
    assert gate.ask("other", now=NOW, in_process_up_to=0.0, min_wait=0.0).send_at is None, (
        "the 409 is about that request, not the API's quota"
    )


def test_a_409_to_a_request_without_a_key_is_final():
    behaviour = StandardBehaviour(method="POST", backoff=RULES.backoff, rand=lambda: 0.0)

    assert behaviour.classify_response(_answer(409, {"Retry-After": "30"})) is Outcome.PERMANENT


def test_a_gate_with_limits_still_lets_a_request_go_at_once_on_first_contact():
    gate = SharedGate(MemoryGateStore(clock=lambda: NOW.timestamp()), "api", "http://api",
                      limits=(ConfiguredLimit(1, 60.0, 1),), cheap_looks=True, reports_answers=True)

    assert gate.admission_step("a", WaitBudget(), RULES, now=NOW, rand=lambda: 0.0) == Send(WaitBudget())


def test_task_ref_tickets_are_what_the_gate_queues():
    assert TaskRef("d", "r", "t", 2).ticket == "d|r|t|2"


def test_a_paced_request_waits_for_the_answer_before_it_quietly_then_goes_once_it_is_stored(caplog):
    # Quota spent and pacing at 2/s: "a" was let out and is unanswered when "b" is due. "b"
    # looks again every 0.1 s (not announced as a wait: that would write the wait history
    # ten times a second), and once a's answer is stored the gate holds it to that answer's reset.
    from network_requests import events
    from network_requests.attempts import announce_wait
    from network_requests.gate import ANSWER_RECHECK_SECONDS, WAITING_FOR_AN_ANSWER, GateState

    clock = NOW.timestamp()
    store = MemoryGateStore(clock=lambda: clock)
    paced = GateState(remaining=0, interval=0.5, observed_at=clock - 1, updated_at=clock - 1,
                      origin="http://api", in_flight={"a": clock - 0.5}, tickets={"b": clock})
    store.update("api", lambda _: (None, paced))
    gate = SharedGate(store, "api", "http://api", cheap_looks=True, reports_answers=True)
    emitted: list[object] = []
    listener = events.subscribe(emitted.append)
    try:
        step = gate.admission_step("b", WaitBudget(), RULES, now=NOW, rand=lambda: 0.0)
        assert isinstance(step, Wait) and step.reason == WAITING_FOR_AN_ANSWER
        assert step.not_before == NOW + timedelta(seconds=ANSWER_RECHECK_SECONDS)
        with caplog.at_level(logging.DEBUG):
            announce_wait(step, what="GET http://api/x not sent", conn_id="api", safe_url="http://api/x",
                          task_label="dag.t[1]", now=NOW, log=logging.getLogger("test"))
        assert emitted == [], "a look while an answer is out is not a wait event"
        assert [r.levelno for r in caplog.records if "answer to the request before it" in r.message] == [logging.DEBUG]

        gate.tell(RateLimitInfo(limit=2, remaining=0, reset_after=1, interval=0.5), now=NOW,
                  rate_limited_until=None, ticket="a")
        later = gate.admission_step("b", WaitBudget(), RULES, now=NOW + timedelta(seconds=0.1), rand=lambda: 0.0)
        assert isinstance(later, Wait) and later.not_before >= NOW + timedelta(seconds=1), "held to a's reset"
    finally:
        events.unsubscribe(listener)
