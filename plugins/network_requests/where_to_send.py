"""Whether a deferred request is sent from the triggerer or from a worker.

The triggerer runs only the operator's own behaviour (:class:`~network_requests.attempts.StandardBehaviour`
and the async sender), from a :class:`~network_requests.request_spec.RequestSpec` that holds
no secret. So a request is sent from a worker, after waiting in the triggerer, when it has a
``response_check``/``response_filter`` (callables), an ``output_path`` (a file the workers
should write), a ``pagination_function`` (DAG code; the pages are kept by the worker),
``outlets`` (Airflow 3.3.2 emits no asset event for a task that ends in the
triggerer: see :mod:`network_requests.output_assets`), a replaced method of the operator
(found by comparing the subclass and the instance with the operator class, method by
method: no list to keep in step), settings that are not JSON, or a header, query parameter
or body field Airflow's masker would hide.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from functools import cached_property
from types import FunctionType
from typing import Any

from network_requests.engine import Wait
from network_requests.request_spec import RequestSpec, TaskRef, secret_in

#: What a method can be on a class: a function, a static method, a (cached) property.
_METHOD_KINDS = (FunctionType, staticmethod, classmethod, property, cached_property)
#: Prefix under which an instance keeps the value a cached property computed by default.
DEFAULT_PREFIX = "_default_"


def package_methods(base: type) -> dict[str, Any]:
    """What ``base`` and the classes of this package it inherits from define (mixins such as
    :class:`~network_requests.request_seams.RequestSeams` included), as ``base`` resolves each name."""
    found: dict[str, Any] = {}
    for klass in reversed(base.__mro__):
        if klass.__module__.partition(".")[0] == __name__.partition(".")[0]:
            found.update(vars(klass))
    return found


def replaced_methods(operator: Any, base: type, *, worker_only: Collection[str]) -> list[str]:
    """The methods of ``base`` and its mixins (but ``worker_only``) that ``operator`` replaces,
    in its class or on itself.

    A cached property's own value (kept under ``DEFAULT_PREFIX + name``) is not a replacement.
    """
    replaced = []
    own = vars(operator)
    for name, original in package_methods(base).items():
        if name in worker_only or not isinstance(original, _METHOD_KINDS):
            continue
        if inspect.getattr_static(type(operator), name) is not original:
            replaced.append(name)
        elif name in own and own[name] is not own.get(DEFAULT_PREFIX + name):
            replaced.append(name)
    return replaced


def why_send_from_worker(operator: Any, base: type, spec: Callable[[], RequestSpec], *,
                         worker_only: Collection[str]) -> str | None:
    """Why ``operator``'s request must be sent from a worker; ``None`` when the triggerer may send it."""
    if not (operator.deferrable and operator.finish_in_triggerer):
        return "finish_in_triggerer is off"
    if operator.response_check is not None or operator.response_filter is not None or operator.output_path:
        return "a response_check, response_filter or output_path runs on the worker"
    if getattr(operator, "pagination_function", None) is not None:
        return "a pagination_function: the pages are read and kept by a worker (network_requests.page_reader)"
    if getattr(operator, "outlets", None):
        return "outlets: Airflow emits asset events only for a task that ends on a worker"
    replaced = replaced_methods(operator, base, worker_only=worker_only)
    if replaced:
        return f"the operator replaces {', '.join(replaced)}"
    described = spec()
    secret = secret_in(described)
    if secret:
        return f"{secret} may hold a secret, which a trigger's stored arguments must not"
    return described.json_problem()


def deferral_trigger(operator: Any, base: type, step: Wait, task: TaskRef, *, worker_only: Collection[str]) -> Any:
    """The trigger of a deferred wait: one that sends the request itself when it can, else one
    that only waits (and carries nothing but the wait budget); the log then says why."""
    from network_requests.triggers import RateLimitedRequestTrigger

    reason = why_send_from_worker(operator, base, lambda: operator.request_spec(task), worker_only=worker_only)
    if reason is None:
        return RateLimitedRequestTrigger(step.resume_at, operator.request_spec(task).to_dict(), step.budget.to_dict())
    if operator.finish_in_triggerer:
        operator.log.info("Waiting in the triggerer; the request is sent from a worker afterwards, because %s", reason)
    return RateLimitedRequestTrigger(step.resume_at, None, step.budget.to_dict())
