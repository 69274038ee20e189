"""The serialisable description of one task's request: what the triggerer needs to send it.

A deferred ``NetworkRequestOperator`` hands the trigger a :class:`RequestSpec` as plain JSON
(it is stored in the metadata database with the trigger). It holds what the task decided
(endpoint, method, data, its own headers, the Idempotency-Key, timeouts, caps, backoff) and
which task instance it is for, and **no secret**: the Connection's login, password and extra
headers are read again from the Connection in the triggerer, and a request whose own
headers, query or body would carry one (by Airflow's masker's names) is never described
here: :func:`secret_in` says so, and such a task sends from its worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from network_requests.configured_limits import parse_limits
from network_requests.endpoints import EXTRA_SENSITIVE_NAMES, airflow_sensitive_names, is_sensitive_name
from network_requests.engine import Place, WaitRules
from network_requests.idempotency import DEFAULT_HEADER, idempotency_key
from network_requests.rate_limit import Backoff

#: Header names that carry credentials without saying so in Airflow's names.
_SECRET_HEADERS = frozenset({"cookie"})
#: How deep ``secret_in`` looks into a nested body.
_MAX_DEPTH = 20


@dataclass(frozen=True)
class TaskRef:
    """Which task instance a request belongs to (the same on every try of it)."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    @classmethod
    def of(cls, ti: Any) -> TaskRef:
        map_index = getattr(ti, "map_index", -1)
        return cls(str(ti.dag_id), str(ti.run_id), str(ti.task_id), -1 if map_index is None else int(map_index))

    @property
    def ticket(self) -> str:
        """This task instance's place in the shared gate's queue (stable across reschedules)."""
        return f"{self.dag_id}|{self.run_id}|{self.task_id}|{self.map_index}"

    @property
    def label(self) -> str:
        return f"{self.dag_id}.{self.task_id}" + (f"[{self.map_index}]" if self.map_index >= 0 else "")

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.dag_id, self.run_id, self.task_id, self.map_index)


@dataclass(frozen=True)
class WaitSettings:
    """The task's settings that bound and shape its rate-limit waits, in seconds."""

    max_rate_limit_wait: float | None = None
    rate_limit_timeout: float | None = None
    retry_delay: float = 300.0
    retry_exponential_backoff: float = 0.0
    max_retry_delay: float | None = None
    rate_limit_jitter: float = 0.1

    def backoff(self) -> Backoff:
        """The task's retry settings, reused for rate limits (see ``rate_limit.Backoff``)."""
        return Backoff(
            retry_delay=timedelta(seconds=self.retry_delay),
            multiplier=float(self.retry_exponential_backoff or 0),
            max_delay=None if self.max_retry_delay is None else timedelta(seconds=self.max_retry_delay),
            jitter=self.rate_limit_jitter,
        )

    def rules(
        self, place: Place, *, in_process_threshold: timedelta = timedelta(0), min_leave_delay: timedelta = timedelta(0)
    ) -> WaitRules:
        """The engine's rules for a task waiting at ``place``."""
        return WaitRules(
            place=place,
            backoff=self.backoff(),
            max_single_wait=_delta(self.max_rate_limit_wait),
            total_timeout=_delta(self.rate_limit_timeout),
            in_process_threshold=in_process_threshold,
            min_leave_delay=min_leave_delay,
        )


def _delta(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


@dataclass(frozen=True)
class RequestSpec:
    """One request and the settings that bound its waits, as plain values (seconds, not timedeltas)."""

    conn_id: str
    endpoint: str
    method: str
    task: TaskRef
    data: Any = None
    #: The operator's own headers, the Idempotency-Key included; never the Connection's.
    headers: dict[str, str] = field(default_factory=dict)
    extra_options: dict[str, Any] = field(default_factory=dict)
    #: Seconds, or ``[connect, read]`` seconds.
    request_timeout: float | list[float] | None = None
    request_deadline: float | None = None
    max_response_bytes: int | None = None
    waits: WaitSettings = field(default_factory=lambda: WaitSettings())
    shared_gate: bool = True
    push_xcom: bool = True
    idempotency_header: str = DEFAULT_HEADER
    #: The task's ``rate_limit`` argument as plain JSON (``None``: the Connection's ``extra``
    #: declares them; the triggerer reads that again, see ``gate_access.spec_gate``).
    rate_limit: Any = None
    #: The task's ``gate_key`` (``None``: the Connection's own gate).
    gate_key: str | None = None

    @property
    def carries_idempotency_key(self) -> bool:
        """Whether the request is sent with an Idempotency-Key (the operator's, or the user's own)."""
        return carries_idempotency_key(self.headers, self.idempotency_header)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.request_timeout, tuple):
            data["request_timeout"] = list(self.request_timeout)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestSpec:
        values = dict(data)
        values["task"] = TaskRef(**values["task"])
        values["waits"] = WaitSettings(**values.get("waits") or {})
        return cls(**values)

    def json_problem(self) -> str | None:
        """Why this description cannot be stored as JSON, or ``None``."""
        try:
            json.dumps(self.to_dict())
        except (TypeError, ValueError) as error:
            return f"settings that are not JSON ({error})"
        return None

    @property
    def timeout(self) -> float | tuple[float, float] | None:
        return tuple(self.request_timeout) if isinstance(self.request_timeout, list) else self.request_timeout  # type: ignore[return-value]


