"""What the "Rate limits" page shows, computed from the stored Variables: pure, no I/O.

Input: the values of the ``network_requests.gate.<conn>`` and ``network_requests.waits.<conn>``
Variables and the current time. Output: plain data for the template (strings and numbers;
the template escapes every string) and the geometry of the timeline chart (inline SVG).

Any stored value renders: anyone who may edit Variables can write anything there, and a
page that answers 500 hides every other connection. A gate that cannot be read is shown as
the conservative block the gate itself puts in its place (``GateState.damaged``); a wait
entry with an impossible time is left out and counted; every URL goes through
:func:`~network_requests.endpoints.redact_url`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from network_requests import gate_store, wait_history
from network_requests.endpoints import redact_url
from network_requests.gate import HORIZON_SECONDS, GateState, is_open

log = logging.getLogger(__name__)

#: Chart geometry, in SVG user units.
CHART_WIDTH = 960
LABEL_WIDTH = 230
LANE_HEIGHT = 20
AXIS_HEIGHT = 26
MAX_LANES = 20
TICKS = 6
MIN_BAR_WIDTH = 2.0
#: Waits shown in the table under the chart, newest first.
TABLE_ROWS = 25
#: Queued tickets listed per connection.
TICKETS_SHOWN = 10

SOURCE_CLASSES = {
    "Retry-After": "retry-after",
    "RateLimit-Reset": "reset-header",
    "X-RateLimit-Reset": "reset-header",
    "backoff": "backoff",
    "shared gate": "shared-gate",
}
SOURCE_LABELS = {
    "retry-after": "Retry-After",
    "reset-header": "reset header",
    "backoff": "backoff",
    "shared-gate": "shared gate",
    "other": "other",
}


def utc(epoch: float | None) -> str:
    if not epoch:
        return "–"
    try:
        return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return f"not a date ({epoch!r})"


def clock(epoch: float) -> str:
    try:
        return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return "?"


def relative(epoch: float | None, now: float) -> str:
    if not epoch:
        return ""
    delta = epoch - now
    word = "in" if delta >= 0 else "ago"
    seconds = abs(delta)
    if seconds < 90:
        amount = f"{seconds:.0f} s"
    elif seconds < 5400:
        amount = f"{seconds / 60:.0f} min"
    else:
        amount = f"{seconds / 3600:.1f} h"
    return f"in {amount}" if word == "in" else f"{amount} ago"


def source_class(source: str) -> str:
    return SOURCE_CLASSES.get(source, "other")


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass
class Lane:
    label: str
    y: float


@dataclass
class Tick:
    x: float
    label: str


@dataclass
class Chart:
    width: int
    height: int
    label_width: int
    bars: list[Bar] = field(default_factory=list)
    lanes: list[Lane] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    now_x: float | None = None
    hidden_lanes: int = 0


@dataclass
class ConnectionView:
    conn: str
    status: str  # "open", "blocked", "queued", "damaged"
    status_text: str
    gate: dict[str, str]
    tickets: list[tuple[str, str]]
    more_tickets: int
    waits: list[dict[str, Any]]
    chart: Chart | None
    wait_count: int
    #: What is stored, as numbers (for ``/api/connections``).
    state: dict[str, Any] = field(default_factory=dict)
    recent_waits: list[dict[str, Any]] = field(default_factory=list)
    #: Why the stored gate could not be read (shown as its conservative block), if so.
    damaged: str | None = None
    #: Stored waits left out because their times are impossible (or the list unreadable).
    skipped_waits: int = 0


def connections_from_variables(values: dict[str, str | None]) -> dict[str, tuple[str | None, str | None]]:
    """``{variable key: value}`` -> ``{conn: (gate JSON, waits JSON)}`` for this plugin's Variables."""
    found: dict[str, list[str | None]] = {}
    for key, value in values.items():
        if key.startswith(gate_store.VARIABLE_PREFIX):
            found.setdefault(key[len(gate_store.VARIABLE_PREFIX) :], [None, None])[0] = value
        elif key.startswith(wait_history.VARIABLE_PREFIX):
            found.setdefault(key[len(wait_history.VARIABLE_PREFIX) :], [None, None])[1] = value
    return {conn: (pair[0], pair[1]) for conn, pair in sorted(found.items()) if conn}


