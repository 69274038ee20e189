"""The triggerer side of a deferred rate-limit wait: wait, then send the request from there.

A ``NetworkRequestOperator`` that must wait defers to :class:`RateLimitedRequestTrigger`.
At the allowed moment the trigger runs the operator's own attempt (shared gate, request,
classification, result) in a thread of the triggerer, with the operator's settings:

- a success ends the task from the triggerer (the result pushed as its ``return_value``
  XCom, then a ``TaskSuccessEvent``): no worker slot is taken for it at all;
- another rate limit or gate wait just waits again in the trigger, without a worker;
- any failure goes back to the worker, which raises it there (logs, retries and
  ``on_failure_callback`` as usual) without sending the request again.

So a task that is rate limited costs one worker launch, not one per wait. Only the
operator's own behaviour is run here: an operator with a ``response_check``,
``response_filter``, ``output_path`` or overridden extension points waits with a plain
``DateTimeTrigger`` and sends from the worker (see
``NetworkRequestOperator.finishes_in_triggerer``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from network_requests.exceptions import failure_payload
from network_requests.operators import NetworkRequestOperator, _WaitProgress

CLASSPATH = "network_requests.triggers.RateLimitedRequestTrigger"
#: Waits one trigger may do before it hands the task back to a worker; the operator's
#: rate_limit_timeout normally ends the waiting long before.
MAX_WAITS_IN_TRIGGER = 1000
#: Long sleeps are cut into steps, so a wall-clock jump is noticed.
_SLEEP_STEP_S = 60.0


class _WaitRequested(Exception):
    """Raised by the triggerer-side operator where the worker-side one would defer."""

    def __init__(self, moment: datetime, rate_limit_waits: int, waiting_since: str | None) -> None:
        super().__init__(moment.isoformat())
        self.moment = moment
        self.rate_limit_waits = rate_limit_waits
        self.waiting_since = waiting_since


def _in_the_triggerer() -> bool:
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
        left = (moment - datetime.now(timezone.utc)).total_seconds()
        if left <= 0:
            return
        await asyncio.sleep(min(left, _SLEEP_STEP_S))


class RateLimitedRequestTrigger(BaseTrigger):
    """Wait until ``moment``, then send the operator's request from the triggerer.

    :param moment: the earliest time the request may be sent (UTC).
    :param operator_kwargs: the operator's settings, JSON-safe (see
        ``NetworkRequestOperator.triggerer_kwargs``).
    :param task_ref: ``dag_id``, ``run_id``, ``task_id``, ``map_index``: the gate ticket and log label.
    :param rate_limit_waits: waits this try has done, for the backoff.
    :param waiting_since: when this try started waiting on rate limits (ISO), for the timeout.
    :param push_xcom: push the result as ``return_value`` (the operator's ``do_xcom_push``).
    """

    def __init__(
        self,
        moment: datetime,
        operator_kwargs: dict[str, Any],
        task_ref: dict[str, Any],
        rate_limit_waits: int = 0,
        waiting_since: str | None = None,
        push_xcom: bool = True,
    ) -> None:
        super().__init__()
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        self.moment = moment
        self.operator_kwargs = operator_kwargs
        self.task_ref = task_ref
        self.rate_limit_waits = rate_limit_waits
        self.waiting_since = waiting_since
        self.push_xcom = push_xcom

    def __repr__(self) -> str:
        # Not the kwargs: headers given to the operator may hold a key.
        label = f"{self.task_ref.get('dag_id')}.{self.task_ref.get('task_id')}[{self.task_ref.get('map_index')}]"
        return f"<RateLimitedRequestTrigger {label} at {self.moment.isoformat()}>"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {
                "moment": self.moment,
                "operator_kwargs": self.operator_kwargs,
                "task_ref": self.task_ref,
                "rate_limit_waits": self.rate_limit_waits,
                "waiting_since": self.waiting_since,
                "push_xcom": self.push_xcom,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        moment, waits, since = self.moment, self.rate_limit_waits, self.waiting_since
        for _ in range(MAX_WAITS_IN_TRIGGER):
            await sleep_until(moment)
            try:
                # The attempt is the operator's blocking code (requests, Task SDK calls):
                # in a thread, so the triggerer's other triggers keep running meanwhile.
                result = await asyncio.to_thread(self._attempt, waits, since)
            except _WaitRequested as wait:
                moment, waits, since = wait.moment, wait.rate_limit_waits, wait.waiting_since
                continue
            except Exception as error:  # the worker raises it, with the usual retry meaning
                self.log.warning("Handing the task back to a worker: %s", error)
                yield TriggerEvent({"failure": failure_payload(error)})
                return
            if not _in_the_triggerer():
                yield TriggerEvent({"result": result})
                return
            try:
                if self.push_xcom and result is not None:
                    await asyncio.to_thread(self._push_result, result)
            except Exception as error:  # the worker pushes it then; the response is not lost
                self.log.warning("Could not push the result from the triggerer (%s); handing it to a worker", error)
                yield TriggerEvent({"result": result})
                return
            yield TaskSuccessEvent()
            return
        # Still waiting after that many rounds: let a worker carry on (it defers again).
        yield TriggerEvent({"resume": {"rate_limit_waits": waits, "waiting_since": since}})

    def _push_result(self, result: Any) -> None:
        """Push the XCom as the worker would, through the Task SDK (custom XCom backends included).

        Not through TaskSuccessEvent(xcoms=...): Airflow 3.3.2 stores those JSON-encoded once
        more than a worker's, so a downstream task would pull a string instead of the value.
        """
        from airflow.sdk.execution_time.xcom import XCom

        XCom.set(
            key=XCom.XCOM_RETURN_KEY,
            value=result,
            dag_id=self.task_ref["dag_id"],
            task_id=self.task_ref["task_id"],
            run_id=self.task_ref["run_id"],
            map_index=self.task_ref.get("map_index", -1),
        )

    def _attempt(self, rate_limit_waits: int, waiting_since: str | None) -> Any:
        from network_requests import metrics

        # The triggerer runs no task listener: subscribe the metrics and the wait history
        # here, so waits and attempts in the trigger are counted and charted like a worker's.
        metrics.install()
        operator = TriggererSideOperator(
            task_id=self.task_ref["task_id"], deferrable=True, in_process_wait_threshold=0, **self.operator_kwargs
        )
        since = datetime.fromisoformat(waiting_since) if waiting_since else None
        return operator._attempt({"ti": SimpleNamespace(**self.task_ref)}, _WaitProgress(rate_limit_waits, since))


class TriggererSideOperator(NetworkRequestOperator):
    """The operator as the trigger runs it: where it would defer, it raises the wait instead."""

    def _wait_trigger(self, resume_at: datetime, context: Any, rate_limit_waits: int, waiting_since: str | None) -> Any:
        raise _WaitRequested(resume_at, rate_limit_waits, waiting_since)

    def _minimum_delay(self) -> timedelta:
        # The race that needs a minimum delay (see min_defer_delay) is between a worker and
        # the executor; a wait inside the trigger involves neither, so it ends on time.
        return timedelta(0)
