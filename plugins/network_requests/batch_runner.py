"""Sending a batch: the async driver that runs in the triggerer (or, ``deferrable=False``, on a worker).

Each item goes the way a ``NetworkRequestOperator``'s request goes in the triggerer (the
same decision, :func:`network_requests.engine.next_step`, the same shared gate, header
reader and async sender): ask the gate with the item's own ticket, send, judge the answer
(:func:`network_requests.attempts.judge_answer`, which tells the gate), wait what the
server or the gate says. Up to ``max_in_flight`` items are under way at once; the gate
holds at most that many tickets of the batch, however long the list. Their gate changes
that come together share store updates (:mod:`network_requests.batch_gate`).

What an item's final answer means for the batch:

- **success**: the body goes to its output file (atomically), then the checkpoint records
  the item (see :mod:`network_requests.batch_checkpoint` for the one window);
- **transient** (5xx, 408, no answer): tried again after a backoff, up to ``max_tries`` in
  all; then recorded as failed;
- **permanent** (other 4xx, a body too large, a redirect elsewhere): recorded as failed;
- a **rate limit** is waited out, as the operator does, without spending a try of the item.

A decision that concerns every item stops the whole batch (:class:`BatchStopped`): a wait
beyond ``max_rate_limit_wait``/``rate_limit_timeout``, a shared gate that cannot be read,
a disk that cannot take an output file. The items under way finish first (their answers are
recorded); what is left stays for the next try.

Routine pacing (a gate wait under :data:`QUIET_WAIT_SECONDS`) is not logged at INFO nor
sent to the wait history: a batch of thousands would flood both. Longer waits and every
wait a server asked for are announced as the operator announces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import requests

from network_requests import sending
from network_requests.attempts import StandardBehaviour, announce_wait, failure_of, judge_answer, report_no_answer
from network_requests.batch_checkpoint import Checkpoint, CheckpointBusy
from network_requests.batch_gate import CoalescingGateStore
from network_requests.batch_plan import (FAILED, OK, PERMANENT, TRANSIENT, BatchItem, item_retry_delay,
                                         items_left)
from network_requests.endpoints import redact_url
from network_requests.engine import Fail, Finish, Place, Send, Step, Wait, WaitBudget
from network_requests.exceptions import NetworkRequestError, TransientRequestError
from network_requests.gate import WAITING_FOR_AN_ANSWER
from network_requests.gate_access import SharedGate, default_gate_store, spec_gate
from network_requests.gate_store import GateStore
from network_requests.hooks import NetworkRequestHook
from network_requests.idempotency import DEFAULT_METHODS, with_idempotency_key
from network_requests.output import write_atomically
from network_requests.rate_limit import Backoff, Outcome, WaitSource
from network_requests.request_spec import RequestSpec
from network_requests.responses import error_for, is_json
from network_requests.safe_paths import UnsafeOutputPathError, checked_output_path
from network_requests.sending_async import CannotSendHere, OpenedConnection, open_connection, options_key, prepare, send

#: Gate waits shorter than this are the batch's own pacing: logged at DEBUG, no wait event.
QUIET_WAIT_SECONDS = 1.0
#: Gate and rate-limit rounds of one item before the batch gives up on waiting for it
#: (its rate_limit_timeout normally ends the waiting long before).
MAX_ROUNDS_PER_ITEM = 1000
#: How long a run waits for another process that holds the batch's checkpoint.
BUSY_WAIT = timedelta(minutes=10)
#: A progress line at most this often.
PROGRESS_EVERY_SECONDS = 30.0
#: An error message kept in the checkpoint is cut to this.
MAX_ERROR_CHARS = 500
#: An item that waits for the answer to a request before it (the gate's pacing with the quota
#: spent), while requests of this batch are out, asks again in the same store update as one of
#: their answers (``CoalescingGateStore.following``) rather than every
#: ``gate.ANSWER_RECHECK_SECONDS``: each ask would be an update of its own. It waits at most
#: this long for one, in case the request it waits for is another process's.
OWN_ANSWER_WAIT_SECONDS = 1.0
#: The batch reads its Connection again after this long, so that a rotated credential is
#: used within it; in between, every request is built from the one read (each read is a
#: Task SDK message, which costs the triggerer a turn of its main loop).
CONNECTION_REREAD_SECONDS = 60.0


T = TypeVar("T")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ItemRetries:
    """How an item's transient failures are tried again inside the batch (seconds)."""

    max_tries: int = 3
    retry_delay: float = 2.0
    multiplier: float = 2.0
    max_delay: float | None = 60.0
    jitter: float = 0.1

    def backoff(self) -> Backoff:
        return Backoff(timedelta(seconds=self.retry_delay), self.multiplier,
                       None if self.max_delay is None else timedelta(seconds=self.max_delay), self.jitter)


