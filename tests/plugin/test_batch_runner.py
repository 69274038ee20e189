"""The batch's async driver (network_requests.batch_runner.BatchRun) run directly, without a
DAG, against servers on 127.0.0.1: how many requests are out at once, how little of the
batch the shared gate holds, and a cancelled run that leaves no request behind."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from network_requests.batch import BatchRequestOperator
from network_requests.batch_runner import BatchRun
from network_requests.gate_store import MemoryGateStore
from network_requests.request_spec import TaskRef

LOG = logging.getLogger("test_batch_runner")


class CountingServer(ThreadingHTTPServer):
    """Answers every request after ``delay`` seconds; counts requests and the most at once."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, delay: float) -> None:
        self.delay, self.active, self.most_at_once, self.arrivals = delay, 0, 0, []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                with server.lock:
                    server.active += 1
                    server.most_at_once = max(server.most_at_once, server.active)
                    server.arrivals.append((time.time(), self.path))
                time.sleep(server.delay)
                with server.lock:
                    server.active -= 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def counting_server(monkeypatch):
    server = CountingServer(delay=0.1)
    monkeypatch.setenv("AIRFLOW_CONN_BATCH_TEST", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.stop()


def _run(folder, count: int, store, **kwargs) -> BatchRun:
    operator = BatchRequestOperator(task_id="t", http_conn_id="batch_test", requests=[f"/items/{i}" for i in range(count)],
                                    output_folder=str(folder), write_bodies=False, **kwargs)
    return BatchRun(operator.settings(TaskRef("dag", "run", "t"), 1), operator.plan(), log=LOG, gate_store=store)


class WatchedStore(MemoryGateStore):
    """Remembers the largest number of this batch's tickets and requests out the gate ever held."""

    def __init__(self) -> None:
        super().__init__()
        self.most_held = 0

    def update(self, key, change):
        result = super().update(key, change)
        state = self.read(key)
        self.most_held = max(self.most_held, len(set(state.tickets) | set(state.in_flight)))
        return result


def test_at_most_max_in_flight_requests_are_out_and_the_gate_holds_no_more(counting_server, tmp_path):
    store = WatchedStore()
    run = _run(tmp_path, 60, store, max_in_flight=3)

    report = asyncio.run(run.run())

    assert report.succeeded == 60 and len(counting_server.arrivals) == 60
    assert counting_server.most_at_once <= 3
    assert counting_server.most_at_once >= 2, "the batch does send several at once"
    assert 1 <= store.most_held <= 3, "the gate never holds more of the batch than its requests under way"


def test_a_cancelled_run_leaves_no_request_behind_and_the_next_run_sends_only_the_rest(counting_server, tmp_path):
    async def cancel_after_some() -> None:
        task = asyncio.create_task(_run(tmp_path, 40, MemoryGateStore(), max_in_flight=2).run())
        while len(counting_server.arrivals) < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_some())
    cancelled_at, sent = time.time(), len(counting_server.arrivals)
    time.sleep(0.5)
    assert len(counting_server.arrivals) == sent, "no request of the cancelled run went out afterwards"
    assert 6 <= sent < 40, "the run was cancelled mid-batch"

    report = asyncio.run(_run(tmp_path, 40, MemoryGateStore(), max_in_flight=2).run())

    paths = [path for _, path in counting_server.arrivals]
    assert report.already_done + report.succeeded == 40, "the lock was free and the rest was sent"
    assert report.sent == 40 - report.already_done
    assert len(paths) - len(set(paths)) <= 2, "only requests cut off by the cancellation went twice"
    assert all(at > cancelled_at for at, _ in counting_server.arrivals[sent:])


class SlowStore(MemoryGateStore):
    """Updates that take as long as the Variable store's in a busy triggerer (three Task SDK
    messages each)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.updates = seconds, 0

    def update(self, key, change):
        time.sleep(self.seconds)
        self.updates += 1
        return super().update(key, change)


def test_while_each_request_waits_for_the_answer_before_it_the_next_is_admitted_with_that_answer(
    tmp_path, monkeypatch
):
    """Pacing with the quota counted spent, a request waits until the answer to the one before
    is stored (gate._waits_for_an_answer). Asked on its own, every 0.1 s, that costs the batch
    two store updates or more between two requests (measured with this store: 3.1 per request,
    15 s for 60); asked with the answer (CoalescingGateStore.following), about one (1.9, 10 s)."""
    from bench.rate_limited_server import LimiterConfig, make_server

    server = make_server(config=LimiterConfig(rate=10.0, burst=10))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("AIRFLOW_CONN_BATCH_TEST", f"http://127.0.0.1:{server.server_address[1]}")
    store = SlowStore(seconds=0.08)
    operator = BatchRequestOperator(task_id="t", http_conn_id="batch_test", output_folder=str(tmp_path),
                                    requests=[f"/bench/items/{i}" for i in range(60)], write_bodies=False)
    run = BatchRun(operator.settings(TaskRef("dag", "run", "t"), 1), operator.plan(), log=LOG, gate_store=store)
    try:
        report = asyncio.run(run.run())
        totals = server.stats()["summary"]
    finally:
        server.shutdown()
        server.server_close()

    assert report.succeeded == 60
    assert totals["early_requests"] == 0 and totals["responses_429"] == 0
    assert store.updates < 2.5 * 60, f"{store.updates} store updates for 60 requests"
    print(f"\n[batch] 60 requests paced at 10/s, 0.08 s per store update: {store.updates} updates, "
          f"{run._coalescing.changes} changes, makespan {totals['makespan_s']} s")


@pytest.mark.parametrize("reread_after, most_reads", [(60.0, 3), (0.0, 22)], ids=["once-a-minute", "every-request"])
def test_the_batch_reads_its_connection_once_not_per_request(counting_server, tmp_path, monkeypatch,
                                                              reread_after, most_reads):
    """Each read is a Task SDK message, and each message costs the triggerer a turn of its main
    loop; a rotated credential is still picked up after CONNECTION_REREAD_SECONDS."""
    from network_requests import batch_runner
    from network_requests.hooks import NetworkRequestHook

    reads: list[str] = []
    real = NetworkRequestHook.get_connection.__func__

    def counted(cls, conn_id):
        reads.append(conn_id)
        return real(cls, conn_id)

    monkeypatch.setattr(NetworkRequestHook, "get_connection", classmethod(counted))
    monkeypatch.setattr(batch_runner, "CONNECTION_REREAD_SECONDS", reread_after)

    report = asyncio.run(_run(tmp_path, 20, MemoryGateStore(), max_in_flight=2).run())

    assert report.succeeded == 20
    # Besides the requests: the base URL and the declared limits when the gate is opened.
    assert len(reads) <= most_reads and (len(reads) >= 20) == (reread_after == 0.0), reads
