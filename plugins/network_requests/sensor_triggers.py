"""The triggerer's driver of a deferred ``NetworkRequestSensor``: wait, poke, wait again, in the triggerer.

The sensor defers to :class:`NetworkRequestSensorTrigger` with a
:class:`~network_requests.request_spec.RequestSpec` (plain JSON, no secret: the
Connection is read again here), its :class:`~network_requests.sensor_pokes.SensorSettings`
and its :class:`~network_requests.sensor_engine.SensorState`. At each allowed moment the
trigger pokes as the worker does: it asks the shared gate (in a thread: the stores are
synchronous), sends with aiohttp (:mod:`network_requests.sending_async`), judges the answer
with the operator's own behaviour (:mod:`network_requests.attempts`), reads it as the
sensor does (:mod:`network_requests.sensor_pokes`) and follows
:func:`~network_requests.sensor_engine.next_poke`. Its one event is a small contract the
sensor's ``resume_after_wait`` interprets:

- ``{"ready": xcom}``: the resource is ready;
- ``{"timeout": message}``: the sensor timed out (``soft_fail`` makes it skipped);
- ``{"failure": ...}``: the try fails on the worker, with the error's retry meaning;
- ``{"poke": state}``: a worker pokes now (the request or the check can't run here, or the
  trigger only waited): the state carries the first poke's time, so ``timeout`` still counts from it.

Every event carries the state, since ``dag.test()`` hands a resumed task the event only.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from network_requests import sending_async
from network_requests.attempts import StandardBehaviour, failure_of, judge_answer, report_no_answer
from network_requests.endpoints import redact_url
from network_requests.engine import Fail, Send, Step, Wait
from network_requests.exceptions import NetworkRequestError, failure_payload
from network_requests.gate_access import default_gate_store, spec_gate
from network_requests.request_spec import RequestSpec
from network_requests.sensor_engine import Done, Held, PokeAgain, SensorPlace, SensorState, SensorStep, next_poke
from network_requests.sensor_pokes import (ResponseCheck, SensorSettings, import_check, reading_of_answer,
                                           reading_of_no_answer, report_step)
from network_requests.triggers import sleep_until

CLASSPATH = "network_requests.sensor_triggers.NetworkRequestSensorTrigger"
#: Pokes one trigger may do before it hands the task to a worker, which defers again: the
#: sensor's timeout normally ends the waiting long before.
MAX_POKES_IN_TRIGGER = 1000


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class NetworkRequestSensorTrigger(BaseTrigger):
    """Poke the described request from the triggerer until it is ready, times out or fails.

    :param moment: the earliest time of the next poke (UTC).
    :param request: ``RequestSpec.to_dict()``; ``None`` when a worker must poke: the trigger
        then only waits until ``moment`` and hands the state back.
    :param sensor: ``SensorSettings.to_dict()``.
    :param state: ``SensorState.to_dict()``.
    """

    def __init__(self, moment: datetime, request: dict[str, Any] | None, sensor: dict[str, Any],
                 state: dict[str, Any]) -> None:
        super().__init__()
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        self.moment, self.request, self.sensor, self.state = moment, request, sensor, state

    def __repr__(self) -> str:
        # The endpoint (already redacted) and the moment only: the request's data stays out of the log.
        who = "waiting" if self.request is None else "poking"
        return f"<NetworkRequestSensorTrigger {who} {self.sensor.get('label', '')} at {self.moment.isoformat()}>"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {"moment": self.moment, "request": self.request, "sensor": self.sensor, "state": self.state}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from network_requests import metrics

        metrics.install()  # the triggerer runs no task listener: count its attempts and waits here
        state, moment = SensorState.from_dict(self.state), self.moment
        settings = SensorSettings.from_dict(self.sensor)
        if self.request is None:
            await sleep_until(moment)
            yield TriggerEvent({"poke": state.to_dict()})
            return
        spec = RequestSpec.from_dict(self.request)
        try:
            check = None if settings.check is None else import_check(settings.check)
        except Exception as error:  # the worker may have what the triggerer lacks
            self.log.warning("The response check can't be imported in the triggerer (%s); a worker pokes", error)
            await sleep_until(moment)
            yield TriggerEvent({"poke": state.to_dict()})
            return
        for _ in range(MAX_POKES_IN_TRIGGER):
            await sleep_until(moment)
            try:
                step = await self._poke(spec, settings, check, state)
            except sending_async.CannotSendHere as reason:
                self.log.info("Handing the poke to a worker: %s", reason)
                yield TriggerEvent({"poke": state.to_dict()})
                return
            except Exception as error:  # the worker raises it, with the usual retry meaning
                self.log.warning("Handing the task back to a worker: %s", error)
                yield TriggerEvent({"failure": failure_payload(error), "state": state.to_dict()})
                return
            if isinstance(step, PokeAgain):
                moment, state = step.resume_at, step.state
                continue
            if isinstance(step, Done):
                yield TriggerEvent({"ready": step.xcom, "state": state.to_dict()})
            else:
                yield TriggerEvent({"timeout": step.message, "state": state.to_dict()})
            return
        yield TriggerEvent({"poke": state.to_dict()})

    async def _poke(self, spec: RequestSpec, settings: SensorSettings, check: ResponseCheck | None,
                    state: SensorState) -> SensorStep:
        """One round, as the sensor's loop does it: the gate, the request, the reading, the next step."""
        request = await asyncio.to_thread(sending_async.prepare, spec)  # reads the Connection: its secrets stay here
        safe_url, ticket = redact_url(request.url), spec.task.ticket
        rules = settings.rules(SensorPlace.TRIGGERER)
        engine_rules = rules.engine_rules(spec.waits)
        gate = await asyncio.to_thread(spec_gate, default_gate_store(), spec, base_url=request.base_url)
        step: Step = Send(state.budget)
        if gate is not None:
            step = await asyncio.to_thread(gate.admission_step, ticket, state.budget, engine_rules, now=_utcnow(),
                                           rand=random.random)
        what = f"Poke {spec.method} {safe_url} not sent"
        if isinstance(step, Fail):
            raise failure_of(step, method=spec.method, safe_url=safe_url)
        if isinstance(step, Wait):
            reading = Held(step)
        else:
            state = SensorState(state.started_at, step.budget, state.pokes + 1)
            started = time.monotonic()
            try:
                response, elapsed = await sending_async.send(request, deadline=_deadline(spec),
                                                             max_response_bytes=spec.max_response_bytes)
            except NetworkRequestError as error:
                await asyncio.to_thread(report_no_answer, error, conn_id=spec.conn_id, now=_utcnow(), gate=gate,
                                        elapsed=time.monotonic() - started, ticket=ticket, log=self.log)
                reading, what = reading_of_no_answer(error, settings=settings), f"Poke {spec.method} {safe_url}"
            else:
                behaviour = StandardBehaviour(method=spec.method, backoff=engine_rules.backoff, rand=random.random)
                judged, what = await asyncio.to_thread(
                    judge_answer, behaviour, response, elapsed=elapsed, conn_id=spec.conn_id, method=spec.method,
                    safe_url=safe_url, budget=step.budget, rules=engine_rules, now=_utcnow(), rand=random.random,
                    gate=gate, ticket=ticket, log=self.log,
                )
                # The check is the user's code: it may block, so not on the triggerer's event loop.
                reading = await asyncio.to_thread(reading_of_answer, judged, response, check=check, settings=settings,
                                                  method=spec.method, safe_url=safe_url)
                what = f"Poke {what}"
        now = _utcnow()
        sensor_step = next_poke(reading, state, rules, now=now)
        report_step(sensor_step, what=what, conn_id=spec.conn_id, safe_url=safe_url, task_label=spec.task.label,
                    now=now, log=self.log)
        return sensor_step


def _deadline(spec: RequestSpec) -> timedelta | None:
    return None if spec.request_deadline is None else timedelta(seconds=spec.request_deadline)
