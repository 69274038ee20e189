"""One poke of a ``NetworkRequestSensor``, the same in both drivers: what an answer means, and the log.

After the shared gate's answer and the server's, both the sensor (on a worker) and its
trigger (in the triggerer) turn what happened into a
:data:`~network_requests.sensor_engine.Reading` here, then ask
:func:`~network_requests.sensor_engine.next_poke` what to do, then report the step here.

What an answer means for a sensor (the operator's table, read for someone waiting):

- 2xx: ``response_check(response)`` decides (default: ready); it may return a
  ``PokeReturnValue`` whose ``xcom_value`` becomes the task's XCom;
- a status listed in ``not_ready_status_codes`` (e.g. 404 for a resource that appears
  later): not ready, poked again after ``poke_interval``;
- rate limited (429; 503 or 403 with rate-limit headers, as :func:`network_requests.rate_limit.classify`
  says): a wait for the server's time, no try spent;
- other 5xx, 408 and connection errors: not ready (the service may be starting), unless
  ``transient_errors_mean_not_ready=False``: then the try fails and Airflow's retries apply;
- other 4xx: the try fails at once (the same request would fail again).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import requests
from airflow.sdk import PokeReturnValue

from network_requests.attempts import announce_wait, failure_of
from network_requests.engine import Fail, Finish, Step, Wait
from network_requests.exceptions import NetworkRequestError, TransientRequestError
from network_requests.rate_limit import Outcome
from network_requests.responses import error_for
from network_requests.sensor_engine import (Done, NotReady, PokeAgain, RateLimited, Reading, Ready,
                                            SensorPlace, SensorRules, SensorStep)

#: ``response_check(response) -> bool | PokeReturnValue``.
ResponseCheck = Callable[[requests.Response], Any]


@dataclass(frozen=True)
class SensorSettings:
    """The sensor's own settings, as plain values (seconds): what its trigger needs besides the request."""

    poke_interval: float
    timeout: float
    #: ``"package.module.function"`` of the response check, or ``None`` for "any 2xx is ready".
    check: str | None = None
    not_ready_status_codes: tuple[int, ...] = ()
    transient_errors_mean_not_ready: bool = True
    #: ``silent_fail``: an exception raised by the check counts as "not ready" too.
    check_errors_mean_not_ready: bool = False
    #: A wait that leaves the worker is due no sooner than this.
    min_leave_delay: float = 0.0
    #: The checked endpoint, already safe to log (a trigger's event may quote it).
    label: str = field(default="")

    def rules(self, place: SensorPlace) -> SensorRules:
        return SensorRules(place=place, poke_interval=timedelta(seconds=self.poke_interval),
                           timeout=timedelta(seconds=self.timeout),
                           min_leave_delay=timedelta(seconds=self.min_leave_delay))

    def to_dict(self) -> dict[str, Any]:
        return {
            "poke_interval": self.poke_interval, "timeout": self.timeout, "check": self.check,
            "not_ready_status_codes": list(self.not_ready_status_codes),
            "transient_errors_mean_not_ready": self.transient_errors_mean_not_ready,
            "check_errors_mean_not_ready": self.check_errors_mean_not_ready,
            "min_leave_delay": self.min_leave_delay, "label": self.label,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensorSettings:
        values = dict(data)
        values["not_ready_status_codes"] = tuple(int(code) for code in values.get("not_ready_status_codes") or ())
        return cls(**values)


def import_check(path: str) -> ResponseCheck:
    """The response check named ``"package.module.function"`` (importable where the sensor pokes)."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"response_check {path!r} is not an import path like 'package.module.function'")
    check = getattr(importlib.import_module(module), name)
    if not callable(check):
        raise TypeError(f"response_check {path!r} is not callable")
    return check


def reading_of_answer(
    step: Step,
    response: requests.Response,
    *,
    check: ResponseCheck | None,
    settings: SensorSettings,
    method: str,
    safe_url: str,
) -> Reading:
    """What an answer (judged by :func:`network_requests.attempts.judge_answer`) means for the sensor.

    Raises the typed error of an answer that ends the try: a permanent one, a transient one
    that must not count as "not ready", a rate-limit wait beyond ``max_rate_limit_wait``.
    """
    if isinstance(step, Wait):
        return RateLimited(step)
    if isinstance(step, Fail):
        raise failure_of(step, method=method, safe_url=safe_url)
    if not isinstance(step, Finish):  # judge_answer only returns those three
        raise TypeError(f"unexpected step after an answer: {step!r}")
    status = response.status_code
    if status in settings.not_ready_status_codes:
        return NotReady(f"answered {status}, one of not_ready_status_codes")
    if step.outcome is Outcome.TRANSIENT and settings.transient_errors_mean_not_ready:
        return NotReady(f"answered {status} {response.reason}".rstrip())
    if step.outcome is not Outcome.SUCCESS:
        raise error_for(step.outcome, response, method, safe_url)
    if check is None:
        return Ready()
    try:
        verdict = check(response)
    except Exception as error:
        if not settings.check_errors_mean_not_ready:
            raise
        return NotReady(f"response_check raised {type(error).__name__} (silent_fail)")
    if isinstance(verdict, PokeReturnValue):
        return Ready(verdict.xcom_value) if verdict.is_done else NotReady("response_check returned not done")
    return Ready() if verdict else NotReady("response_check returned False")


def reading_of_no_answer(error: NetworkRequestError, *, settings: SensorSettings) -> Reading:
    """A request that got no answer (refused, timed out): not ready, or the error itself."""
    if isinstance(error, TransientRequestError) and settings.transient_errors_mean_not_ready:
        return NotReady(str(error))
    raise error


def report_step(step: SensorStep, *, what: str, conn_id: str, safe_url: str, task_label: str, now: datetime,
                log: logging.Logger) -> None:
    """Log the step after a poke; a wait the server or the gate set is announced as a rate-limit wait."""
    if isinstance(step, Done):
        log.info("%s; ready", what)
    elif isinstance(step, PokeAgain) and step.paced_by is not None:
        announce_wait(step.paced_by, what=f"{what}; {step.why}", conn_id=conn_id, safe_url=safe_url,
                      task_label=task_label, now=now, log=log)
    elif isinstance(step, PokeAgain):
        log.info("%s; %s: next poke at %s", what, step.why, step.resume_at.isoformat())
    else:
        log.info("%s; %s", what, step.message)


def describe_check(check: ResponseCheck | str | None) -> str | None:
    """Why a check cannot run in the triggerer, or ``None`` when it can (none, or an import path)."""
    if check is None or isinstance(check, str):
        return None
    return ("response_check is a callable, which runs on the worker (give its import path, "
            "'package.module.function', to run it in the triggerer)")


def status_codes(codes: Collection[int | str] | None) -> tuple[int, ...]:
    """``not_ready_status_codes`` as ints (a template or a DAG file may give strings)."""
    return tuple(sorted({int(code) for code in codes or ()}))
