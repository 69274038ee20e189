"""The ``Idempotency-Key`` of a task's request: the same on every send of it, so a server can deduplicate.

Airflow runs a task at least once: a worker or triggerer killed mid-send, a restarted
stack, or a retry after a 5xx sends the request again. For ``POST`` and ``PATCH`` (not
idempotent, RFC 9110 §9.2.2) each send carries an ``Idempotency-Key`` header
(draft-ietf-httpapi-idempotency-key-header) that a server supporting it uses to perform
the operation once and replay its first answer.

The key is derived from the task instance alone (``dag_id``, ``run_id``, ``task_id``,
``map_index``; not ``try_number``), so it is the same across rate-limit waits, deferrals,
a killed process, a restarted stack and Airflow's retries of that run, with nothing kept
in memory. A new DAG run, or another mapped index, is another logical request, another key.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping

#: The header the draft names.
DEFAULT_HEADER = "Idempotency-Key"
#: Methods that are not idempotent by definition (RFC 9110 §9.2.2): keyed by default.
DEFAULT_METHODS = ("POST", "PATCH")
#: A fixed namespace, so every deployment derives the same key for the same task instance.
_NAMESPACE = uuid.UUID("6f3c5a4e-2d1b-5c8e-9a7f-0b1e2d3c4a5b")


def idempotency_key(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """A UUID (version 5) of the task instance; the same inputs always give the same key."""
    index = -1 if map_index is None else int(map_index)
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join((dag_id, run_id, task_id, str(index)))))


def header_value(key: str) -> str:
    """The draft's form: an RFC 8941 String (``"..."``); a UUID needs no escaping."""
    return f'"{key}"'


def with_idempotency_key(
    headers: Mapping[str, str], *, method: str, key: str, header: str, methods: Collection[str]
) -> dict[str, str]:
    """``headers`` plus the key for a keyed ``method``; a header of that name the user gave wins."""
    result = dict(headers)
    if method.upper() not in {m.upper() for m in methods}:
        return result
    if any(name.lower() == header.lower() for name in result):
        return result
    result[header] = header_value(key)
    return result