@dataclass(frozen=True)
class BatchSettings:
    """Everything a run needs besides the items, as plain values: the trigger's arguments.

    ``request`` is the template of every item's :class:`RequestSpec` (Connection, task
    instance, caps, wait settings, shared gate); each item fills in its endpoint, method,
    data and headers. It holds no secret (see ``request_spec.secret_in``).
    """

    request: RequestSpec
    output_folder: str
    try_number: int
    max_in_flight: int = 4
    retries: ItemRetries = field(default_factory=ItemRetries)
    allow_failures: int | float = 0
    write_bodies: bool = True
    max_value_bytes: int = 16 * 1024
    idempotency_key: bool = True
    idempotency_methods: tuple[str, ...] = DEFAULT_METHODS
    #: False for a task with ``outlets``: Airflow 3.3.2 emits asset events only for a task
    #: that ends on a worker, so the trigger hands the finished batch back to one.
    finish_in_triggerer: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request"] = self.request.to_dict()
        data["idempotency_methods"] = list(self.idempotency_methods)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchSettings:
        values = dict(data)
        values["request"] = RequestSpec.from_dict(values["request"])
        values["retries"] = ItemRetries(**values.get("retries") or {})
        values["idempotency_methods"] = tuple(values.get("idempotency_methods") or DEFAULT_METHODS)
        return cls(**values)

    def item_spec(self, item: BatchItem) -> RequestSpec:
        """The item's request, with its own Idempotency-Key for a keyed method."""
        headers = dict(item.headers)
        if self.idempotency_key:
            headers = with_idempotency_key(headers, method=item.method, key=item_idempotency_key(self.request, item),
                                           header=self.request.idempotency_header, methods=self.idempotency_methods)
        return replace(self.request, endpoint=item.endpoint, method=item.method, data=item.data, headers=headers)

    def ticket(self, item: BatchItem) -> str:
        """The item's place in the shared gate's queue (the same in every run of the batch)."""
        return f"{self.request.task.ticket}|{item.key}"


def item_idempotency_key(request: RequestSpec, item: BatchItem) -> str:
    """A UUID derived from the task instance's key and the item's key: the same on every send
    of that request, in any try or process; another item, another key."""
    return str(uuid.uuid5(uuid.UUID(request.task.idempotency_key), item.key))


