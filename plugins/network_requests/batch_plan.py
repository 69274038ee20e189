"""What a batch of requests is, what is left of it, and what it came to: pure, no I/O.

A :class:`~network_requests.batch.BatchRequestOperator` is given a list of requests (an
endpoint, or a mapping with ``endpoint`` and optionally ``method``, ``data``, ``headers``,
``output``). :func:`plan_batch` turns it into :class:`BatchItem` s, each with a **key**
derived from what it sends (method, endpoint, data, headers, output name): the same request
has the same key in every try and every process, whatever its position in the list, so
the checkpoint (:mod:`network_requests.batch_checkpoint`) can say which requests are done
even when an upstream task hands over the list in another order.

An item that cannot be sent safely (an endpoint that could leave the Connection's host, an
output name that could leave the output folder) is *refused*: it is reported as a failed
item and never sent, and the rest of the batch goes on. A list that cannot be a batch at all
(an unknown key, two items writing one file) raises ``ValueError`` before anything is sent.

:func:`items_left` says what a run still has to send, :func:`item_retry_delay` whether and
when a failed try of an item is tried again, and :func:`summarize` what the batch came to
(the task's XCom: counts and the failed items, never the bodies).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from network_requests.endpoints import UnsafeEndpointError, redact_url, validate_endpoint
from network_requests.rate_limit import Backoff

#: The keys an item of ``requests`` may have.
REQUEST_KEYS = frozenset({"endpoint", "method", "data", "headers", "output"})
#: Failed items named in the summary (the XCom stays small); the checkpoint has them all.
MAX_FAILED_IN_SUMMARY = 20
#: Characters an output name keeps when it is made from an endpoint.
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_DEFAULT_NAME = 100

OK, FAILED = "ok", "failed"
#: The ``kind`` of a failed item: whether a new try could do better.
TRANSIENT, PERMANENT = "transient", "permanent"


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch."""

    #: Position in the list as given (for messages only: the key identifies the item).
    index: int
    #: A digest of what the item sends; the same request has the same key everywhere.
    key: str
    endpoint: str
    method: str = "GET"
    data: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: File name under the output folder; ``None`` when bodies are not written.
    output: str | None = None
    #: Why the item is not sent at all, or ``None``.
    refused: str | None = None

    @property
    def label(self) -> str:
        """How logs and the summary name the item (the endpoint made safe to show)."""
        return f"{self.method} {redact_url(self.endpoint)}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchItem:
        return cls(**dict(data))


