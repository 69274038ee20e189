"""The triggerer's driver of a deferred request: wait, then send it from the triggerer.

A ``NetworkRequestOperator`` that must wait defers to :class:`RateLimitedRequestTrigger`,
built from a :class:`~network_requests.request_spec.RequestSpec` (plain JSON, no secret)
and the try's :class:`~network_requests.engine.WaitBudget`. At the allowed moment the
trigger drives the same decision as the operator (:func:`network_requests.engine.next_step`):
it reads the Connection again, asks the shared gate (in a thread: the stores are
synchronous), sends with aiohttp (:mod:`network_requests.sending_async`), judges the answer
with the operator's own behaviour (:mod:`network_requests.attempts`), and then:

- a success ends the task from the triggerer (the result pushed as its ``return_value``
  XCom, then a ``TaskSuccessEvent``): no worker slot is taken for it at all;
- a rate limit or a gate wait is waited out here, without a worker;
- any failure goes back to the worker, which raises it there (logs, retries and
  ``on_failure_callback`` as usual) without sending the request again;
- a request the triggerer cannot send (a proxy, say) goes back to the worker, which sends it.

So a task that is rate limited costs one worker launch, not one per wait.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from network_requests.attempts import StandardBehaviour, announce_wait, failure_of, finish, judge_answer, report_no_answer
from network_requests.endpoints import redact_url
from network_requests.engine import Fail, Finish, Place, Send, Step, Wait, WaitBudget, WaitRules
from network_requests.exceptions import NetworkRequestError, failure_payload
from network_requests.gate_access import default_gate_store, spec_gate
from network_requests.request_spec import RequestSpec
from network_requests.sending_async import CannotSendHere, prepare, send

CLASSPATH = "network_requests.triggers.RateLimitedRequestTrigger"
#: Waits one trigger may do before it hands the task back to a worker; the task's
#: rate_limit_timeout normally ends the waiting long before.
MAX_WAITS_IN_TRIGGER = 1000
#: Long sleeps are cut into steps, so a wall-clock jump is noticed.
_SLEEP_STEP_S = 60.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def in_the_triggerer() -> bool:
    """True in Airflow's triggerer; False when a trigger runs in-line (``dag.test()``).

    ``dag.test()`` resumes the task on the worker with the event's payload whatever the
    event is, so a TaskSuccessEvent's XComs would be lost there: hand the result back instead.
    """
    try:
        from airflow.jobs.triggerer_job_runner import TriggerCommsDecoder
        from airflow.sdk.execution_time import task_runner
    except ImportError:
        return False
    return isinstance(getattr(task_runner, "SUPERVISOR_COMMS", None), TriggerCommsDecoder)


async def sleep_until(moment: datetime) -> None:
    """Sleep until ``moment`` (never wake before it), in steps, on the wall clock."""
    for _ in range(100_000):  # bounded: each pass sleeps at least a little or returns
        left = (moment - _utcnow()).total_seconds()
        if left <= 0:
            return
        await asyncio.sleep(min(left, _SLEEP_STEP_S))


class _Succeeded:
    def __init__(self, result: Any) -> None:
        self.result = result


class RateLimitedRequestTrigger(BaseTrigger):
    """Wait until ``moment``, then send the described request from the triggerer.

    :param moment: the earliest time the request may be sent (UTC).
    :param request: ``RequestSpec.to_dict()``: the request, its caps, and its task instance;
        ``None`` for a request a worker must send: the trigger then only waits, and hands the
        budget back in its event (unlike a ``DateTimeTrigger``, whose event carries no kwargs
        under ``dag.test()``, and which wakes up to a second late).
    :param budget: ``WaitBudget.to_dict()``: what this try has waited so far.
    """

    def __init__(self, moment: datetime, request: dict[str, Any] | None = None,
                 budget: dict[str, Any] | None = None, **legacy: Any) -> None:
        super().__init__()
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        self.moment = moment
        self.request = request
        # A trigger stored by an earlier version of the plugin only waits too; the worker sends.
        self.budget = budget if budget is not None else {k: legacy.get(k) for k in ("rate_limit_waits", "waiting_since")}

    def __repr__(self) -> str:
        # The task and the moment only: the request's data is the user's business, not the log's.
        if self.request is None:
            return f"<RateLimitedRequestTrigger waiting until {self.moment.isoformat()}>"
        task = self.request.get("task") or {}
        label = f"{task.get('dag_id')}.{task.get('task_id')}[{task.get('map_index')}]"
        return f"<RateLimitedRequestTrigger {label} at {self.moment.isoformat()}>"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {"moment": self.moment, "request": self.request, "budget": self.budget}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from network_requests import metrics

        # The triggerer runs no task listener: subscribe the metrics and the wait history
        # here, so waits and attempts in the trigger are counted and charted like a worker's.
        metrics.install()
        budget, moment = WaitBudget.from_dict(self.budget), self.moment
        if self.request is None:
            await sleep_until(moment)
            yield TriggerEvent({"resume": budget.to_dict()})
            return
        spec = RequestSpec.from_dict(self.request)
        rules = spec.waits.rules(Place.TRIGGERER)
        for _ in range(MAX_WAITS_IN_TRIGGER):
            await sleep_until(moment)
            try:
                step = await self._attempt(spec, budget, rules)
            except CannotSendHere as reason:
                self.log.info("Handing the request to a worker to send: %s", reason)
                yield TriggerEvent({"resume": budget.to_dict()})
                return
            except Exception as error:  # the worker raises it, with the usual retry meaning
                self.log.warning("Handing the task back to a worker: %s", error)
                yield TriggerEvent({"failure": failure_payload(error)})
                return
            if isinstance(step, Wait):
                moment, budget = step.resume_at, step.budget
                continue
            yield await self._success_event(spec, step.result)
            return
        # Still waiting after that many rounds: let a worker carry on (it defers again).
        yield TriggerEvent({"resume": budget.to_dict()})

    async def _attempt(self, spec: RequestSpec, budget: WaitBudget, rules: WaitRules) -> Wait | _Succeeded:
        """One round, as the operator's loop does it: the gate, the request, the engine's step."""
        request = await asyncio.to_thread(prepare, spec)  # reads the Connection: its secrets stay here
        safe_url, ticket = redact_url(request.endpoint_url), spec.task.ticket
        gate = await asyncio.to_thread(spec_gate, default_gate_store(), spec, base_url=request.base_url)
        step: Step = Send(budget)
        if gate is not None:
            step = await asyncio.to_thread(gate.admission_step, ticket, budget, rules, now=_utcnow(), rand=random.random)
        what = f"{spec.method} {safe_url} not sent"
        if isinstance(step, Send):
            started = time.monotonic()
            try:
                response, elapsed = await send(request, deadline=_delta(spec.request_deadline),
                                               max_response_bytes=spec.max_response_bytes)
            except NetworkRequestError as error:
                await asyncio.to_thread(report_no_answer, error, conn_id=spec.conn_id, now=_utcnow(), gate=gate,
                                        elapsed=time.monotonic() - started, ticket=ticket, log=self.log)
                raise
            behaviour = StandardBehaviour(method=spec.method, backoff=rules.backoff, rand=random.random,
                                          sent_idempotency_key=spec.carries_idempotency_key)
            step, what = await asyncio.to_thread(
                judge_answer, behaviour, response, elapsed=elapsed, conn_id=spec.conn_id, method=spec.method,
                safe_url=safe_url, budget=step.budget, rules=rules, now=_utcnow(), rand=random.random, gate=gate,
                ticket=ticket, log=self.log,
            )
            if isinstance(step, Finish):
                return _Succeeded(finish(behaviour, step.outcome, response, request.endpoint_url, method=spec.method,
                                         what=what, log=self.log))
        if isinstance(step, Fail):
            self.log.error("%s; giving up: %s", what, step.problem)
            raise failure_of(step, method=spec.method, safe_url=safe_url)
        announce_wait(step, what=what, conn_id=spec.conn_id, safe_url=safe_url, task_label=spec.task.label,
                      now=_utcnow(), log=self.log)
        return step

    async def _success_event(self, spec: RequestSpec, result: Any) -> TriggerEvent:
        if not in_the_triggerer():
            return TriggerEvent({"result": result})
        try:
            if spec.push_xcom and result is not None:
                await asyncio.to_thread(self._push_result, spec, result)
        except Exception as error:  # the worker pushes it then; the response is not lost
            self.log.warning("Could not push the result from the triggerer (%s); handing it to a worker", error)
            return TriggerEvent({"result": result})
        return TaskSuccessEvent()

    @staticmethod
    def _push_result(spec: RequestSpec, result: Any) -> None:
        """Push the XCom as the worker would, through the Task SDK (custom XCom backends included).

        Not through TaskSuccessEvent(xcoms=...): Airflow 3.3.2 stores those JSON-encoded once
        more than a worker's, so a downstream task would pull a string instead of the value.
        """
        from airflow.sdk.execution_time.xcom import XCom

        task = spec.task
        XCom.set(key=XCom.XCOM_RETURN_KEY, value=result, dag_id=task.dag_id, task_id=task.task_id,
                 run_id=task.run_id, map_index=task.map_index)


def _delta(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)