def gate_summary(state: GateState, now: float) -> tuple[str, str, dict[str, str]]:
    """(status, status text, field -> text) for one gate."""
    if state.damaged is not None:
        status, text = "damaged", (
            f"the stored state could not be read; tasks wait until {utc(state.blocked_until)} "
            f"({relative(state.blocked_until, now)}), then one request goes first to learn the limits again"
        )
    elif state.blocked_until > now:
        status, text = "blocked", f"blocked until {utc(state.blocked_until)} ({relative(state.blocked_until, now)})"
    elif not is_open(state, now):
        status, text = "queued", "open, but the next send time is handed out in turn"
    else:
        status, text = "open", "open: a task may send now"
    pending = [at for at in state.tickets.values() if at > now]
    fields = {
        "Blocked until": f"{utc(state.blocked_until)} {relative(state.blocked_until, now)}".strip()
        if state.blocked_until
        else "–",
        "Remaining": "unknown" if state.remaining is None else str(state.remaining),
        "Limit": "unknown" if state.limit is None else str(state.limit),
        "Quota resets": f"{utc(state.reset_at)} {relative(state.reset_at, now)}".strip() if state.reset_at else "–",
        "Pacing interval": f"{state.interval:.3f} s per request" if state.interval else "none",
        "Queued tickets": str(len(pending)),
        "API": redact_url(state.origin) if state.origin else "–",
        "Updated": f"{utc(state.updated_at)} {relative(state.updated_at, now)}".strip() if state.updated_at else "–",
    }
    if state.damaged is not None:
        fields = {"Damaged": state.damaged, **fields}
    return status, text, fields


def readable_waits(raw: str | None, now: float) -> tuple[list[dict[str, Any]], int]:
    """The stored waits that can be drawn (times from 1970 to the horizon after ``now``),
    their URLs redacted, and how many were left out."""
    try:
        waits = wait_history.parse(raw)
    except Exception:  # e.g. a 400-digit number: float() overflows
        return [], 1
    latest = now + HORIZON_SECONDS
    kept = [
        {**wait, "url": redact_url(wait["url"])}
        for wait in waits
        if all(math.isfinite(wait[name]) for name in ("at", "until", "seconds"))
        and 0 <= wait["at"] <= latest
        and 0 <= wait["until"] <= latest
    ]
    return kept, len(waits) - len(kept)


def build_chart(waits: list[dict[str, Any]], now: float) -> Chart | None:
    """Each wait is a bar from when it started to when the task may send, one lane per task."""
    if not waits:
        return None
    start = min(wait["at"] for wait in waits)
    end = max(max(wait["until"] for wait in waits), start + 1.0)
    if end < now <= end + (end - start) / 4:
        end = now  # "now" fits without squeezing the waits: show it
    span = end - start
    plot_width = CHART_WIDTH - LABEL_WIDTH - 10

    # Lanes: the tasks that waited most recently first.
    order: list[str] = []
    for wait in sorted(waits, key=lambda w: w["at"], reverse=True):
        if wait["task"] not in order:
            order.append(wait["task"])
    shown = order[:MAX_LANES]
    chart = Chart(
        width=CHART_WIDTH,
        height=AXIS_HEIGHT + LANE_HEIGHT * len(shown) + 6,
        label_width=LABEL_WIDTH,
        hidden_lanes=len(order) - len(shown),
    )

    def x_of(moment: float) -> float:
        return round(LABEL_WIDTH + (moment - start) / span * plot_width, 2)

    lane_y = {task: AXIS_HEIGHT + index * LANE_HEIGHT for index, task in enumerate(shown)}
    chart.lanes = [Lane(label=task or "(unknown task)", y=lane_y[task] + LANE_HEIGHT * 0.7) for task in shown]
    for wait in waits:
        if wait["task"] not in lane_y:
            continue
        x1, x2 = x_of(wait["at"]), x_of(max(wait["until"], wait["at"]))
        css = source_class(wait["source"])
        chart.bars.append(
            Bar(
                x=x1,
                y=lane_y[wait["task"]] + 3,
                width=round(max(x2 - x1, MIN_BAR_WIDTH), 2),
                height=LANE_HEIGHT - 6,
                css=css,
                title=(
                    f"{wait['task']}: waited {wait['seconds']:.1f} s ({wait['source']}, {wait['mode']}) "
                    f"from {clock(wait['at'])} to {clock(wait['until'])} UTC; {wait['url']}"
                ),
            )
        )
    chart.ticks = [
        Tick(x=x_of(start + span * index / (TICKS - 1)), label=clock(start + span * index / (TICKS - 1)))
        for index in range(TICKS)
    ]
    chart.now_x = x_of(now) if start <= now <= end else None
    return chart


