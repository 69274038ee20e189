"""Where DAGs of this project keep the responses they fetch."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "NETWORK_REQUESTS_DATA_DIR"

#: A run id made safe as one directory name ("scheduled__2026-01-01T00:05:00+00:00" keeps
#: its meaning, loses the characters some file systems and object stores dislike).
RUN_FOLDER_TEMPLATE = "{{ run_id | replace(':', '') | replace('+', '_') | replace('/', '_') }}"


def data_dir() -> str:
    """``$NETWORK_REQUESTS_DATA_DIR``, else ``$AIRFLOW_HOME/data``, else ``~/airflow/data``.

    Read at parse time from the environment only: no network, no database.
    """
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return configured
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return str(Path(airflow_home) / "data")
