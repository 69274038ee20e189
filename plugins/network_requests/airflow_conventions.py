"""Airflow's own conventions this package follows, read in one place.

``deferrable`` defaults as provider operators do: from ``[operators] default_deferrable``.
Airflow 3.3.2 ships that option as ``false``, so on a stock install a task waits by
rescheduling unless it passes ``deferrable=True`` or the deployment sets
``AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE=true`` (every stack of this project does).
"""

from __future__ import annotations

from airflow.sdk.configuration import conf

__all__ = ["default_deferrable", "deferrable_or_default"]


def default_deferrable() -> bool:
    """``[operators] default_deferrable``; ``True`` where the option is absent (an older config)."""
    return conf.getboolean("operators", "default_deferrable", fallback=True)


def deferrable_or_default(deferrable: bool | None) -> bool:
    """An operator's ``deferrable`` argument: what the task says, else the deployment's default.

    Read when the operator is built (as providers do), so the worker that runs the task
    decides with its own configuration.
    """
    return default_deferrable() if deferrable is None else deferrable
