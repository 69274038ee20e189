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
