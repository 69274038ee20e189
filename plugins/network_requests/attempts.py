"""One attempt's bookkeeping, the same in both drivers: what an answer said, and how a wait is announced.

After each answer, both the operator (on a worker) and the trigger (in the triggerer)
call :func:`judge_answer`: the rate-limit headers are read once
(:func:`rate_limit_info`), the answer is classified and reported, the server's wait is
asked for, the engine decides the next step, and the shared gate is told. Only the three
questions a subclass may answer differently come from the ``behaviour`` object: the
operator itself on a worker, :class:`StandardBehaviour` (the operator's own answers) in
the triggerer.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

import requests

from network_requests import events
from network_requests.engine import (WAITED_OUTCOMES, Answered, Fail, FailKind, Mode, Step, Wait, WaitBudget, WaitRules,
                                     next_step)
from network_requests.events import AttemptEvent, WaitEvent
from network_requests.endpoints import redact_url
from network_requests.exceptions import (NetworkRequestError, RateLimitExceededError, ResponseCheckFailed,
                                         TransientRequestError)
from network_requests.gate import ANSWER_RECHECK_SECONDS, WAITING_FOR_AN_ANSWER
from network_requests.gate_access import SharedGate
from network_requests.rate_limit import Backoff, Outcome, RateLimitWait, classify, decide_rate_limit_wait
from network_requests.rate_limit_headers import RateLimitInfo, read_rate_limit_headers
from network_requests.responses import decoded_body, error_for

_READ: weakref.WeakKeyDictionary[requests.Response, RateLimitInfo] = weakref.WeakKeyDictionary()
_MODE_WORDS = {Mode.IN_PROCESS: "in-process", Mode.DEFER: "deferred", Mode.RESCHEDULE: "rescheduled"}


def rate_limit_info(response: requests.Response, *, now: datetime) -> RateLimitInfo:
    """What the response's rate-limit headers say, read once per response (times from ``now``)."""
    info = _READ.get(response)
    if info is None:
        info = read_rate_limit_headers(response.status_code, response.headers, now=now)
        _READ[response] = info
    return info


class Behaviour(Protocol):
    """The questions a subclass of the operator may answer differently."""

    def classify_response(self, response: requests.Response) -> Outcome: ...

    def rate_limit_wait(self, response: requests.Response, *, now: datetime, consecutive_waits: int) -> RateLimitWait: ...

    def result_of(self, response: requests.Response, url: str) -> Any: ...


class StandardBehaviour:
    """The operator's own answers (``NetworkRequestOperator``'s methods call these).

    ``sent_idempotency_key``: the request carries an Idempotency-Key, so a 409 means an earlier
    send of it is still being processed (see ``rate_limit.classify``).
    """

    def __init__(self, *, method: str, backoff: Backoff, rand: Callable[[], float],
                 sent_idempotency_key: bool = False) -> None:
        self.method, self.backoff, self.rand = method, backoff, rand
        self.sent_idempotency_key = sent_idempotency_key

    def classify_response(self, response: requests.Response) -> Outcome:
        return classify(response.status_code, response.headers, sent_idempotency_key=self.sent_idempotency_key)

    def rate_limit_wait(self, response: requests.Response, *, now: datetime, consecutive_waits: int) -> RateLimitWait:
        return decide_rate_limit_wait(rate_limit_info(response, now=now), now=now, backoff=self.backoff,
                                      consecutive_waits=consecutive_waits, rand=self.rand)

    def result_of(self, response: requests.Response, url: str) -> Any:
        return decoded_body(response, url, self.method)


def judge_answer(
    behaviour: Behaviour,
    response: requests.Response,
    *,
    elapsed: float,
    conn_id: str,
    method: str,
    safe_url: str,
    budget: WaitBudget,
    rules: WaitRules,
    now: datetime,
    rand: Callable[[], float],
    gate: SharedGate | None,
    ticket: str,
    log: logging.Logger,
) -> tuple[Step, str]:
    """The step after an answer, and its status line for the log; the gate is told what it said."""
    info = rate_limit_info(response, now=now)
    for rejected in info.rejected:
        log.warning("Rate-limit header not used: %s", rejected)
    outcome = behaviour.classify_response(response)
    events.emit(AttemptEvent(conn_id, method, safe_url, response.status_code, outcome.value, elapsed, now))
    server_wait = None
    if outcome in WAITED_OUTCOMES:
        server_wait = behaviour.rate_limit_wait(response, now=now, consecutive_waits=budget.rate_limit_waits)
    step = next_step(Answered(outcome, server_wait, response.status_code), budget, rules, now=now, rand=rand)
    if gate is not None:
        # Others wait what this task waits when the API is rate limited (a backoff too); a wait
        # too long to start still blocks them. A request still in progress holds only itself.
        until = None
        if outcome is Outcome.RATE_LIMITED and server_wait is not None:
            until = step.not_before if isinstance(step, Wait) else server_wait.not_before
        gate.tell(info, now=now, rate_limited_until=until, ticket=ticket)
    return step, f"{method} {safe_url} -> {response.status_code} in {elapsed:.3f}s"


