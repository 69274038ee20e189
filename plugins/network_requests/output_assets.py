"""What a task that saved a response tells the DAGs scheduled on its Assets.

A task with ``output_path`` and ``outlets=[Asset(...)]`` emits, when it succeeds, one asset
event per Asset (Airflow does that for any task with outlets); this fills the event's
``extra`` with the description of the saved file, the task's XCom::

    {"path": "...", "status_code": 200, "bytes": 1234, "content_type": "application/json"}

(``pages`` too where the file joins several pages.) A consumer reads it from
``triggering_asset_events`` (see ``dags/network_request_consumer.py``).

Airflow 3.3.2 emits no outlet event for a task that ends in the triggerer (a
``TaskSuccessEvent`` only pushes XComs), so a task with outlets sends its request from a
worker (:mod:`network_requests.where_to_send`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk import Asset

#: The keys of a saved response's description that go into the asset event's ``extra``.
OUTPUT_EXTRA_KEYS = ("path", "status_code", "bytes", "content_type", "pages")

__all__ = ["OUTPUT_EXTRA_KEYS", "output_event_extra", "record_output_events"]


def output_event_extra(result: Any) -> dict[str, Any] | None:
    """The ``extra`` of a saved response's asset event; ``None`` when ``result`` describes no saved file."""
    if not isinstance(result, Mapping) or "path" not in result:
        return None
    return {key: result[key] for key in OUTPUT_EXTRA_KEYS if key in result}


def record_output_events(outlet_events: Any, outlets: Iterable[Any], result: Any) -> dict[str, Any] | None:
    """Put the saved response's description into the event ``extra`` of each ``Asset`` in ``outlets``.

    ``outlet_events`` is the task's ``context["outlet_events"]``; keys a callback already set
    there are kept unless this sets them too. Asset aliases and references are left to the
    DAG author (an alias needs the Asset it stands for). Returns the ``extra`` set, if any.
    """
    extra = output_event_extra(result)
    if extra is None:
        return None
    for outlet in outlets:
        if isinstance(outlet, Asset):
            outlet_events[outlet].extra.update(extra)
    return extra
