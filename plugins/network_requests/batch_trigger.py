"""The triggerer's side of a batch: :class:`BatchRequestTrigger` runs the whole list there.

A deferred :class:`~network_requests.batch.BatchRequestOperator` hands the triggerer its
settings (:class:`~network_requests.batch_runner.BatchSettings`: plain JSON, no secret, a
few hundred bytes whatever the batch's size) and the path and SHA-256 of the request list
the worker wrote next to the outputs. The list itself is not in the trigger's arguments:
those are stored in the metadata database, and thousands of endpoints belong in a file. A
list the triggerer cannot read, or another one, fails the try (the folder must be shared).

The trigger sends what the checkpoint says is left (:class:`~network_requests.batch_runner.BatchRun`),
so a triggerer killed or restarted mid-batch picks up where the journal ends. Then:

- when the batch did well enough (no more failures than ``allow_failures``), the trigger
  ends the task from the triggerer: the summary is pushed as the task's XCom and a
  ``TaskSuccessEvent`` follows; the whole batch costs one worker launch (a task with
  ``outlets`` goes back to a worker instead, so that Airflow emits its asset events);
- otherwise the task goes back to a worker (``execute_complete``), which reads the
  checkpoint and fails with the summary (or raises what stopped the batch): logs, retries
  and callbacks as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk.exceptions import AirflowException
from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from network_requests.batch_checkpoint import Checkpoint, ManifestChanged
from network_requests.batch_plan import summarize, too_many_failures
from network_requests.batch_runner import BatchRun, BatchSettings, BatchStopped
from network_requests.exceptions import failure_payload
from network_requests.triggers import in_the_triggerer

CLASSPATH = "network_requests.batch_trigger.BatchRequestTrigger"


class BatchRequestTrigger(BaseTrigger):
    """Send a batch's requests from the triggerer.

    :param settings: ``BatchSettings.to_dict()``.
    :param manifest_sha256: the SHA-256 of the request list the worker wrote.
    """

    def __init__(self, settings: dict[str, Any], manifest_sha256: str) -> None:
        super().__init__()
        self.settings = settings
        self.manifest_sha256 = manifest_sha256

    def __repr__(self) -> str:
        task = (self.settings.get("request") or {}).get("task") or {}
        return f"<BatchRequestTrigger {task.get('dag_id')}.{task.get('task_id')}[{task.get('map_index')}]>"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {"settings": self.settings, "manifest_sha256": self.manifest_sha256}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from network_requests import metrics

        metrics.install()  # the triggerer runs no task listener
        settings = BatchSettings.from_dict(self.settings)
        checkpoint = Checkpoint(settings.output_folder, settings.request.task)
        try:
            items = await asyncio.to_thread(checkpoint.read_manifest, self.manifest_sha256)
        except ManifestChanged as reason:
            # Most likely the folder is not the same for the worker and the triggerer. The try
            # fails (a retry writes the list again), saying so, instead of sending another list.
            error = AirflowException(f"The triggerer cannot read the request list the worker wrote ({reason}): "
                                     "output_folder must be a folder the workers and the triggerer share")
            yield TriggerEvent({"status": "stopped", "failure": failure_payload(error)})
            return
        runner = BatchRun(settings, items, log=self.log)
        try:
            report = await runner.run()
        except BatchStopped as stopped:
            yield TriggerEvent({"status": "stopped", "failure": failure_payload(stopped.error)})
            return
        except Exception as error:  # the worker raises it, with the usual retry meaning
            self.log.warning("Handing the batch back to a worker: %s", error)
            yield TriggerEvent({"status": "stopped", "failure": failure_payload(error)})
            return
        event = {"status": "done", "sent": report.sent}
        if not (in_the_triggerer() and settings.finish_in_triggerer):
            yield TriggerEvent(event)
            return
        summary = await asyncio.to_thread(self._summary, runner, settings)
        if too_many_failures(summary):
            yield TriggerEvent(event)
            return
        try:
            if settings.request.push_xcom:
                await asyncio.to_thread(self._push, settings, summary)
        except Exception as error:  # the worker pushes it then
            self.log.warning("Could not push the summary from the triggerer (%s); handing it to a worker", error)
            yield TriggerEvent(event)
            return
        self.log.info("Batch done: %d succeeded, %d failed (allowed %d)", summary["succeeded"], summary["failed"],
                      summary["allowed_failures"])
        yield TaskSuccessEvent()

    @staticmethod
    def _summary(runner: BatchRun, settings: BatchSettings) -> dict[str, Any]:
        return summarize(runner.items, runner.checkpoint.load(), try_number=settings.try_number,
                         allow_failures=settings.allow_failures, output_folder=settings.output_folder,
                         checkpoint=str(runner.checkpoint.path))

    @staticmethod
    def _push(settings: BatchSettings, summary: dict[str, Any]) -> None:
        """Push the XCom as a worker would, through the Task SDK (see triggers.py for why not
        ``TaskSuccessEvent(xcoms=...)``)."""
        from airflow.sdk.execution_time.xcom import XCom

        task = settings.request.task
        XCom.set(key=XCom.XCOM_RETURN_KEY, value=summary, dag_id=task.dag_id, task_id=task.task_id,
                 run_id=task.run_id, map_index=task.map_index)