class BatchStopped(Exception):
    """A failure that concerns the whole batch; ``error`` is what the task fails with."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Job:
    item: BatchItem
    #: Tries of this item already made in this run (transient failures).
    tries: int = 0
    #: While a request is out (or its answer is being recorded), a stopping batch waits for it.
    sending: bool = False


@dataclass
class BatchReport:
    """What one run did (the summary itself is computed from the checkpoint)."""

    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    already_done: int = 0


class BatchRun:
    """One run of a batch: send what the checkpoint says is left, record each outcome."""

    def __init__(
        self,
        settings: BatchSettings,
        items: Sequence[BatchItem],
        *,
        log: logging.Logger,
        gate_store: GateStore | None = None,
        clock: Callable[[], datetime] = _utcnow,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings, self.items, self.log = settings, tuple(items), log
        self.checkpoint = Checkpoint(settings.output_folder, settings.request.task)
        self.clock, self.rand = clock, rand
        self._gate_store = gate_store
        self._rules = settings.request.waits.rules(Place.TRIGGERER)
        self._behaviours: dict[tuple[str, bool], StandardBehaviour] = {}
        self._use_requests: str | None = None  # why the requests sender is used, once known
        self._gate: SharedGate | None = None
        self._sequence = itertools.count()
        self.report = BatchReport()
        self._next_progress = 0.0
        self._threads: ThreadPoolExecutor | None = None
        self._sdk_lock = threading.Lock()
        self._coalescing: CoalescingGateStore | None = None
        #: The Connection read for the requests (see CONNECTION_REREAD_SECONDS) and when.
        self._opened: tuple[float, OpenedConnection] | None = None
        #: Requests of this batch sent whose answer the gate has not been told yet.
        self._answers_out = 0
        #: The gate's last word to an item asking on its own: wait for the answer before it.
        self._gate_awaits_answers = False

    async def run(self) -> BatchReport:
        """Send every item left; ``BatchStopped`` when the batch cannot go on."""
        deadline = time.monotonic() + BUSY_WAIT.total_seconds()
        while True:
            threads = ThreadPoolExecutor(self.settings.max_in_flight + 1, thread_name_prefix="batch")
            try:
                with self.checkpoint.exclusive():
                    self._threads = threads
                    return await self._run_holding_the_checkpoint()
            except CheckpointBusy as busy:
                if time.monotonic() > deadline:
                    raise BatchStopped(TransientRequestError(f"{busy} for {BUSY_WAIT}; giving up this try",
                                                             method="-", url=self.settings.output_folder)) from None
                self.log.info("%s; waiting for it to finish", busy)
                await asyncio.sleep(2.0)
            finally:
                # Not waiting here: a call still running (a gate update) must not block the event loop.
                threads.shutdown(wait=False, cancel_futures=True)

    async def _run_holding_the_checkpoint(self) -> BatchReport:
        records = await asyncio.to_thread(self.checkpoint.start)
        left = items_left(self.items, records, self.settings.try_number)
        self.report.already_done = sum(1 for item in self.items if (records.get(item.key) or {}).get("status") == OK)
        self.log.info("Batch of %d requests: %d done before, %d to send (at most %d at once) to %s",
                      len(self.items), self.report.already_done, len(left), self.settings.max_in_flight,
                      self.settings.request.conn_id)
        if left and self.settings.request.shared_gate:
            self._gate = await self._open_shared_gate(self.settings.request)
        pending: list[tuple[float, int, _Job]] = []
        for item in left:
            if item.refused:
                await self._record(item, FAILED, kind=PERMANENT, error=f"not sent: {item.refused}")
            else:
                heapq.heappush(pending, (0.0, next(self._sequence), _Job(item)))
        await self._dispatch(pending)
        gate = self._coalescing
        self.log.info("Batch finished this run: %d sent, %d succeeded, %d failed, %d tries again after a "
                      "transient failure; the shared gate took %d changes in %d store updates", self.report.sent,
                      self.report.succeeded, self.report.failed, self.report.retried, gate.changes if gate else 0,
                      gate.updates if gate else 0)
        return self.report

    async def _dispatch(self, pending: list[tuple[float, int, _Job]]) -> None:
        """Keep up to ``max_in_flight`` items under way, in order of when each may go."""
        running: dict[asyncio.Task, _Job] = {}
        try:
            await self._keep_going(pending, running)
        finally:  # cancelled (the trigger was, say): no item goes on alone
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _keep_going(self, pending: list[tuple[float, int, _Job]], running: dict[asyncio.Task, _Job]) -> None:
        stopped: BaseException | None = None
        while True:
            now = time.time()
            while stopped is None and pending and len(running) < self.settings.max_in_flight and pending[0][0] <= now:
                job = heapq.heappop(pending)[2]
                running[asyncio.create_task(self._work(job))] = job
            if not running and (stopped is not None or not pending):
                break
            timeout = None
            if stopped is None and pending and len(running) < self.settings.max_in_flight:
                timeout = max(pending[0][0] - now, 0.0)
            if not running:
                await asyncio.sleep(timeout or 0.0)
                continue
            done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                job = running.pop(task)
                if task.cancelled():
                    continue
                error = task.exception()
                if error is not None:
                    stopped = stopped or error
                    continue
                again = task.result()
                if again is not None:
                    heapq.heappush(pending, (again, next(self._sequence), job))
            if stopped is not None:
                for task, job in running.items():
                    if not job.sending:  # waiting: nothing is lost by not finishing it now
                        task.cancel()
            self._progress(len(pending) + len(running))
        if stopped is not None:
            raise stopped if isinstance(stopped, BatchStopped) else BatchStopped(stopped)

    def _progress(self, left: int) -> None:
        if time.monotonic() < self._next_progress:
            return
        self._next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
        self.log.info("Batch progress: %d succeeded, %d failed this run; %d left", self.report.succeeded,
                      self.report.failed, left)

    # -- one item --------------------------------------------------------------------------

    async def _work(self, job: _Job) -> float | None:
        """Drive one item to a final answer; the epoch time to try it again, or ``None`` when recorded."""
        item, settings = job.item, self.settings
        spec, ticket = settings.item_spec(item), settings.ticket(item)
        budget = WaitBudget()
        for _ in range(MAX_ROUNDS_PER_ITEM):
            step: Step = Send(budget)
            gate = self._gate
            # While the gate makes each request wait for the answer to the one before, an item
            # asks with the next answer of this batch the gate is told (OWN_ANSWER_WAIT_SECONDS).
            follow = self._gate_awaits_answers and self._answers_out > 0 and self._coalescing is not None
            if gate is not None and follow:
                # The time of the ask is read when the store applies it, with that answer.
                step = await self._in_gate_thread(self._following, gate.admission_step, ticket, budget, self._rules,
                                                  now=self.clock, rand=self.rand)
            elif gate is not None:
                step = await self._in_gate_thread(gate.admission_step, ticket, budget, self._rules, now=self.clock(),
                                                  rand=self.rand)
            if isinstance(step, Wait) and step.reason == WAITING_FOR_AN_ANSWER:
                self._gate_awaits_answers = True
            elif isinstance(step, Send) and gate is not None and not follow:
                self._gate_awaits_answers = False
            if isinstance(step, Send):
                job.sending = True
                try:
                    step = await self._send_and_judge(job, spec, step.budget, gate, ticket)
                finally:
                    job.sending = False
                if step is None or isinstance(step, float):
                    return step
            if isinstance(step, Fail):
                self.log.error("%s not sent; stopping the batch: %s", item.label, step.problem)
                raise BatchStopped(failure_of(step, method=item.method, safe_url=redact_url(item.endpoint)))
            await self._announce(step, item)
            budget = step.budget
            if not (step.reason == WAITING_FOR_AN_ANSWER and self._answers_out > 0):
                await _sleep_until(step.resume_at)
        raise BatchStopped(TransientRequestError(f"{item.label} waited {MAX_ROUNDS_PER_ITEM} times without an "
                                                 "answer it could keep", method=item.method, url=item.label))

    async def _send_and_judge(self, job: _Job, spec: RequestSpec, budget: WaitBudget, gate: SharedGate | None,
                              ticket: str) -> Step | float | None:
        """Send once: the engine's step after a rate limit; else the item's fate (see ``_work``)."""
        item = job.item
        started = time.monotonic()
        self.report.sent += 1
        with self._an_answer_out():
            try:
                response, elapsed, url = await self._send(spec)
            except NetworkRequestError as error:
                await self._in_gate_thread(report_no_answer, error, conn_id=spec.conn_id, now=self.clock(),
                                           gate=gate, elapsed=time.monotonic() - started, ticket=ticket, log=self.log)
                no_answer: NetworkRequestError | None = error
            else:
                no_answer = None
                behaviour = self._behaviour(item.method, spec.carries_idempotency_key)
                safe_url = redact_url(url)
                step, what = await self._in_gate_thread(
                    judge_answer, behaviour, response, elapsed=elapsed, conn_id=spec.conn_id, method=item.method,
                    safe_url=safe_url, budget=budget, rules=self._rules, now=self.clock(), rand=self.rand,
                    gate=gate, ticket=ticket, log=self.log,
                )
        if no_answer is not None:
            return await self._failed_try(job, no_answer)
        if not isinstance(step, Finish):
            return step
        if step.outcome is Outcome.SUCCESS:
            await self._succeeded(item, response, url, what)
            return None
        self.log.log(logging.DEBUG if step.outcome is Outcome.TRANSIENT else logging.WARNING, "%s", what)
        return await self._failed_try(job, error_for(step.outcome, response, item.method, safe_url))

    async def _failed_try(self, job: _Job, error: NetworkRequestError) -> float | None:
        """A try that failed: again after a backoff when it is transient and tries are left, else recorded."""
        job.tries += 1
        if isinstance(error, TransientRequestError):
            delay = item_retry_delay(job.tries, max_tries=self.settings.retries.max_tries,
                                     backoff=self.settings.retries.backoff(), rand=self.rand)
            if delay is not None:
                self.report.retried += 1
                self.log.info("%s failed (try %d of %d), trying again in %.1fs: %s", job.item.label, job.tries,
                              self.settings.retries.max_tries, delay, error)
                return time.time() + delay
        self.log.warning("%s failed after %d tries: %s", job.item.label, job.tries, error)
        kind = TRANSIENT if isinstance(error, TransientRequestError) else PERMANENT
        await self._record(job.item, FAILED, kind=kind, status_code=error.status_code,
                           error=str(error)[:MAX_ERROR_CHARS])
        return None

    async def _succeeded(self, item: BatchItem, response: requests.Response, url: str, what: str) -> None:
        self.log.debug("%s; success, %d bytes", what, len(response.content))
        facts: dict[str, Any] = {"status_code": response.status_code, "bytes": len(response.content),
                                 "content_type": response.headers.get("Content-Type", "")}
        if item.output is not None:
            try:
                facts["path"] = await asyncio.to_thread(self._write_output, item, response.content)
            except UnsafeOutputPathError as error:
                await self._record(item, FAILED, kind=PERMANENT, status_code=response.status_code,
                                   error=f"not written: {error}")
                return
            except OSError as error:  # a full or read-only disk: every item would fail the same way
                raise BatchStopped(TransientRequestError(f"could not write {item.output}: {error}",
                                                         method=item.method, url=redact_url(url))) from None
        else:
            facts.update(_small_value(response, self.settings.max_value_bytes))
        await self._record(item, OK, **facts)

    def _write_output(self, item: BatchItem, body: bytes) -> str:
        folder = str(self.checkpoint.folder)
        path = checked_output_path(f"{folder}/{item.output}", folder)  # a symlink may lead elsewhere
        return write_atomically(path, body)

    async def _record(self, item: BatchItem, status: str, **facts: Any) -> None:
        record = {"key": item.key, "index": item.index, "status": status, "try": self.settings.try_number,
                  "at": self.clock().isoformat(), **facts}
        await asyncio.to_thread(self.checkpoint.record, record)
        if status == OK:
            self.report.succeeded += 1
        else:
            self.report.failed += 1

    # -- effects shared by the items ---------------------------------------------------------

    async def _in_sdk_thread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call that uses the Task SDK (a Connection, a Variable) in a thread,
        holding the batch's SDK lock: the SDK's comms take one call at a time anyway, and
        ``dag.test()``'s in-process comms are not thread-safe at all."""

        def locked() -> Any:
            with self._sdk_lock:
                return function(*args, **kwargs)

        return await self._in_gate_thread(locked)

    async def _in_gate_thread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call that uses the shared gate in a thread: the gate's store
        (:class:`CoalescingGateStore`) takes the SDK lock itself, for as short as it can."""
        assert self._threads is not None, "only while the batch runs"
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(function, *args, **kwargs))

    async def _open_shared_gate(self, spec: RequestSpec) -> SharedGate | None:
        """The shared gate of the batch's quota (its Connection's, or its ``gate_key``'s, with the
        declared limits), its store wrapped so the batch's changes share updates."""
        store = self._gate_store or await self._in_sdk_thread(default_gate_store)
        base_url = await self._in_sdk_thread(_base_url, spec.conn_id)
        self._coalescing = CoalescingGateStore(store, self._sdk_lock)
        return await self._in_sdk_thread(spec_gate, self._coalescing, spec, base_url=base_url)

    async def _send(self, spec: RequestSpec) -> tuple[requests.Response, float, str]:
        """Send with aiohttp as the trigger does; with ``requests`` (in a thread) when the
        Connection needs what only a ``requests`` session does (a proxy, say)."""
        deadline = None if spec.request_deadline is None else timedelta(seconds=spec.request_deadline)
        if self._use_requests is None:
            try:
                request = await self._in_sdk_thread(self._prepare, spec)  # its secrets stay here
            except CannotSendHere as reason:
                self._use_requests = str(reason)
                self.log.info("Sending the batch with requests, in threads: %s", reason)
            else:
                response, elapsed = await send(request, deadline=deadline,
                                               max_response_bytes=spec.max_response_bytes)
                return response, elapsed, request.url
        return await self._in_sdk_thread(_send_with_requests, spec, deadline)

    def _prepare(self, spec: RequestSpec) -> Any:
        """The request, built from the Connection as read at most CONNECTION_REREAD_SECONDS ago (blocking)."""
        if (self._opened is None or time.monotonic() - self._opened[0] > CONNECTION_REREAD_SECONDS
                or self._opened[1].options_key != options_key(spec)):
            self._opened = (time.monotonic(), open_connection(spec))
        return prepare(spec, self._opened[1])

    def _behaviour(self, method: str, keyed: bool) -> StandardBehaviour:
        """The operator's own judgement of an answer; ``keyed``: the request carries an Idempotency-Key."""
        if (method, keyed) not in self._behaviours:
            self._behaviours[(method, keyed)] = StandardBehaviour(method=method, backoff=self._rules.backoff,
                                                                  rand=self.rand, sent_idempotency_key=keyed)
        return self._behaviours[(method, keyed)]

    @contextlib.contextmanager
    def _an_answer_out(self) -> Iterator[None]:
        """A request of this batch is out until the gate is told its answer (or never will be:
        cancelled, a store error)."""
        self._answers_out += 1
        try:
            yield
        finally:
            self._answers_out -= 1

    def _following(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function``'s store updates wait to be applied with the next answer told (blocking)."""
        assert self._coalescing is not None
        with self._coalescing.following(OWN_ANSWER_WAIT_SECONDS):
            return function(*args, **kwargs)

    async def _announce(self, step: Wait, item: BatchItem) -> None:
        """Log the wait and emit its event, in a thread: the wait history writes a Variable."""
        if step.source is WaitSource.SHARED_GATE and step.seconds < QUIET_WAIT_SECONDS:
            self.log.debug("%s waits %.3fs at the shared gate", item.label, step.seconds)
            return
        await self._in_sdk_thread(announce_wait, step, what=f"{item.label} not sent",
                                conn_id=self.settings.request.conn_id, safe_url=redact_url(item.endpoint),
                                task_label=self.settings.request.task.label, now=self.clock(), log=self.log)


async def _sleep_until(moment: datetime) -> None:
    """Sleep until ``moment`` (never wake before it), in steps, on the wall clock."""
    for _ in range(100_000):
        left = (moment - _utcnow()).total_seconds()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 60.0))