def finish(
    behaviour: Behaviour,
    outcome: Outcome,
    response: requests.Response,
    url: str,
    *,
    method: str,
    what: str,
    log: logging.Logger,
    response_check: Callable[[requests.Response], bool] | None = None,
) -> Any:
    """A final answer: the result of a success (after ``response_check``), else the error it stands for."""
    safe_url = redact_url(url)
    if outcome is Outcome.TRANSIENT:
        log.warning("%s; transient, Airflow will retry if retries remain", what)
    elif outcome is Outcome.PERMANENT:
        log.error("%s; permanent, failing without retry", what)
    if outcome is not Outcome.SUCCESS:
        raise error_for(outcome, response, method, safe_url)
    log.info("%s; success, %d bytes", what, len(response.content))
    if response_check is not None and not response_check(response):
        raise ResponseCheckFailed(f"response_check returned False for {method} {safe_url}", method=method,
                                  url=safe_url, status_code=response.status_code)
    return behaviour.result_of(response, url)


def report_no_answer(error: NetworkRequestError, *, conn_id: str, elapsed: float, now: datetime,
                     gate: SharedGate | None, ticket: str, log: logging.Logger) -> None:
    """A request that got no answer (refused, timed out, cut at the deadline, refused redirect):
    reported, and no longer out at the gate, so the others don't wait for an answer that won't come."""
    log.warning("%s", error)
    if error.status_code is None:
        events.emit(AttemptEvent(conn_id, error.method, error.url, None, "connection_error", elapsed, now))
    if gate is not None:
        gate.release(ticket, now=now)


def announce_wait(step: Wait, *, what: str, conn_id: str, safe_url: str, task_label: str, now: datetime,
                  log: logging.Logger) -> None:
    """Log a wait the task starts and emit its event (metrics, wait history).

    The gate's short looks while a paced request waits for the answer before it (every
    ``ANSWER_RECHECK_SECONDS``) are logged at DEBUG only: the wait for its turn was announced,
    and each event would write the wait history."""
    if step.reason == WAITING_FOR_AN_ANSWER and step.seconds <= 2 * ANSWER_RECHECK_SECONDS:
        log.debug("%s; waiting %.3fs for the answer to the request before it (shared gate)", what, step.seconds)
        return
    late = "" if step.resume_at == step.not_before else f" for {step.resume_at.isoformat()} (minimum {step.mode.value} delay)"
    log.info("%s; waiting %.3fs (%s) until %s, %s%s, without spending a try%s", what, step.seconds,
             step.source.value, step.not_before.isoformat(), _MODE_WORDS[step.mode], late,
             f": {step.reason}" if step.reason else "")
    events.emit(WaitEvent(conn_id, safe_url, step.seconds, step.source.value, step.mode.value, step.not_before,
                          now, task_label))


def failure_of(step: Fail, *, method: str, safe_url: str) -> NetworkRequestError:
    """The error a task gives up with."""
    if step.kind is FailKind.GATE_UNAVAILABLE:
        return TransientRequestError(f"{method} {safe_url} not sent: {step.problem}", method=method, url=safe_url)
    status = f" ({step.status_code})" if step.status_code else ""
    return RateLimitExceededError(f"{method} {safe_url} was rate limited{status} and {step.problem}", method=method,
                                  url=safe_url, status_code=step.status_code, wait_seconds=step.wait_seconds)


def sleep_until(moment: datetime, *, clock: Callable[[], datetime], sleep: Callable[[float], None]) -> None:
    """Sleep to the exact moment (an in-process wait); a wake-up a hair early sleeps again."""
    for _ in range(100):
        left = (moment - clock()).total_seconds()
        if left <= 0:
            return
        sleep(left)


def budget_after_reschedules(reschedules: int, first_reschedule: datetime | None, initial_delay: timedelta | None) -> WaitBudget:
    """A try's budget when it runs again after reschedules: Airflow keeps no kwargs across a
    reschedule, so it is rebuilt from Airflow's records (an initial delay is one reschedule,
    not a wait). The count of immediate retries in a row starts again after each reschedule."""
    delay = initial_delay or timedelta(0)
    return WaitBudget(
        rate_limit_waits=max(reschedules - (1 if initial_delay else 0), 0),
        waiting_since=first_reschedule + delay if first_reschedule else None,
    )
