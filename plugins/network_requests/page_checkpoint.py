"""The pages a task has read so far, kept on disk until it succeeds, so no page is fetched twice.

A task instance with a ``pagination_function`` keeps, in
``<page_checkpoint_folder>/<dag_id>.<run_id>.<task_id>[.<map_index>]-<digest>/``, one file
per page read: ``page-00001.json`` holds the page's value, the ``pagination_function``'s
answer for the next page, and which task instance and listing it belongs to. Each file is
written atomically (:func:`network_requests.output.write_atomically`: a reader sees no file
or the whole file, and it is fsynced), so a page is kept once its file exists.

Why files and not Airflow: a task coming back from a reschedule has lost its XComs (Airflow
clears them when the task runs again), a deferral's ``kwargs`` and a trigger's arguments
are stored in the metadata database (a page can be megabytes), and a retry after a killed
process starts from nothing. The folder is read again by the next run of the task
(a deferral's return, a reschedule, a retry), and removed when the task succeeds.

**Several worker hosts:** the folder must be shared by every worker (the compose stack's
``./data`` mount on one host; NFS, or an object store URI such as ``s3://bucket/pages``, across
hosts). A task that runs again on a host that cannot see its folder reads every page again:
correct, but not the promise of reading each page once; its log says so.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from network_requests.output import is_local, local_path, write_atomically
from network_requests.paths import data_dir
from network_requests.request_spec import TaskRef

FORMAT = 1
#: Under ``$NETWORK_REQUESTS_DATA_DIR`` unless ``page_checkpoint_folder`` says otherwise.
DEFAULT_SUBFOLDER = ".pages"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PAGE_FILE = re.compile(r"page-(\d+)\.json")


def default_folder() -> str:
    """``$NETWORK_REQUESTS_DATA_DIR/.pages`` (see :func:`network_requests.paths.data_dir`)."""
    return str(Path(data_dir()) / DEFAULT_SUBFOLDER)


@dataclass(frozen=True)
class KeptPage:
    """One page read: its value (what ``result_of`` made of it) and the answer for the next page."""

    number: int
    value: Any
    #: The checked ``pagination_function`` answer; ``None``: it was the last page.
    next_page: dict[str, Any] | None
    status_code: int
    content_type: str


class PageCheckpoint:
    """The kept pages of one task instance's listing, under ``folder`` (a local path or an object store URI)."""

    def __init__(self, folder: str, task: TaskRef, listing: str) -> None:
        self.task, self.listing = task, listing
        digest = hashlib.sha256(
            "\x1f".join((task.dag_id, task.run_id, task.task_id, str(task.map_index))).encode()).hexdigest()[:10]
        index = f".{task.map_index}" if task.map_index >= 0 else ""
        # One flat folder per task instance: removing it leaves nothing behind.
        name = f"{_safe(task.dag_id)}.{_safe(task.run_id)}.{_safe(task.task_id)}{index}-{digest}"
        self.location = f"{folder.rstrip('/')}/{name}"
        self._folder = _Folder(self.location)

    def load(self) -> list[KeptPage]:
        """The pages kept, in order, from the first: up to the first one missing, unreadable, or
        another task's or listing's (those and every later one are removed, so they are never mixed in)."""
        pages: list[KeptPage] = []
        numbers = self._folder.page_numbers()
        for number in range(1, (numbers[-1] if numbers else 0) + 1):
            page = self._read(number)
            if page is None:
                break
            pages.append(page)
        self._folder.remove_pages_after(len(pages))
        return pages

    def keep(self, page: KeptPage) -> None:
        """Write the page's file in one visible step (fsynced); it is kept once this returns."""
        record = {"page_checkpoint": FORMAT, "task": self._task_fields(), "listing": self.listing,
                  "page": page.number, "value": page.value, "next_page": page.next_page,
                  "status_code": page.status_code, "content_type": page.content_type}
        self._folder.write(page.number, json.dumps(record, sort_keys=True).encode())

    def remove(self) -> None:
        """Forget every kept page (the task has its result)."""
        self._folder.remove_all()

    def _read(self, number: int) -> KeptPage | None:
        raw = self._folder.read(number)
        try:
            record = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        if not isinstance(record, dict) or record.get("page_checkpoint") != FORMAT or record.get("page") != number:
            return None
        if record.get("task") != self._task_fields() or record.get("listing") != self.listing:
            return None
        return KeptPage(number, record.get("value"), record.get("next_page"), int(record.get("status_code") or 0),
                        str(record.get("content_type") or ""))

    def _task_fields(self) -> dict[str, Any]:
        task = self.task
        return {"dag_id": task.dag_id, "run_id": task.run_id, "task_id": task.task_id, "map_index": task.map_index}


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)[:60] or "_"


def _page_name(number: int) -> str:
    return f"page-{number:05d}.json"


class _Folder:
    """A task's page folder: a local directory, or an object store prefix through Airflow's
    ``ObjectStoragePath`` (a put is atomic there); both read the same way."""

    def __init__(self, location: str) -> None:
        self.location, self.local = location, is_local(location)
        if self.local:
            self.path: Any = local_path(location)
        else:
            from airflow.sdk import ObjectStoragePath

            self.path = ObjectStoragePath(location)

    def page_numbers(self) -> list[int]:
        try:
            names = [entry.name for entry in self.path.iterdir()]
        except (FileNotFoundError, NotADirectoryError):  # nothing kept yet (an object store says the latter)
            return []
        return sorted(int(match.group(1)) for name in names if (match := _PAGE_FILE.fullmatch(name)))

    def read(self, number: int) -> bytes | None:
        try:
            return (self.path / _page_name(number)).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, number: int, body: bytes) -> None:
        write_atomically(f"{self.location}/{_page_name(number)}", body)

    def remove_pages_after(self, number: int) -> None:
        for later in self.page_numbers():
            if later > number:
                (self.path / _page_name(later)).unlink(missing_ok=True)

    def remove_all(self) -> None:
        if self.local:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.exists():
            self.path.rmdir(recursive=True)
