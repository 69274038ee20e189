"""A trigger for the warm-up run (see bench_strategies.py): it sends no request.

In its own module because the triggerer imports a trigger by its class path, and the
module of a file parsed as a Dag has a generated name the triggerer cannot import.
"""

from __future__ import annotations

import asyncio

from airflow.triggers.base import BaseTrigger, TriggerEvent

class WarmUpTrigger(BaseTrigger):
    """Reads a Connection and a Variable from the triggerer, then fires.

    The triggerer serves a trigger's Connection and Variable reads through an execution API
    it builds on first use, which takes seconds; a triggerer that has been running for a
    while paid that long ago, so the measured runs should not pay it either.
    """

    def __init__(self, conn_id: str) -> None:
        super().__init__()
        self.conn_id = conn_id

    def serialize(self) -> tuple[str, dict]:
        return ("warmup_trigger.WarmUpTrigger", {"conn_id": self.conn_id})

    async def run(self):
        from airflow.sdk import Connection, Variable

        def read() -> None:
            Connection.get(self.conn_id)
            Variable.get("bench_warmup", default=None)

        await asyncio.to_thread(read)
        yield TriggerEvent("warm")
