"""``[core] hostname_callable`` for the native distributed stack (scripts/distributed_stack.py).

Both Celery workers of the stack run on one machine, so the default callable
(``airflow.utils.net.getfqdn``) would record the same ``ti.hostname`` for both and a test
could not tell which worker ran a task. The stack sets ``NETWORK_REQUESTS_HOSTNAME``
differently for each worker (``worker-a``, ``worker-b``) and points
``AIRFLOW__CORE__HOSTNAME_CALLABLE`` here; every other process keeps the machine's FQDN.

Stdlib only and import-cheap: every Airflow process of the stack may import it.
"""

from __future__ import annotations

import os
import socket

HOSTNAME_ENV = "NETWORK_REQUESTS_HOSTNAME"


def hostname() -> str:
    """``$NETWORK_REQUESTS_HOSTNAME`` if set, else the FQDN (what Airflow uses by default)."""
    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()
