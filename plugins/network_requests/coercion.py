"""Operator arguments as the code needs them: durations as ``timedelta``, timeouts as ``requests`` takes them.

Arguments may come from a DAG file, a ``.partial()``/``.expand()``, a template or a trigger
form, so a duration may arrive as a ``timedelta``, a number or a string of seconds, and a
``(connect, read)`` pair as a JSON list.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def as_timedelta(value: Any, name: str) -> timedelta | None:
    """A timedelta, seconds as a number, or seconds as a (templated) string; ``None``/``""`` is ``None``."""
    if value is None or value == "":
        return None
    if isinstance(value, timedelta):
        return value
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a timedelta or a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return timedelta(seconds=seconds)


def request_timeout(value: Any) -> float | tuple[float, float] | None:
    """``requests``' timeout: seconds, or a ``(connect, read)`` tuple (a JSON list becomes one)."""
    if isinstance(value, list):
        return tuple(value)  # type: ignore[return-value]
    return value