def carries_idempotency_key(headers: Mapping[str, Any], header: str) -> bool:
    """Whether ``headers`` hold the Idempotency-Key header named ``header`` (any case)."""
    return any(str(name).lower() == header.lower() for name in headers)


def secret_in(spec: RequestSpec) -> str | None:
    """Which part of the description would carry a secret (by name), or ``None``.

    The operator's headers (the Idempotency-Key aside: it is derived from public ids), the
    endpoint's query parameters, the body's field names (a mapping or a JSON text), and
    the extra options (``proxies`` may hold a password). Headers and query parameters are
    judged as ``redact_url`` judges a query (Airflow's names and a few more); body fields by
    Airflow's names alone, which do not take ``author`` for ``auth``.
    """
    names = airflow_sensitive_names() | EXTRA_SENSITIVE_NAMES | _SECRET_HEADERS
    for header in spec.headers:
        if header.lower() != spec.idempotency_header.lower() and is_sensitive_name(header, names):
            return f"the header {header!r}"
    for parameter, _ in parse_qsl(urlsplit(spec.endpoint).query, keep_blank_values=True):
        if is_sensitive_name(parameter, names):
            return f"the query parameter {parameter!r}"
    body = spec.data
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError:
            body = None
    airflow_names = airflow_sensitive_names()
    found = _sensitive_key(body, airflow_names, 0) or _sensitive_key(spec.extra_options, airflow_names, 0)
    return f"the field {found!r}" if found else None


def _sensitive_key(value: Any, names: frozenset[str], depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        return "(nested too deep to check)"
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if is_sensitive_name(str(key), names) and inner not in (None, "", {}, []):
                return str(key)
            found = _sensitive_key(inner, names, depth + 1)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for inner in value:
            found = _sensitive_key(inner, names, depth + 1)
            if found:
                return found
    return None


def wait_settings_of(operator: Any) -> WaitSettings:
    """A ``NetworkRequestOperator``'s wait settings (its ``retry_*`` reused for the backoff)."""
    return WaitSettings(
        max_rate_limit_wait=_seconds(operator.max_rate_limit_wait),
        rate_limit_timeout=_seconds(operator.rate_limit_timeout),
        retry_delay=_seconds(operator.retry_delay) or 0.0,
        retry_exponential_backoff=float(operator.retry_exponential_backoff or 0),
        max_retry_delay=_seconds(operator.max_retry_delay),
        rate_limit_jitter=operator.rate_limit_jitter,
    )


def describe(operator: Any, task: TaskRef, *, endpoint: str, headers: dict[str, str]) -> RequestSpec:
    """A ``NetworkRequestOperator``'s request (its checked ``endpoint`` and ``headers``) for the triggerer."""
    timeout = operator.request_timeout
    return RequestSpec(
        conn_id=operator.http_conn_id, endpoint=endpoint, method=operator.method, task=task, data=operator.data,
        headers=headers, extra_options=dict(operator.extra_options),
        request_timeout=list(timeout) if isinstance(timeout, tuple) else timeout,
        request_deadline=_seconds(operator.request_deadline), max_response_bytes=operator.max_response_bytes,
        waits=wait_settings_of(operator), shared_gate=operator.shared_gate, push_xcom=bool(operator.do_xcom_push),
        idempotency_header=operator.idempotency_key_header,
        rate_limit=declaration_as_json(getattr(operator, "rate_limit", None)), gate_key=getattr(operator, "gate_key", None),
    )


def declaration_as_json(rate_limit: Any) -> Any:
    """A ``rate_limit`` argument as plain JSON (``[{"requests", "per", "burst"}]``), so limits given
    as objects or as a JSON text travel to the triggerer; ``None`` (the Connection's) stays ``None``.
    A declaration that cannot be read is kept as it is: the task checked it when it started,
    and the triggerer reports it with the same message if it is still wrong."""
    if rate_limit is None or (isinstance(rate_limit, str) and not rate_limit.strip()):
        return None
    try:
        limits = parse_limits(rate_limit)
    except ValueError:
        return rate_limit
    return [{"requests": limit.requests, "per": limit.per_seconds, "burst": limit.burst} for limit in limits]


def _seconds(value: timedelta | float | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else None if value is None else float(value)
