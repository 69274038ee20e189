"""``@network_request_task``: the operator's behaviour for TaskFlow users.

The decorated function builds the request; the operator sends it, with everything
``NetworkRequestOperator`` does (wait out rate limits without spending a try, the
shared gate, the "API endpoint" link, metrics). Like ``@task.bash``, where the function
returns the command, here it returns the request::

    from network_requests.taskflow import network_request_task

    @network_request_task(http_conn_id="network_request_api", retries=2)
    def fetch_user(user_id: int):
        return f"/api/users/{user_id}"          # an endpoint ...

    @network_request_task(method="POST")
    def create_order(order: dict):
        return {"endpoint": "/api/orders", "data": json.dumps(order),   # ... or a request
                "headers": {"Content-Type": "application/json"}}

    fetch_user.expand(user_id=[1, 2, 3])

The function runs in the task at every attempt (again after a deferral), so it should
only build the request: keep side effects out of it. What it returns is not rendered as a
Jinja template (it may carry values from a trigger form); its arguments are, as for any
``@task``. The XCom is the response, as for the operator.

Registering it as ``@task.network_request`` is not possible from a plugin: only providers
can add ``task.*`` decorators (the ``task-decorators`` entry of a provider's metadata).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar

from airflow.sdk.bases.decorator import DecoratedOperator, TaskDecorator, determine_kwargs, task_decorator_factory
from airflow.sdk.definitions._internal.types import SET_DURING_EXECUTION
from airflow.sdk.definitions.context import context_merge

from network_requests.operators import NetworkRequestOperator

#: The keys a returned request may have.
REQUEST_KEYS = frozenset({"endpoint", "method", "data", "headers"})


class _NetworkRequestDecoratedOperator(DecoratedOperator, NetworkRequestOperator):
    """Runs the decorated function for the request, then ``NetworkRequestOperator`` sends it."""

    template_fields: Sequence[str] = (*DecoratedOperator.template_fields, *NetworkRequestOperator.template_fields)
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        **NetworkRequestOperator.template_fields_renderers,
    }
    custom_operator_name: str = "@network_request_task"
    # Show the request the function built (not the placeholder) in "Rendered Templates".
    overwrite_rtif_after_execution: bool = True

    def __init__(
        self,
        *,
        python_callable: Callable,
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("endpoint", None)  # the function says which
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            endpoint=SET_DURING_EXECUTION,
            **kwargs,
        )

    def build_request(self, context: Any) -> None:
        """Call the function and take the request it returns."""
        context_merge(context, self.op_kwargs)
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        request = self.python_callable(*self.op_args, **kwargs)
        if isinstance(request, str):
            request = {"endpoint": request}
        if not isinstance(request, Mapping) or "endpoint" not in request:
            raise TypeError(
                "A @network_request_task function must return an endpoint (str) or a dict with "
                f"'endpoint' and optionally 'method', 'data', 'headers'; got {type(request).__name__}"
            )
        unknown = set(request) - REQUEST_KEYS
        if unknown:
            raise TypeError(f"Unknown request keys {sorted(unknown)}; allowed: {sorted(REQUEST_KEYS)}")
        self.endpoint = request["endpoint"]
        if "method" in request:
            self.method = request["method"]
        if "data" in request:
            self.data = request["data"]
        if "headers" in request:
            self.headers = dict(request["headers"] or {})

    def execute(self, context: Any) -> Any:
        self.build_request(context)
        return super().execute(context)

    def resume_after_wait(self, context: Any, event: Any = None, **kwargs: Any) -> Any:
        # deferrable=True comes back here in a new process: build the request again.
        self.build_request(context)
        return super().resume_after_wait(context, event, **kwargs)


def network_request_task(python_callable: Callable | None = None, **kwargs: Any) -> TaskDecorator:
    """
    Turn a function that returns a request into a ``NetworkRequestOperator`` task.

    Takes every ``NetworkRequestOperator`` argument except ``endpoint`` (``http_conn_id``,
    ``method``, ``headers``, ``max_rate_limit_wait``, ``output_path``, ``retries``...);
    ``method``, ``data`` and ``headers`` are defaults the returned request may override.
    ``multiple_outputs`` is off unless you ask for it: the function's return annotation
    describes the request, not the response.
    """
    kwargs.setdefault("multiple_outputs", False)
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_NetworkRequestDecoratedOperator,
        **kwargs,
    )
