"""The one "what next" decision (network_requests.engine): tables of observation -> step, a fixed clock.

Both drivers (the operator on a worker, the trigger in the triggerer) carry out these steps;
nothing here sleeps, sends or reads a clock.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from network_requests.engine import (
    GATE_UNREADABLE_WAIT,
    MAX_GATE_FAILURES,
    MAX_IN_PROCESS_WAITS,
    Answered,
    Fail,
    FailKind,
    Finish,
    GateAnswer,
    GateUnreadable,
    InitialDelay,
    Mode,
    Place,
    Send,
    Wait,
    WaitBudget,
    WaitRules,
    next_step,
)
from network_requests.rate_limit import Backoff, Outcome, RateLimitWait, WaitSource

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
HALF = lambda: 0.5  # noqa: E731 - the jitter source: half the jitter fraction
BACKOFF = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, jitter=0.1)


def rules(place: Place = Place.WORKER_DEFERRABLE, **overrides) -> WaitRules:
    defaults = {
        Place.WORKER_DEFERRABLE: {"in_process_threshold": timedelta(0), "min_leave_delay": timedelta(seconds=1)},
        Place.WORKER_RESCHEDULING: {"in_process_threshold": timedelta(seconds=5), "min_leave_delay": timedelta(seconds=10)},
        Place.TRIGGERER: {},
    }[place]
    values = {"place": place, "backoff": BACKOFF, "max_single_wait": timedelta(hours=1),
              "total_timeout": timedelta(hours=6), **defaults, **overrides}
    return WaitRules(**values)


def server_wait(seconds: float, source: WaitSource = WaitSource.RETRY_AFTER) -> RateLimitWait:
    return RateLimitWait(seconds, source, NOW + timedelta(seconds=seconds))


def rate_limited(seconds: float, source: WaitSource = WaitSource.RETRY_AFTER) -> Answered:
    return Answered(Outcome.RATE_LIMITED, server_wait(seconds, source), status_code=429)


def decide(observation, budget: WaitBudget = WaitBudget(), place: Place = Place.WORKER_DEFERRABLE, **rule_overrides):
    return next_step(observation, budget, rules(place, **rule_overrides), now=NOW, rand=HALF)


# -- The gate's answer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "place, wait_s, mode, resume_after_s",
    [
        (Place.WORKER_DEFERRABLE, 3.0, Mode.DEFER, 3.0),
        (Place.WORKER_DEFERRABLE, 0.5, Mode.DEFER, 1.0),  # the minimum defer delay
        (Place.WORKER_RESCHEDULING, 3.0, Mode.IN_PROCESS, 3.0),  # under the 5 s threshold
        (Place.WORKER_RESCHEDULING, 7.0, Mode.RESCHEDULE, 10.0),  # MIN_RESCHEDULE_DELAY
        (Place.WORKER_RESCHEDULING, 30.0, Mode.RESCHEDULE, 30.0),
        (Place.TRIGGERER, 0.5, Mode.DEFER, 0.5),  # no minimum delay inside the trigger
        (Place.TRIGGERER, 300.0, Mode.DEFER, 300.0),
    ],
)
def test_a_gate_wait_is_carried_out_where_the_task_can_be_back(place, wait_s, mode, resume_after_s):
    step = decide(GateAnswer(NOW + timedelta(seconds=wait_s), "pacing"), place=place)

    assert isinstance(step, Wait)
    assert (step.mode, step.source, step.reason) == (mode, WaitSource.SHARED_GATE, "pacing")
    assert step.not_before == NOW + timedelta(seconds=wait_s)
    assert step.resume_at == NOW + timedelta(seconds=resume_after_s)
    assert step.budget.waiting_since == NOW, "a gate wait starts the try's waiting clock"
    assert step.budget.rate_limit_waits == 0, "the gate's waits do not grow the backoff"


@pytest.mark.parametrize("send_at", [None, NOW, NOW - timedelta(seconds=1)])
def test_an_open_gate_means_send_now_and_clears_the_gate_failures(send_at):
    step = decide(GateAnswer(send_at), WaitBudget(gate_failures=2))

    assert step == Send(WaitBudget(gate_failures=0))


def test_in_process_waits_stop_after_the_maximum_per_run():
    slept_enough = WaitBudget(in_process_waits=MAX_IN_PROCESS_WAITS)

    step = decide(GateAnswer(NOW + timedelta(seconds=2)), slept_enough, Place.WORKER_RESCHEDULING)

    assert step.mode is Mode.RESCHEDULE
    assert step.budget.in_process_waits == 0, "the task comes back in a new process"


def test_an_in_process_wait_is_counted():
    step = decide(GateAnswer(NOW + timedelta(seconds=2)), WaitBudget(in_process_waits=1), Place.WORKER_RESCHEDULING)

    assert step.mode is Mode.IN_PROCESS
    assert step.budget.in_process_waits == 2


@pytest.mark.parametrize(
    "place, budget, expected",
    [
        (Place.WORKER_DEFERRABLE, WaitBudget(), (0.0, 1.0)),
        (Place.WORKER_RESCHEDULING, WaitBudget(), (5.0, 10.0)),
        (Place.WORKER_RESCHEDULING, WaitBudget(in_process_waits=MAX_IN_PROCESS_WAITS), (0.0, 10.0)),
        (Place.TRIGGERER, WaitBudget(), (float("inf"), 0.0)),
    ],
)
def test_the_gate_is_told_when_the_task_can_really_be_back(place, budget, expected):
    assert rules(place).gate_hints(budget) == expected


# -- A gate that cannot be read ---------------------------------------------------------------------


def test_an_unreadable_gate_is_a_short_wait_never_an_open_gate():
    step = decide(GateUnreadable("ConnectionError: redis down"))

    assert isinstance(step, Wait)
    assert step.not_before == NOW + GATE_UNREADABLE_WAIT
    assert step.source is WaitSource.SHARED_GATE
    assert step.budget.gate_failures == 1
    assert "redis down" in step.reason


def test_a_gate_unreadable_several_times_in_a_row_fails_the_try():
    step = decide(GateUnreadable("boom"), WaitBudget(gate_failures=MAX_GATE_FAILURES - 1))

    assert isinstance(step, Fail)
    assert step.kind is FailKind.GATE_UNAVAILABLE
    assert "boom" in step.problem


# -- The server's answer ------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.TRANSIENT, Outcome.PERMANENT])
def test_an_answer_that_is_not_a_rate_limit_is_final(outcome):
    assert decide(Answered(outcome, status_code=200)) == Finish(outcome)


def test_a_rate_limit_waits_what_the_server_asked_and_counts_the_wait():
    step = decide(rate_limited(2.0), WaitBudget(immediate_in_a_row=1))

    assert isinstance(step, Wait)
    assert (step.seconds, step.source, step.mode) == (2.0, WaitSource.RETRY_AFTER, Mode.DEFER)
    assert step.budget.rate_limit_waits == 1
    assert step.budget.immediate_in_a_row == 0, "a real wait ends a run of immediate retries"
    assert step.budget.waiting_since == NOW


def test_a_rate_limit_without_the_servers_wait_is_a_bug_of_the_driver():
    with pytest.raises(ValueError):
        decide(Answered(Outcome.RATE_LIMITED))


# -- A keyed request the server is still processing (409) ------------------------------------------


def still_processing(seconds: float, source: WaitSource = WaitSource.RETRY_AFTER) -> Answered:
    return Answered(Outcome.IN_PROGRESS, server_wait(seconds, source), status_code=409)


@pytest.mark.parametrize("place", list(Place))
def test_a_request_still_in_progress_is_waited_out_and_sent_again_without_spending_a_try(place):
    step = decide(still_processing(3.0), place=place)

    assert isinstance(step, Wait), "a wait, not the end of the try"
    assert (step.seconds, step.source) == (3.0, WaitSource.RETRY_AFTER)
    assert step.budget.rate_limit_waits == 1, "a header-less one backs off further next time"
    assert step.budget.waiting_since == NOW, "its waiting counts against rate_limit_timeout"
    assert "still processing" in step.reason and "Idempotency-Key" in step.reason


def test_a_request_still_in_progress_is_bounded_by_the_rate_limit_timeout():
    waited_5h59 = WaitBudget(waiting_since=NOW - timedelta(hours=5, minutes=59))

    step = decide(still_processing(120.0, WaitSource.BACKOFF), waited_5h59)

    assert isinstance(step, Fail)
    assert (step.kind, step.status_code) == (FailKind.RATE_LIMIT_EXCEEDED, 409)
    assert "rate_limit_timeout" in step.problem


def test_a_request_still_in_progress_again_and_again_at_once_backs_off():
    step = decide(still_processing(0.0), WaitBudget(immediate_in_a_row=1))

    assert (step.source, step.seconds) == (WaitSource.BACKOFF, pytest.approx(10.5))


# -- No hammering ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_a_row_before, seconds, source",
    [
        (0, 0.0, WaitSource.RETRY_AFTER),  # the first immediate retry: at once
        (1, 10.5, WaitSource.BACKOFF),  # the second in a row: retry_delay + half the 10 % jitter
        (2, 21.0, WaitSource.BACKOFF),  # then the task's exponential factor (2)
        (3, 42.0, WaitSource.BACKOFF),
    ],
)
@pytest.mark.parametrize("place", list(Place))
def test_an_immediate_retry_is_allowed_once_in_a_row_then_backs_off_everywhere(place, in_a_row_before, seconds, source):
    step = decide(rate_limited(0.0), WaitBudget(immediate_in_a_row=in_a_row_before), place)

    assert isinstance(step, Wait)
    assert (step.seconds, step.source) == (pytest.approx(seconds), source)
    assert step.budget.immediate_in_a_row == in_a_row_before + 1
    if in_a_row_before:
        assert "immediate retry" in step.reason


@pytest.mark.parametrize("source", [WaitSource.RETRY_AFTER, WaitSource.RATELIMIT_RESET, WaitSource.X_RATELIMIT_RESET])
def test_a_date_or_reset_already_past_counts_as_an_immediate_retry(source):
    step = decide(rate_limited(0.0, source), WaitBudget(immediate_in_a_row=1))

    assert step.source is WaitSource.BACKOFF


def test_an_immediate_retry_is_slept_in_the_task_at_once():
    step = decide(rate_limited(0.0))

    assert (step.mode, step.resume_at) == (Mode.IN_PROCESS, NOW)


def test_retry_after_zero_forever_ends_at_rate_limit_timeout_after_a_bounded_number_of_requests():
    """A simulated server that always answers 429, Retry-After: 0, with retry_delay 1 s and no growth."""
    the_rules = rules(Place.TRIGGERER, backoff=Backoff(retry_delay=timedelta(seconds=1), jitter=0.0),
                      total_timeout=timedelta(minutes=2))
    now, budget, sends = NOW, WaitBudget(), [NOW]
    for _ in range(10_000):
        step = next_step(Answered(Outcome.RATE_LIMITED, RateLimitWait(0.0, WaitSource.RETRY_AFTER, now), 429),
                         budget, the_rules, now=now, rand=HALF)
        if isinstance(step, Fail):
            break
        now, budget = step.resume_at, step.budget
        sends.append(now)
    else:
        pytest.fail("the loop never ended")

    assert step.kind is FailKind.RATE_LIMIT_EXCEEDED
    assert "rate_limit_timeout" in step.problem
    per_minute = max(sum(1 for sent in sends if start <= sent < start + timedelta(minutes=1)) for start in sends)
    assert per_minute <= 62, "one immediate retry, then at most one request per retry_delay"
    assert sends[-1] - NOW <= timedelta(minutes=2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 0.0, 1.0, 3.0]), min_size=1, max_size=40), st.sampled_from(list(Place)))
def test_never_before_the_server_allowed_and_never_two_immediate_retries_in_a_row(server_waits, place):
    the_rules = rules(place, backoff=Backoff(retry_delay=timedelta(seconds=2), multiplier=2.0, max_delay=timedelta(seconds=60)))
    now, budget, gaps = NOW, WaitBudget(), []
    for asked in server_waits:
        step = next_step(Answered(Outcome.RATE_LIMITED, RateLimitWait(asked, WaitSource.RETRY_AFTER,
                                                                      now + timedelta(seconds=asked)), 429),
                         budget, the_rules, now=now, rand=HALF)
        assert isinstance(step, Wait)
        gap = (step.resume_at - now).total_seconds()
        assert gap >= asked
        gaps.append(gap)
        now, budget = step.resume_at, step.budget
    assert not any(a == 0 and b == 0 for a, b in zip(gaps, gaps[1:]))


# -- The caps -----------------------------------------------------------------------------------------------


def test_a_wait_longer_than_max_rate_limit_wait_fails_at_once_with_the_status():
    step = decide(rate_limited(7200.0))

    assert isinstance(step, Fail)
    assert step.kind is FailKind.RATE_LIMIT_EXCEEDED
    assert (step.status_code, step.wait_seconds) == (429, 7200.0)
    assert "max_rate_limit_wait" in step.problem


def test_waiting_past_rate_limit_timeout_fails_before_the_wait_starts():
    budget = WaitBudget(rate_limit_waits=3, waiting_since=NOW - timedelta(seconds=50))

    step = decide(rate_limited(20.0), budget, total_timeout=timedelta(seconds=60))

    assert isinstance(step, Fail) and "rate_limit_timeout" in step.problem


def test_a_gate_wait_is_capped_too_and_says_no_status():
    step = decide(GateAnswer(NOW + timedelta(hours=2), "blocked"))

    assert isinstance(step, Fail) and step.status_code is None


def test_the_initial_delay_is_neither_capped_nor_counted_nor_slept_holding_a_slot():
    step = decide(InitialDelay(NOW + timedelta(hours=3)), place=Place.WORKER_RESCHEDULING)

    assert isinstance(step, Wait)
    assert (step.mode, step.source) == (Mode.RESCHEDULE, WaitSource.INITIAL_DELAY)
    assert step.budget.waiting_since is None
    assert decide(InitialDelay(NOW + timedelta(seconds=2)), place=Place.WORKER_RESCHEDULING).mode is Mode.RESCHEDULE


# -- The budget travels with a deferral ------------------------------------------------------------------------


def test_the_budget_round_trips_through_json_without_the_in_process_count():
    budget = WaitBudget(rate_limit_waits=4, immediate_in_a_row=2, waiting_since=NOW, in_process_waits=3, gate_failures=1)

    again = WaitBudget.from_dict(budget.to_dict())

    assert again == replace(budget, in_process_waits=0)
    assert WaitBudget.from_dict(None) == WaitBudget()
