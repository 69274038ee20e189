"""Small helpers shared by the reliability tests."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from tests.support.embedded_stack import log_events


def parse_time(value: str | None) -> datetime | None:
    """An ISO timestamp of the REST API (``...Z`` or ``+00:00``)."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def error_details(log_text: str) -> list[dict[str, Any]]:
    """``error_detail`` entries (exc_type, exc_value, frames) of a task log's error events."""
    details = []
    for event in log_events(log_text):
        for detail in event.get("error_detail") or []:
            details.append(detail)
    return details


def failure_summary(log_text: str) -> str:
    """What a user reads first when a try failed: the error events with their exception type and message."""
    lines = []
    for event in log_events(log_text):
        if event.get("level") in ("error", "critical", "warning"):
            lines.append(f"[{event.get('level')}] {event.get('event')}")
        for detail in event.get("error_detail") or []:
            lines.append(f"    {detail.get('exc_type')}: {detail.get('exc_value')}")
    return "\n".join(lines)


def assert_clear_failure(log_text: str, exc_type: str, *needles: str) -> str:
    """The try failed with ``exc_type`` whose message names everything in ``needles`` (not only a
    bare stack trace): returns that message."""
    messages = [d.get("exc_value") or "" for d in error_details(log_text) if d.get("exc_type") == exc_type]
    assert messages, f"no {exc_type} in the task log; it says:\n{failure_summary(log_text) or log_text[-3000:]}"
    message = messages[-1]
    for needle in needles:
        assert needle in message, f"{exc_type} message {message!r} does not name {needle!r}"
    return message


def peak_rss_kb(pid: int) -> int | None:
    """The highest RSS the process ever had (Linux's VmHWM), in KiB; None when it is gone.

    Read from /proc because psutil (7.2) has no peak RSS: ``memory_info``/``memory_full_info``
    give the current RSS/USS/PSS only, and sampling those can miss a short peak.
    """
    try:
        status = Path("/proc", str(pid), "status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)


@dataclass
class MemorySampler:
    """Samples a process's RSS (psutil) and peak RSS (VmHWM) until it exits or ``stop()``."""

    pid: int
    interval: float = 0.005
    first_rss_kb: int | None = None
    first_hwm_kb: int | None = None
    last_hwm_kb: int = 0
    max_rss_kb: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def read(self) -> tuple[int, int] | None:
        """(RSS, peak RSS) in KiB, or None once the process is gone (a zombie has no memory)."""
        try:
            rss = psutil.Process(self.pid).memory_info().rss // 1024
        except psutil.Error:
            return None
        hwm = peak_rss_kb(self.pid)
        return None if hwm is None else (rss, hwm)

    def start(self) -> MemorySampler:
        first = self.read()
        if first is None:
            raise ProcessLookupError(self.pid)
        self.first_rss_kb, self.first_hwm_kb = first
        self.last_hwm_kb = self.first_hwm_kb
        self.max_rss_kb = self.first_rss_kb
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.read()
            if sample is None:
                return
            rss, hwm = sample
            self.samples += 1
            self.max_rss_kb = max(self.max_rss_kb, rss)
            self.last_hwm_kb = max(self.last_hwm_kb, hwm)
            time.sleep(self.interval)

    def wait(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        self._stop.set()

    @property
    def growth_kb(self) -> int:
        """How far the peak RSS rose above the RSS when sampling started."""
        assert self.first_rss_kb is not None
        return self.last_hwm_kb - self.first_rss_kb


def pid_with_local_port(pids: list[int], port: int) -> int | None:
    """The process (of ``pids``) whose TCP socket has local port ``port``: the client of a connection."""
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == port:
                    return pid
        except psutil.Error:
            continue
    return None
