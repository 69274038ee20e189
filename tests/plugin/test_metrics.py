"""Which metric a wait is counted under (network_requests.metrics): every wait source has its name.

The StatsD wire format and the listener are tested against a real StatsD socket in
tests/integration_airflow/test_airflow_metrics.py; here the names, with the stats module
replaced by a recorder (the one seam metrics.py has for it).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from network_requests import metrics
from network_requests.events import WaitEvent
from network_requests.rate_limit import WaitSource

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


class RecordedStats:
    def __init__(self) -> None:
        self.counters: list[tuple[str, dict | None]] = []
        self.timers: list[tuple[str, float, dict | None]] = []

    def incr(self, name, tags=None):
        self.counters.append((name, tags))

    def timing(self, name, delta, tags=None):
        self.timers.append((name, delta.total_seconds(), tags))


@pytest.fixture
def stats(monkeypatch) -> RecordedStats:
    recorded = RecordedStats()
    monkeypatch.setattr(metrics, "_stats", lambda: recorded)
    return recorded


def wait_of(source: str, seconds: float = 30.0) -> WaitEvent:
    return WaitEvent("network_request_api", "http://api/x", seconds, source, "defer", NOW, NOW, "dag.task")


@pytest.mark.parametrize("source", [s for s in WaitSource if s is not WaitSource.INITIAL_DELAY])
def test_every_rate_limit_wait_source_has_a_metric_name_of_its_own(source):
    assert source.value in metrics.WAIT_SOURCES, f"{source!r} would be counted under a name made from its value"


def test_a_wait_for_the_structured_ratelimit_fields_reset_counts_as_a_reset_header_wait(stats):
    metrics.record_wait(wait_of(WaitSource.RATELIMIT.value))

    names = [name for name, _ in stats.counters]
    assert "network_requests.rate_limit.waits.reset_header" in names
    assert ("network_requests.rate_limit.wait_seconds.reset_header", 30.0,
            {"conn_id": "network_request_api", "source": "reset_header", "mode": "defer"}) in stats.timers
    assert not any("ratelimit" in name for name in names), "not a name made up from the header's value"


def test_the_three_reset_headers_share_one_metric(stats):
    for source in (WaitSource.RATELIMIT, WaitSource.RATELIMIT_RESET, WaitSource.X_RATELIMIT_RESET):
        metrics.record_wait(wait_of(source.value))

    tagged = [tags["source"] for name, tags in stats.counters if tags and name.endswith("rate_limit.waits.reset_header")]
    assert tagged == ["reset_header"] * 3
