"""What each process of tests/distributed/test_gate_processes.py runs, through one shared gate.

Two workloads, both driven by ``GATE_WORKLOAD_*`` environment variables so that the same code
runs in a plain process (``python -m tests.distributed.gate_workload``, the Redis store) and
inside an Airflow task run by ``dag.test()`` (the Variable store, which only works in a task):

``requests``
    Send ``GATE_WORKLOAD_REQUESTS`` requests to the scripted API, each as the operator does:
    ask the gate (``gate.admit``), wait in the process until the send time it gives, send,
    read the answer's headers (``read_rate_limit_headers``) and tell the gate
    (``gate.observe``); a 429 is sent again through the gate. Waits end at the time given,
    by the clock when the answer came, and a "send now" that came back late is asked again:
    the gate's answer is about the moment it was asked. Bounded: a deadline, and a cap on the
    rounds per request.
``race``
    Two roles that interleave deterministically through files: the ``stale`` writer reads the
    gate (still open), then waits until the ``blocker`` has stored a 429's block of
    ``BLOCK_SECONDS``, then stores its admission computed on what it had read (a gate with
    quota to spare). It then reads the gate again and asks it for a third task.

Each process writes its figures as JSON to ``GATE_WORKLOAD_RESULT``; those of ``requests``
carry a ``trace``: what the gate told the process at each step (admitted for when, and the
state it left) and what each answer said, for the test to set against the server's timeline.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from network_requests.gate import GateState, admit, for_origin, observe
from network_requests.rate_limit_headers import RateLimitInfo, read_rate_limit_headers

from tests.distributed.gate_api import CLIENT_HEADER, LIMITED_PATH

#: The rate-limited answer of the race: "come back in two minutes".
BLOCK_SECONDS = 120.0
#: A task waiting in the process keeps any send time (no deferral in this workload).
IN_PROCESS_UP_TO = 3600.0
MAX_ROUNDS_PER_REQUEST = 200
#: A "send now" that reaches the process this long after it asked is not acted on.
LATE_ANSWER_SECONDS = 0.25
#: How long a process waits for the others (start signal, the other role of the race).
WAIT_FOR_OTHERS_SECONDS = 180.0


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(f"GATE_WORKLOAD_{name}", default)
    if value is None:
        raise KeyError(f"GATE_WORKLOAD_{name} is not set")
    return value


def wait_for_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def send(base_url: str, client: str) -> tuple[int, dict[str, str]]:
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request("GET", LIMITED_PATH, headers={CLIENT_HEADER: client})
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        connection.close()


def gate_summary(state: GateState) -> dict[str, Any]:
    """The fields of a gate that decide an admission, times as epoch seconds (for the trace)."""
    return {
        "blocked_until": round(state.blocked_until, 3),
        "remaining": state.remaining,
        "reset_at": None if state.reset_at is None else round(state.reset_at, 3),
        "next_window_taken": state.next_window_taken,
        "tickets": {ticket: round(at, 3) for ticket, at in state.tickets.items()},
        "in_flight": {ticket: round(at, 3) for ticket, at in state.in_flight.items()},
    }


def run_requests(store: Any) -> dict[str, Any]:
    name, gate_key, base_url = env("NAME"), env("GATE_KEY"), env("BASE_URL")
    count = int(env("REQUESTS"))
    signals = Path(env("SIGNALS"))
    # The first call of a store connects (and loads its script): done before the start, so the
    # first answers are as timely as the others.
    store.update(gate_key, lambda state: (None, state))
    (signals / f"ready-{name}").touch()
    if not wait_for_file(signals / "go", WAIT_FOR_OTHERS_SECONDS):
        raise TimeoutError("no start signal")
    deadline = time.time() + float(env("DEADLINE_SECONDS", "150"))
    origin = base_url
    figures = {"name": name, "tmpdir": os.environ.get("TMPDIR"), "sent": 0, "ok": 0, "refused": 0,
               "gate_waits": 0, "waited_s": 0.0, "late_answers": 0, "rounds_max": 0, "stalled": None,
               "trace": []}  # fmt: skip
    trace = figures["trace"]
    for index in range(count):
        ticket = f"{name}|{index}"
        for rounds in range(1, MAX_ROUNDS_PER_REQUEST + 1):
            now = time.time()
            if now > deadline:
                # Stop by ourselves, and say where the gate held us (the caller judges).
                figures["stalled"] = {"request": index, "gate": json.loads(store.read(gate_key).to_json())}
                figures["waited_s"] = round(figures["waited_s"], 3)
                return figures

            def ask(state: GateState, now: float = now, ticket: str = ticket):
                admission = admit(for_origin(state, origin), ticket, now=now, in_process_up_to=IN_PROCESS_UP_TO)
                return admission, admission.state

            admission = store.update(gate_key, ask)
            trace.append({"at": round(now, 3), "ticket": ticket, "admitted_for": round(admission.send_at, 3),
                          "reason": admission.reason, "gate": gate_summary(admission.state)})  # fmt: skip
            if admission.send_at <= now and time.time() - now > LATE_ANSWER_SECONDS:
                # "Send now" was about the moment it asked (that window, that quota): the store
                # answered too late to act on it. Ask again (the gate counts it out meanwhile).
                figures["late_answers"] += 1
                continue
            if admission.send_at > now:
                figures["gate_waits"] += 1
                # Until the time it was given, from the clock now: the store's answer can come
                # late (a first connection, a busy host), and a pause measured from when it asked
                # would bring it back that much after its time, into another window's quota.
                pause = max(min(admission.send_at, deadline) - time.time(), 0.0)
                figures["waited_s"] += pause
                time.sleep(pause)
                continue
            status, headers = send(base_url, name)
            figures["sent"] += 1
            answered = time.time()
            info = read_rate_limit_headers(status, headers, now=datetime.fromtimestamp(answered, timezone.utc))
            wait = info.wait_seconds() if status == 429 else None
            until = None if wait is None else answered + wait

            def tell(state: GateState, info: RateLimitInfo = info, now: float = answered, until=until, ticket=ticket):
                observed = observe(for_origin(state, origin), info, now=now, rate_limited_until=until, ticket=ticket)
                return observed, observed

            observed = store.update(gate_key, tell)
            said = {k: v for k, v in headers.items() if k.lower().startswith(("x-ratelimit", "retry-after", "date"))}
            trace.append({"at": round(answered, 3), "ticket": ticket, "status": status, "said": said,
                          "gate": gate_summary(observed)})  # fmt: skip
            figures["rounds_max"] = max(figures["rounds_max"], rounds)
            if status == 200:
                figures["ok"] += 1
                break
            figures["refused"] += 1
        else:
            raise RuntimeError(f"{name}: request {index} still not answered 200 after {MAX_ROUNDS_PER_REQUEST} rounds")
    figures["waited_s"] = round(figures["waited_s"], 3)
    return figures


def run_race(store: Any) -> dict[str, Any]:
    role, gate_key = env("ROLE"), env("GATE_KEY")
    signals = Path(env("SIGNALS"))
    origin = "http://race.invalid:80"
    if role == "blocker":
        if not wait_for_file(signals / "stale-has-read", WAIT_FOR_OTHERS_SECONDS):
            raise TimeoutError("the stale writer never read the gate")
        now = time.time()
        until = now + BLOCK_SECONDS

        def block(state: GateState):
            info = RateLimitInfo(retry_after=BLOCK_SECONDS, source="Retry-After")
            return None, observe(for_origin(state, origin), info, now=now, rate_limited_until=until)

        store.update(gate_key, block)
        (signals / "blocker-done").touch()
        return {"role": role, "tmpdir": os.environ.get("TMPDIR"), "blocked_until": until}

    # The gate as a 200 left it: quota to spare, so without the block a task may send at once.
    now = time.time()
    spare = RateLimitInfo(limit=10, remaining=10, reset_after=BLOCK_SECONDS * 2, source="X-RateLimit-Reset")
    store.update(gate_key, lambda state: (None, observe(for_origin(state, origin), spare, now=now)))
    seen: list[float] = []

    def stale_admission(state: GateState):
        seen.append(state.blocked_until)
        if len(seen) == 1:
            (signals / "stale-has-read").touch()
            # Hold the read state until the other writer has stored its block (bounded: on
            # one host the lock makes the other writer wait for us instead).
            wait_for_file(signals / "blocker-done", float(env("RACE_WAIT_SECONDS", "120")))
        admission = admit(for_origin(state, origin), "stale", now=now, in_process_up_to=IN_PROCESS_UP_TO)
        return admission, admission.state

    admitted = store.update(gate_key, stale_admission)
    wait_for_file(signals / "blocker-done", WAIT_FOR_OTHERS_SECONDS)
    later = time.time()
    final = for_origin(store.read(gate_key), origin)
    third = admit(final, "third", now=later)
    return {
        "role": role,
        "tmpdir": os.environ.get("TMPDIR"),
        "now": now,
        "changes_run": len(seen),
        "blocked_until_seen": seen,
        "stale_send_at": admitted.send_at,
        "final_blocked_until": final.blocked_until,
        "third_asked_at": later,
        "third_send_at": third.send_at,
    }


def main(store: Any) -> dict[str, Any]:
    """Run the workload ``GATE_WORKLOAD_KIND`` through ``store``; write and return its figures."""
    result_path = Path(env("RESULT"))
    try:
        figures = run_race(store) if env("KIND") == "race" else run_requests(store)
    except BaseException:
        result_path.write_text(json.dumps({"error": traceback.format_exc()}))
        raise
    result_path.write_text(json.dumps(figures))
    return figures


if __name__ == "__main__":
    from network_requests.gate_store import gate_store_from_config

    main(gate_store_from_config())
    sys.exit(0)