def connection_view(conn: str, gate_raw: str | None, waits_raw: str | None, now: float) -> ConnectionView:
    state = GateState.from_json(gate_raw, now=now)
    status, text, fields = gate_summary(state, now)
    pending = sorted((at, ticket) for ticket, at in state.tickets.items() if at > now)
    waits, skipped = readable_waits(waits_raw, now)
    table = [
        {
            "at": utc(wait["at"]),
            "ago": relative(wait["at"], now),
            "task": wait["task"],
            "source": SOURCE_LABELS.get(source_class(wait["source"]), wait["source"])
            if source_class(wait["source"]) != "other"
            else wait["source"],
            "css": source_class(wait["source"]),
            "seconds": f"{wait['seconds']:.1f}",
            "mode": wait["mode"],
            "url": wait["url"],
        }
        for wait in sorted(waits, key=lambda w: w["at"], reverse=True)[:TABLE_ROWS]
    ]
    return ConnectionView(
        conn=conn,
        status=status,
        status_text=text,
        gate=fields,
        tickets=[(ticket, f"{utc(at)} ({relative(at, now)})") for at, ticket in pending[:TICKETS_SHOWN]],
        more_tickets=max(len(pending) - TICKETS_SHOWN, 0),
        waits=table,
        chart=build_chart(waits, now),
        wait_count=len(waits),
        state={**asdict(state), "origin": redact_url(state.origin)},
        recent_waits=waits,
        damaged=state.damaged,
        skipped_waits=skipped,
    )


def unshowable_view(conn: str) -> ConnectionView:
    """What stands for a connection whose data made the view fail: its name and a note."""
    return ConnectionView(
        conn=conn,
        status="damaged",
        status_text="this connection's stored data could not be shown (see the API server log)",
        gate={},
        tickets=[],
        more_tickets=0,
        waits=[],
        chart=None,
        wait_count=0,
        damaged="could not be shown",
    )


def page_data(values: dict[str, str | None], now: float) -> list[ConnectionView]:
    views = []
    for conn, (gate_raw, waits_raw) in connections_from_variables(values).items():
        try:
            views.append(connection_view(conn, gate_raw, waits_raw, now))
        except Exception:  # one connection's data must not take the page (and the others) down
            log.exception("Rate limits page: could not show the stored data of connection %s", conn)
            views.append(unshowable_view(conn))
    return views


def as_json(view: ConnectionView) -> dict[str, Any]:
    """The machine-readable form served by ``/api/connections``."""
    return {
        "conn": view.conn,
        "status": view.status,
        "status_text": view.status_text,
        "damaged": view.damaged,
        "gate": view.state,
        "recent_waits": view.recent_waits,
        "skipped_waits": view.skipped_waits,
    }
