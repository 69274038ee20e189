"""The durable record of a batch: which requests are done, kept next to their output files.

Each task instance of a :class:`~network_requests.batch.BatchRequestOperator` keeps, in
``<output_folder>/.batch/``:

- ``<name>.checkpoint.jsonl``: a journal. Its first line says which task instance and DAG
  run it belongs to; each further line is one item's outcome (``{"key", "status": "ok" |
  "failed", "try", ...}``, see :mod:`network_requests.batch_plan`). A line is appended and
  ``fsync``-ed once the item's body is safely in its output file (written atomically by
  :func:`network_requests.output.write_atomically`), so a line in the journal means the
  request is done. The last line of a later item wins.
- ``<name>.requests.json``: the list of requests, written by the worker for the triggerer
  (thousands of endpoints do not belong in a trigger's arguments, which the metadata
  database stores); its SHA-256 is in the trigger's arguments, so a changed file is noticed.

**The one window:** a process killed after the server answered and before the journal line
is on disk (writing the body, renaming it, appending the line: milliseconds) leaves that
item not done, and the next run sends it again: with the same ``Idempotency-Key`` for a
``POST``/``PATCH``, and its output file is replaced by the new body. Every item the journal
records as done is never sent again by that task instance, whichever process runs it next.

A journal whose first line names another DAG run (the same folder used again by a later
run) is set aside: the new run starts from nothing. A line cut short by a crash is dropped
(only the last line can be) before anything is appended. One process at a time writes a
journal: :meth:`Checkpoint.exclusive` takes a lock the kernel releases when the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from network_requests.batch_plan import BatchItem
from network_requests.output import is_local, local_path, write_atomically
from network_requests.request_spec import TaskRef

#: The folder under ``output_folder`` that holds the journals and request lists.
CHECKPOINT_DIR = ".batch"
FORMAT = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CheckpointBusy(RuntimeError):
    """Another process is running this batch (it holds the journal's lock)."""


class ManifestChanged(RuntimeError):
    """The request list on disk is missing or not the one the trigger was given."""


def local_folder(folder: str) -> Path:
    """``output_folder`` as a local path; the journal needs a file it can append to and fsync."""
    if not is_local(folder):
        raise ValueError(f"output_folder {folder!r} must be a local path (or file:// URI) shared by the workers "
                         "and the triggerer: the checkpoint is a local file")
    return local_path(folder)


class Checkpoint:
    """The journal (and request list) of one task instance's batch under ``folder``."""

    def __init__(self, folder: str | Path, task: TaskRef) -> None:
        self.folder = local_folder(str(folder)) if not isinstance(folder, Path) else folder
        self.task = task
        digest = hashlib.sha256(f"{task.dag_id}\x1f{task.task_id}\x1f{task.map_index}".encode()).hexdigest()[:8]
        index = f".{task.map_index}" if task.map_index >= 0 else ""
        stem = f"{_UNSAFE.sub('_', task.task_id)[:80]}{index}-{digest}"
        self.path = self.folder / CHECKPOINT_DIR / f"{stem}.checkpoint.jsonl"
        self.manifest_path = self.folder / CHECKPOINT_DIR / f"{stem}.requests.json"
        self._lock = threading.Lock()
        self._stream: Any = None

    @property
    def header(self) -> dict[str, Any]:
        task = self.task
        return {"batch_checkpoint": FORMAT, "dag_id": task.dag_id, "run_id": task.run_id, "task_id": task.task_id,
                "map_index": task.map_index}

    # -- reading ------------------------------------------------------------------------

    def load(self) -> dict[str, dict[str, Any]]:
        """The recorded outcome of each item key (empty when the journal is another run's or absent)."""
        header, records = read_journal(self.path)
        return records if header == self.header else {}

    # -- writing (one process at a time: see exclusive) ------------------------------------

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the journal's lock (released by the kernel if this process dies); ``CheckpointBusy`` if held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CheckpointBusy(f"another process is running the batch of {self.task.label}") from None
            try:
                yield
            finally:
                self.close()
                fcntl.flock(handle, fcntl.LOCK_UN)

    def start(self) -> dict[str, dict[str, Any]]:
        """Open the journal for appending (under :meth:`exclusive`); the records so far.

        Another run's journal is replaced by a fresh one; a last line cut short is dropped.
        """
        header, records = read_journal(self.path)
        if header != self.header:
            write_atomically(str(self.path), _line(self.header))
            records = {}
        else:
            _drop_torn_tail(self.path)
        self._stream = open(self.path, "ab", buffering=0)
        return records

    def record(self, record: Mapping[str, Any]) -> None:
        """Append one item's outcome and make it durable before returning (thread-safe)."""
        with self._lock:
            if self._stream is None:
                raise RuntimeError("the checkpoint is not started")
            self._stream.write(_line(record))
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    # -- the request list for the triggerer ----------------------------------------------

    def write_manifest(self, items: Sequence[BatchItem]) -> str:
        """Write the request list atomically; its SHA-256, for the trigger's arguments."""
        body = json.dumps({**self.header, "items": [item.to_dict() for item in items]}, sort_keys=True,
                          default=repr).encode()
        write_atomically(str(self.manifest_path), body)
        return hashlib.sha256(body).hexdigest()

    def read_manifest(self, sha256: str) -> tuple[BatchItem, ...]:
        """The request list the worker wrote; ``ManifestChanged`` when it is gone or another one."""
        try:
            body = self.manifest_path.read_bytes()
        except FileNotFoundError:
            raise ManifestChanged(f"{self.manifest_path} is missing") from None
        if hashlib.sha256(body).hexdigest() != sha256:
            raise ManifestChanged(f"{self.manifest_path} is not the request list this trigger was given")
        return tuple(BatchItem.from_dict(item) for item in json.loads(body)["items"])


def read_journal(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """A journal's header and the last record of each item key; lines that cannot be read
    (a last line cut short by a crash) are skipped."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, {}
    header: dict[str, Any] | None = None
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(raw.split(b"\n")):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue
        if number == 0:
            header = value
        elif isinstance(value.get("key"), str):
            records[value["key"]] = value
    return header, records


def _line(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, default=repr).encode() + b"\n"


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-append), so the next line starts clean."""
    with open(path, "r+b") as stream:
        size = stream.seek(0, os.SEEK_END)
        if size == 0:
            return
        stream.seek(size - 1)
        if stream.read(1) == b"\n":
            return
        stream.seek(0)
        keep = stream.read().rfind(b"\n") + 1
        stream.truncate(keep)
        stream.flush()
        os.fsync(stream.fileno())