def item_key(*, method: str, endpoint: str, data: Any, headers: Mapping[str, str], output: str | None) -> str:
    """The item's identity: a digest of what it sends and where its body goes."""
    canonical = json.dumps([method, endpoint, data, dict(headers), output], sort_keys=True, default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def default_output_name(method: str, endpoint: str) -> str:
    """A file name made from the request: ``/api/items/42?full=1`` -> ``api_items_42_full_1``."""
    name = _UNSAFE_NAME_CHARS.sub("_", endpoint).strip("_.") or "root"
    if method != "GET":
        name = f"{method}_{name}"
    return name[:_MAX_DEFAULT_NAME]


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file under the output folder (before any symlink is looked at)."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name or ":" in name.split("/")[0]:
        return f"output {name!r} must be a relative file name"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return f"output {name!r} must not contain empty, '.' or '..' parts"
    return None


def plan_batch(
    requests: Sequence[Any] | None,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    write_bodies: bool = True,
) -> tuple[BatchItem, ...]:
    """The batch's items, in the order given. ``method`` and ``headers`` are every item's
    defaults (an item's own headers win). ``ValueError`` for a list that is not a batch."""
    if requests is None:
        return ()
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
        raise ValueError(f"requests must be a list of endpoints or request dicts, got {type(requests).__name__}")
    drafts = [_draft(index, raw, method, dict(headers or {})) for index, raw in enumerate(requests)]
    if write_bodies:
        drafts = _with_output_names(drafts)
    items = []
    for draft in drafts:
        output = draft["output"] if write_bodies else None
        key = item_key(method=draft["method"], endpoint=draft["endpoint"], data=draft["data"],
                       headers=draft["headers"], output=output)
        refused = draft["refused"] or (output_name_problem(output) if output is not None else None)
        items.append(BatchItem(index=draft["index"], key=key, endpoint=draft["endpoint"], method=draft["method"],
                               data=draft["data"], headers=draft["headers"], output=output, refused=refused))
    _refuse_repeats(items)
    return tuple(items)


def _draft(index: int, raw: Any, default_method: str, default_headers: dict[str, str]) -> dict[str, Any]:
    request = {"endpoint": raw} if isinstance(raw, str) else raw
    if not isinstance(request, Mapping) or "endpoint" not in request:
        raise ValueError(f"requests[{index}] must be an endpoint or a dict with 'endpoint', got {type(raw).__name__}")
    unknown = set(request) - REQUEST_KEYS
    if unknown:
        raise ValueError(f"requests[{index}] has unknown keys {sorted(unknown)}; allowed: {sorted(REQUEST_KEYS)}")
    endpoint = str(request["endpoint"])
    refused = None
    try:
        endpoint = validate_endpoint(endpoint)
    except UnsafeEndpointError as error:
        refused = str(error)
    output = request.get("output")
    return {
        "index": index,
        "endpoint": endpoint,
        "method": str(request.get("method") or default_method).upper(),
        "data": request.get("data"),
        "headers": {**default_headers, **dict(request.get("headers") or {})},
        "output": None if output is None else str(output),
        "refused": refused,
    }


def _with_output_names(drafts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every item gets a file name: its own, else one made from its request. Made names that
    collide get a suffix from their request; given names that collide are an error."""
    given = Counter(d["output"] for d in drafts if d["output"] is not None)
    clashes = sorted(name for name, count in given.items() if count > 1)
    if clashes:
        raise ValueError(f"several requests write the same output {clashes[:5]}: give each its own 'output'")
    made = [default_output_name(d["method"], d["endpoint"]) if d["output"] is None else None for d in drafts]
    counts = Counter(name for name in made if name is not None) + Counter(given)
    for draft, name in zip(drafts, made):
        if name is None:
            continue
        if counts[name] > 1:
            suffix = item_key(method=draft["method"], endpoint=draft["endpoint"], data=draft["data"],
                              headers=draft["headers"], output=None)[:8]
            name = f"{name}-{suffix}"
        draft["output"] = name
    return drafts


def _refuse_repeats(items: list[BatchItem]) -> None:
    first: dict[str, int] = {}
    for item in items:
        if item.key in first:
            raise ValueError(f"requests[{item.index}] repeats requests[{first[item.key]}] ({item.label}): "
                             "each request of a batch is sent once")
        first[item.key] = item.index


# -- what is left, and what a failed try means -----------------------------------------------


def items_left(items: Sequence[BatchItem], records: Mapping[str, Mapping[str, Any]], try_number: int) -> list[BatchItem]:
    """The items a run of try ``try_number`` still sends: not done, and not already given up
    on in this try (a new try, after a retry or a clear, sends the failed ones again)."""
    left = []
    for item in items:
        record = records.get(item.key)
        if record is not None and (record.get("status") == OK or int(record.get("try") or 0) == try_number):
            continue
        left.append(item)
    return left


def item_retry_delay(tries_done: int, *, max_tries: int, backoff: Backoff, rand: Callable[[], float]) -> float | None:
    """Seconds before the next try of an item whose ``tries_done``-th try failed transiently,
    or ``None`` when it has had its ``max_tries``."""
    if tries_done >= max_tries:
        return None
    return backoff.seconds(tries_done - 1, rand)


# -- what it came to -----------------------------------------------------------------------------


def allowed_failures(allow: int | float, total: int) -> int:
    """How many failed items a batch of ``total`` may end with: a count (``int``), or a
    fraction of the batch (``float`` from 0 to 1, rounded down)."""
    if isinstance(allow, bool) or not isinstance(allow, (int, float)) or not math.isfinite(allow) or allow < 0:
        raise ValueError(f"allow_failures must be a count (int >= 0) or a fraction (float 0..1), got {allow!r}")
    if isinstance(allow, float):
        if allow > 1:
            raise ValueError(f"allow_failures as a fraction must be at most 1.0, got {allow!r}")
        return math.floor(allow * total + 1e-9)
    return allow


def summarize(
    items: Sequence[BatchItem],
    records: Mapping[str, Mapping[str, Any]],
    *,
    try_number: int,
    allow_failures: int | float,
    output_folder: str | None,
    checkpoint: str | None,
) -> dict[str, Any]:
    """What the batch came to, for the XCom and the log. Items neither done nor failed in this
    try (a run cut short) count as ``not_done``."""
    succeeded = failed = 0
    failures = []
    earlier = 0
    for item in items:
        record = records.get(item.key) or {}
        if record.get("status") == OK:
            succeeded += 1
            earlier += int(record.get("try") or 0) < try_number
        elif record.get("status") == FAILED and int(record.get("try") or 0) == try_number:
            failed += 1
            if len(failures) < MAX_FAILED_IN_SUMMARY:
                failures.append({"index": item.index, "request": item.label, "output": item.output,
                                 "status_code": record.get("status_code"), "error": record.get("error")})
    total = len(items)
    return {
        "total": total,
        "succeeded": succeeded,
        "failed": failed,
        "not_done": total - succeeded - failed,
        "succeeded_in_earlier_tries": earlier,
        "allowed_failures": allowed_failures(allow_failures, total),
        "failed_items": failures,
        "output_folder": output_folder,
        "checkpoint": checkpoint,
    }


def too_many_failures(summary: Mapping[str, Any]) -> bool:
    """Whether the batch must fail: more failed items than allowed, or items not done."""
    return summary["failed"] > summary["allowed_failures"] or summary["not_done"] > 0


def failure_message(summary: Mapping[str, Any]) -> str:
    """The one line a user reads when the batch failed: the counts and the first failed items."""
    named = "; ".join(
        f"[{f['index']}] {f['request']}: {f['error']}" for f in summary["failed_items"][:5]
    )
    more = summary["failed"] - min(len(summary["failed_items"]), 5)
    tail = f" (and {more} more; every item is in {summary['checkpoint']})" if more > 0 else ""
    not_done = f", {summary['not_done']} not done" if summary["not_done"] else ""
    return (f"{summary['failed']} of {summary['total']} requests failed (allowed: {summary['allowed_failures']})"
            f"{not_done}: {named}{tail}")
