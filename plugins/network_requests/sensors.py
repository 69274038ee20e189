"""``NetworkRequestSensor``: wait until an endpoint says "ready", honouring the server's rate limits.

Airflow's ``HttpSensor`` fails the try on a 429 or a 503 unless the code is allowlisted,
and its deferrable mode ignores that allowlist (apache/airflow#69903). This sensor reads a
rate-limited answer as what it is: a wait for the server's time, with no try spent, in
the worker (``mode="poke"``), rescheduled (``mode="reschedule"``) or in the triggerer
(``deferrable``, the default when ``[operators] default_deferrable`` is set).

It is the worker's driver of :func:`network_requests.sensor_engine.next_poke`; the
triggerer's is :mod:`network_requests.sensor_triggers`. Both ask the same shared gate, send
under the same caps and read rate-limit headers with the same reader as
``NetworkRequestOperator`` (:mod:`network_requests.attempts`). What each answer means is
:mod:`network_requests.sensor_pokes`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import requests
from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import (AirflowFailException, AirflowRescheduleException, AirflowSensorTimeout,
                                    AirflowSkipException, AirflowTaskTimeout)

from network_requests import coercion, sending
from network_requests.airflow_conventions import default_deferrable, deferrable_or_default
from network_requests.attempts import StandardBehaviour, failure_of, judge_answer, report_no_answer, sleep_until
from network_requests.endpoints import redact_url
from network_requests.engine import Fail, Mode, Send, Step, Wait, WaitRules
from network_requests.exceptions import NetworkRequestError, failure_from_payload
from network_requests.gate_access import SharedGate, check_gate_settings, task_gate
from network_requests.idempotency import DEFAULT_HEADER
from network_requests.request_seams import RequestSeams
from network_requests.request_spec import RequestSpec, TaskRef, describe, secret_in, wait_settings_of
from network_requests.sensor_engine import (Done, Held, PokeAgain, Reading, SensorPlace, SensorState, TimedOut,
                                            next_poke)
from network_requests.sensor_pokes import (ResponseCheck, SensorSettings, describe_check, import_check,
                                           reading_of_answer, reading_of_no_answer, report_step, status_codes)
from network_requests.wait_delays import MIN_RESCHEDULE_DELAY, min_defer_delay
from network_requests.where_to_send import package_methods, replaced_methods

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_CONN_ID = "network_request_api"
#: (connect, read) seconds, as the operator's: ``requests`` waits forever without a timeout.
DEFAULT_REQUEST_TIMEOUT = (10.0, 60.0)
DEFAULT_REQUEST_DEADLINE = timedelta(minutes=5)
#: A sensor reads answers, not downloads.
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: Airflow's own safety net for a deferral, beyond the sensor's timeout (which the trigger
#: enforces itself): a trigger that never fires (a triggerer down) still ends.
DEFERRAL_TIMEOUT_GRACE = timedelta(minutes=1)
#: The sensor's methods the triggerer mirrors (through StandardBehaviour and the async sender):
#: a subclass replacing one of them pokes from a worker (its trigger only waits).
_MIRRORED_IN_TRIGGERER = frozenset({
    "classify_response", "rate_limit_wait", "checked_endpoint", "request_kwargs", "send_request", "read_body",
})  # fmt: skip

__all__ = ["NetworkRequestSensor", "default_deferrable"]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class NetworkRequestSensor(RequestSeams, BaseSensorOperator):
    """
    Poke an endpoint of an HTTP Connection until it is ready, waiting out rate limits without spending a try.

    Each poke sends the request through the shared gate (so it never goes out while the API
    is known to be rate limited) and reads the answer:

    - 2xx: ``response_check(response)`` decides, by default "ready"; it may return a
      ``PokeReturnValue``, whose ``xcom_value`` becomes the task's XCom;
    - not ready (the check said no, a status in ``not_ready_status_codes``, or by default a
      5xx, 408 or connection error): poked again ``poke_interval`` later;
    - rate limited (429; 503 or 403 with rate-limit headers): poked again at the server's time
      (``Retry-After``, a reset header, else a backoff from ``retry_delay``), and never sooner
      than ``poke_interval`` after the answer; no try is spent;
    - any other 4xx: the try fails at once (no retry: the same request would fail again).

    ``timeout`` counts from the first poke of the try, across deferrals and reschedules; when
    the next allowed poke is beyond it the sensor times out at once (``soft_fail``: skipped).
    ``soft_fail``, ``never_fail`` and ``silent_fail`` behave as for Airflow's sensors.

    :param http_conn_id: the HTTP Connection with the base URL, auth and extra headers.
    :param endpoint: path on the Connection's host (templated); full URLs, ``//host``, ``@``,
        ``..`` and control characters are refused.
    :param method: HTTP method (templated).
    :param data: query parameters for GET, body for other methods (templated).
    :param headers: extra request headers (templated).
    :param response_check: ``callable(response) -> bool | PokeReturnValue``, or its import path
        ``"package.module.function"``; ``None``: any 2xx is ready. A callable runs on a worker
        only (a deferred sensor then waits in the triggerer and pokes from a worker); an import
        path importable in the triggerer lets the trigger poke and check itself.
    :param not_ready_status_codes: statuses that mean "not yet", e.g. ``[404]`` for a resource
        that appears later (otherwise a 404 fails the try at once).
    :param transient_errors_mean_not_ready: 5xx (without rate-limit headers), 408 and
        connection errors count as "not ready" (the default: a service being deployed answers
        so); ``False`` fails the try on them, and Airflow's ``retries`` apply.
    :param max_rate_limit_wait: a single rate-limit wait longer than this fails the task
        (default: no limit but ``timeout``).
    :param rate_limit_jitter: fraction of a backoff added at random (never subtracted).
    :param request_timeout: seconds, or ``(connect, read)`` seconds, for one poke's request.
    :param request_deadline: one poke's whole request (headers to last byte) may take this long.
    :param max_response_bytes: a larger body is not read; the try fails.
    :param extra_options: extra ``HttpHook`` options (``verify``, ...).
    :param shared_gate: share what the server said with every task of the same Connection.
    :param rate_limit: limits declared for the API, replacing the Connection's
        ``extra["rate_limit"]`` (templated; ``[]``: none), e.g. ``{"requests": 10, "per": "1s"}``
        or a list of them; see ``NetworkRequestOperator``.
    :param gate_key: the quota the pokes count against (templated; default: the Connection's own).
    :param deferrable: wait in the triggerer between pokes; default ``[operators] default_deferrable``
        (see :func:`default_deferrable`). When ``False``, ``mode`` decides: ``"poke"`` sleeps in
        the worker, ``"reschedule"`` frees it (never due sooner than ``MIN_RESCHEDULE_DELAY``).
    """

    template_fields: Sequence[str] = ("endpoint", "method", "data", "headers", "rate_limit", "gate_key")
    template_fields_renderers = {"headers": "json", "data": "py"}
    ui_color = "#e3f2e8"
    #: The trigger's RequestSpec names the header a key would use; a sensor sends none.
    idempotency_key_header = DEFAULT_HEADER

    def __init__(
        self,
        *,
        http_conn_id: str = DEFAULT_CONN_ID,
        endpoint: str = "/",
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        response_check: ResponseCheck | str | None = None,
        not_ready_status_codes: Collection[int] = (),
        transient_errors_mean_not_ready: bool = True,
        max_rate_limit_wait: timedelta | float | None = None,
        rate_limit_jitter: float = 0.1,
        request_timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
        request_deadline: timedelta | float | None = DEFAULT_REQUEST_DEADLINE,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        extra_options: dict[str, Any] | None = None,
        shared_gate: bool = True,
        rate_limit: Any = None,
        gate_key: str | None = None,
        deferrable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("exponential_backoff"):
            # The spacing of pokes is poke_interval and the server's time; a second schedule would hide which applies.
            raise ValueError("NetworkRequestSensor does not take exponential_backoff; use poke_interval")
        super().__init__(**kwargs)
        self.http_conn_id, self.endpoint, self.method, self.data = http_conn_id, endpoint, method, data
        self.headers, self.extra_options = headers or {}, extra_options or {}
        self.response_check = response_check
        self.not_ready_status_codes = status_codes(not_ready_status_codes)
        self.transient_errors_mean_not_ready = transient_errors_mean_not_ready
        self.max_rate_limit_wait = coercion.as_timedelta(max_rate_limit_wait, "max_rate_limit_wait")
        self.rate_limit_timeout = None  # the sensor's timeout bounds all its waiting
        self.rate_limit_jitter, self.shared_gate = rate_limit_jitter, shared_gate
        self.rate_limit, self.gate_key = rate_limit, gate_key
        self.request_timeout = coercion.request_timeout(request_timeout)
        self.request_deadline = coercion.as_timedelta(request_deadline, "request_deadline")
        self.max_response_bytes = max_response_bytes
        self.deferrable = deferrable_or_default(deferrable)

    # -- seams for tests and subclasses -------------------------------------------------

    #: The clock used for every decision.
    clock: Callable[[], datetime] = staticmethod(_utcnow)
    #: Source of jitter in [0, 1).
    random_fraction: Callable[[], float] = staticmethod(random.random)
    #: How a wait in poke mode sleeps.
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    # -- Airflow entry points ------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self.method = str(self.method).upper()  # templated, so normalised after rendering
        check_gate_settings(self)  # a bad rate_limit or gate_key fails the task before its first poke
        first_reschedule = None
        if self._place() is SensorPlace.WORKER_RESCHEDULING:
            first_reschedule = context["ti"].get_first_reschedule_date(context)
        state = SensorState(started_at=first_reschedule or self.clock())
        return self._as_sensors_do(lambda: self._drive(context, state))

    def resume_after_wait(self, context: Context, event: Any = None, **_: Any) -> Any:
        """Where a deferred wait comes back: the trigger's event says what it found (see sensor_triggers)."""
        self.method = str(self.method).upper()
        payload = event if isinstance(event, dict) else {}
        return self._as_sensors_do(lambda: self._resume(context, payload))

    def _resume(self, context: Context, payload: dict[str, Any]) -> Any:
        if "ready" in payload:
            self.log.info("Ready (found by the triggerer)")
            return payload["ready"]
        if "timeout" in payload:
            raise AirflowSensorTimeout(str(payload["timeout"]))
        if "failure" in payload:
            raise failure_from_payload(payload["failure"])
        state = payload.get("poke") or payload.get("state")
        return self._drive(context, SensorState.from_dict(state) if state else SensorState(self.clock()))

    def _as_sensors_do(self, run: Callable[[], Any]) -> Any:
        """Run, turning failures into a skip as ``BaseSensorOperator.execute`` does (``soft_fail``, ``never_fail``)."""
        try:
            return run()
        except (AirflowSensorTimeout, AirflowTaskTimeout, AirflowFailException) as error:
            if self.soft_fail or self.never_fail:
                flag = "soft_fail" if self.soft_fail else "never_fail"
                raise AirflowSkipException(f"Skipping due to {flag} is set to True: {error}") from error
            raise
        except (AirflowSkipException, AirflowRescheduleException):
            raise
        except Exception as error:
            if self.never_fail:
                raise AirflowSkipException(f"Skipping due to never_fail is set to True: {error}") from error
            raise

    # -- the driver ----------------------------------------------------------------------

    def _drive(self, context: Context, state: SensorState) -> Any:
        """Poke, carry out the step; until ready, timed out, failed, or gone to wait elsewhere."""
        task = TaskRef.of(context["ti"])
        endpoint, url = self._target()
        safe_url = redact_url(url)
        settings = self.sensor_settings(safe_url)
        rules = settings.rules(self._place())
        engine_rules = rules.engine_rules(wait_settings_of(self))
        check = self._check()
        # Looking at the gate again is cheap when the trigger pokes: the wait is in the triggerer.
        cheap_looks = self.deferrable and self.why_poke_from_worker(task) is None
        gate = task_gate(self, base_url=self.hook.base_url, cheap_looks=cheap_looks)
        # Bounded by the sensor's timeout: every pass ends, or waits until a later moment
        # that next_poke checked against the deadline.
        while True:
            step: Step = Send(state.budget)
            if gate is not None:
                step = gate.admission_step(task.ticket, state.budget, engine_rules, now=self.clock(),
                                           rand=self.random_fraction)
            what = f"Poke {self.method} {safe_url} not sent"
            if isinstance(step, Fail):
                raise failure_of(step, method=self.method, safe_url=safe_url)
            if isinstance(step, Wait):
                reading = Held(step)
            else:
                state = SensorState(state.started_at, step.budget, state.pokes + 1)
                reading, what = self._poke_once(endpoint, url, safe_url, step, check, settings, task, gate,
                                                engine_rules)
            now = self.clock()
            sensor_step = next_poke(reading, state, rules, now=now)
            report_step(sensor_step, what=what, conn_id=self.http_conn_id, safe_url=safe_url, task_label=task.label,
                        now=now, log=self.log)
            if isinstance(sensor_step, Done):
                return sensor_step.xcom
            if isinstance(sensor_step, TimedOut):
                raise AirflowSensorTimeout(sensor_step.message)
            state = sensor_step.state
            self._wait(sensor_step, task, settings)

    def _poke_once(self, endpoint: str, url: str, safe_url: str, step: Send, check: ResponseCheck | None,
                   settings: SensorSettings, task: TaskRef, gate: SharedGate | None,
                   engine_rules: WaitRules) -> tuple[Reading, str]:
        started = time.monotonic()
        try:
            response, elapsed = self.send_request(endpoint, url)
        except NetworkRequestError as error:
            report_no_answer(error, conn_id=self.http_conn_id, elapsed=time.monotonic() - started, now=self.clock(),
                             gate=gate, ticket=task.ticket, log=self.log)
            return reading_of_no_answer(error, settings=settings), f"Poke {self.method} {safe_url}"
        judged, what = judge_answer(self, response, elapsed=elapsed, conn_id=self.http_conn_id, method=self.method,
                                    safe_url=safe_url, budget=step.budget, rules=engine_rules, now=self.clock(),
                                    rand=self.random_fraction, gate=gate, ticket=task.ticket, log=self.log)
        reading = reading_of_answer(judged, response, check=check, settings=settings, method=self.method,
                                    safe_url=safe_url)
        return reading, f"Poke {what}"

    def _wait(self, step: PokeAgain, task: TaskRef, settings: SensorSettings) -> None:
        """Sleep here until the next poke; or leave (defer, reschedule) by raising."""
        if step.mode is Mode.IN_PROCESS:
            sleep_until(step.at, clock=self.clock, sleep=self.sleep)
            return
        if step.mode is Mode.DEFER:
            left = max(step.state.started_at + timedelta(seconds=self.timeout) - self.clock(), timedelta(0))
            backstop = left + (self.request_deadline or timedelta(0)) + DEFERRAL_TIMEOUT_GRACE
            self.defer(trigger=self._trigger(step, task, settings), method_name="resume_after_wait", timeout=backstop)
        raise AirflowRescheduleException(step.resume_at)

    def _trigger(self, step: PokeAgain, task: TaskRef, settings: SensorSettings) -> Any:
        from network_requests.sensor_triggers import NetworkRequestSensorTrigger

        reason = self.why_poke_from_worker(task)
        request = None
        if reason is None:
            request = self.request_spec(task).to_dict()
        else:
            self.log.info("Waiting in the triggerer; the next poke is sent from a worker, because %s", reason)
        return NetworkRequestSensorTrigger(step.resume_at, request, settings.to_dict(), step.state.to_dict())

    def _place(self) -> SensorPlace:
        if self.deferrable:
            return SensorPlace.WORKER_DEFERRABLE
        return SensorPlace.WORKER_RESCHEDULING if self.reschedule else SensorPlace.WORKER_POKING

    def sensor_settings(self, label: str = "") -> SensorSettings:
        """This sensor's settings, as its trigger gets them."""
        place = self._place()
        leave = (min_defer_delay() if place is SensorPlace.WORKER_DEFERRABLE
                 else MIN_RESCHEDULE_DELAY if place is SensorPlace.WORKER_RESCHEDULING else timedelta(0))
        return SensorSettings(
            poke_interval=float(self.poke_interval), timeout=float(self.timeout),
            check=self.response_check if isinstance(self.response_check, str) else None,
            not_ready_status_codes=self.not_ready_status_codes,
            transient_errors_mean_not_ready=self.transient_errors_mean_not_ready or self.silent_fail,
            check_errors_mean_not_ready=self.silent_fail, min_leave_delay=leave.total_seconds(), label=label,
        )  # fmt: skip

    def _check(self) -> ResponseCheck | None:
        return import_check(self.response_check) if isinstance(self.response_check, str) else self.response_check

    # -- poking from the triggerer ---------------------------------------------------------

    def request_spec(self, task: TaskRef) -> RequestSpec:
        """This sensor's request, described for the triggerer (JSON-safe when the settings are)."""
        return describe(self, task, endpoint=self.checked_endpoint(self.endpoint), headers=dict(self.headers))

    def why_poke_from_worker(self, task: TaskRef) -> str | None:
        """Why a deferred wait's next poke is sent from a worker; ``None`` when the trigger pokes itself."""
        reason = describe_check(self.response_check)
        if reason:
            return reason
        worker_only = set(package_methods(NetworkRequestSensor)) - _MIRRORED_IN_TRIGGERER
        replaced = replaced_methods(self, NetworkRequestSensor, worker_only=worker_only)
        if replaced:
            return f"the sensor replaces {', '.join(replaced)}"
        spec = self.request_spec(task)
        secret = secret_in(spec)
        if secret:
            return f"{secret} may hold a secret, which a trigger's stored arguments must not"
        return spec.json_problem()

    # -- extension points (each may be overridden; an override pokes from a worker) --------

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``HttpHook.run``."""
        kwargs = sending.request_kwargs_for_hook(data=self.data, headers=self.headers,
                                                 extra_options=self.extra_options, timeout=self.request_timeout)
        kwargs["hooks"] = {"response": [self.refuse_redirect_to_another_origin]}
        return kwargs

    def result_of(self, response: requests.Response, url: str) -> Any:
        """Not used by the sensor (its XCom comes from ``response_check``); part of the operator's behaviour."""
        return None

    def _standard(self) -> StandardBehaviour:
        return StandardBehaviour(method=self.method, backoff=wait_settings_of(self).backoff(), rand=self.random_fraction)