def _base_url(conn_id: str) -> str:
    hook = NetworkRequestHook(http_conn_id=conn_id)
    hook.get_conn()
    return hook.base_url


def _send_with_requests(spec: RequestSpec, deadline: timedelta | None) -> tuple[requests.Response, float, str]:
    """The item sent as ``NetworkRequestOperator`` sends from a worker (blocking)."""
    hook = NetworkRequestHook(method=spec.method, http_conn_id=spec.conn_id)
    hook.get_conn()
    url = sending.url_on_origin(hook.url_from_endpoint(spec.endpoint), hook.base_url, endpoint=spec.endpoint,
                                method=spec.method)
    kwargs = sending.request_kwargs_for_hook(data=spec.data, headers=spec.headers, extra_options=spec.extra_options,
                                             timeout=spec.timeout)

    def refuse_redirect(response: requests.Response, *args: Any, **more: Any) -> None:
        sending.refuse_redirect_off_origin(response, method=spec.method, base_url=hook.base_url)

    kwargs["hooks"] = {"response": [refuse_redirect]}
    response, elapsed = sending.send(
        lambda: hook.run(spec.endpoint, **kwargs),
        lambda answer: sending.read_body(answer, method=spec.method, url=url, limit=spec.max_response_bytes),
        method=spec.method, url=url, deadline=deadline,
    )
    return response, elapsed, url


def _small_value(response: requests.Response, limit: int) -> dict[str, Any]:
    """The body as a JSON value for the checkpoint, when it is JSON and at most ``limit`` bytes."""
    if not is_json(response.headers.get("Content-Type", "")) or not response.content.strip():
        return {}
    if len(response.content) > limit:
        return {"value_left_out": f"larger than {limit} bytes"}
    try:
        return {"value": json.loads(response.content)}
    except ValueError:
        return {"value_left_out": "not valid JSON"}


__all__ = ["BatchReport", "BatchRun", "BatchSettings", "BatchStopped", "ItemRetries", "item_idempotency_key"]
