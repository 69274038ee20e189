"""The batch's group commit to the gate's store (network_requests.batch_gate): concurrent
changes share store updates, and each caller still gets exactly its own result."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from network_requests.batch_gate import CoalescingGateStore
from network_requests.gate import GateState
from network_requests.gate_store import MemoryGateStore


class SlowStore(MemoryGateStore):
    """An in-memory store whose updates take a while (as the Variable store's do) and may
    call the change twice (as a compare-and-set store does after losing a race)."""

    def __init__(self, seconds: float = 0.02, call_twice: bool = False) -> None:
        super().__init__()
        self.seconds, self.call_twice, self.updates = seconds, call_twice, 0

    def update(self, key, change):
        time.sleep(self.seconds)
        self.updates += 1
        if self.call_twice:
            change(self.read(key))  # a lost compare-and-set round: its result is thrown away
        return super().update(key, change)


def take_a_number(state: GateState) -> tuple[int, GateState]:
    """A pure change with an observable result: hand out the next number."""
    return state.next_window_taken, replace(state, next_window_taken=state.next_window_taken + 1)


def _many(store: CoalescingGateStore, calls: int, change=take_a_number) -> list:
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(store.update, "conn", change) for _ in range(calls)]
    return [future.exception() or future.result() for future in futures]


@pytest.mark.parametrize("call_twice", [False, True], ids=["once", "compare_and_set_retry"])
def test_concurrent_changes_share_updates_and_each_caller_gets_its_own_result(call_twice):
    inner = SlowStore(call_twice=call_twice)
    store = CoalescingGateStore(inner, threading.Lock())

    numbers = _many(store, 40)

    assert sorted(numbers) == list(range(40)), "every change applied once, in some order, each seeing the one before"
    assert inner.read("conn").next_window_taken == 40
    assert store.changes == 40 and store.updates == inner.updates
    assert inner.updates < 40, f"{inner.updates} updates for 40 changes: none shared"
    print(f"\n[group commit] 40 changes from 8 threads in {inner.updates} store updates")


def test_a_change_that_raises_fails_its_caller_alone():
    store = CoalescingGateStore(SlowStore(), threading.Lock())
    calls = iter(range(1000))

    def every_third_fails(state):
        if next(calls) % 3 == 0:
            raise ValueError("this change cannot apply")
        return take_a_number(state)

    outcomes = _many(store, 30, every_third_fails)

    failed = [o for o in outcomes if isinstance(o, ValueError)]
    numbers = sorted(o for o in outcomes if isinstance(o, int))
    assert failed and numbers == list(range(len(numbers))), "the others applied as if the failed ones never came"
    assert store.inner.read("conn").next_window_taken == len(numbers)


def test_a_store_that_fails_fails_every_change_of_the_update_and_stores_nothing():
    class Down(MemoryGateStore):
        def update(self, key, change):
            raise ConnectionError("the store is down")

    store = CoalescingGateStore(Down(), threading.Lock())

    outcomes = _many(store, 10)

    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert store.inner.read("conn") == GateState()


def test_every_store_call_holds_the_sdk_lock():
    sdk_lock = threading.Lock()
    seen = []

    class Watching(MemoryGateStore):
        def update(self, key, change):
            seen.append(sdk_lock.locked())
            return super().update(key, change)

        def read(self, key):
            seen.append(sdk_lock.locked())
            return super().read(key)

    store = CoalescingGateStore(Watching(), sdk_lock)
    _many(store, 5)
    store.read("conn")

    assert seen and all(seen)


def _follow(store: CoalescingGateStore, seconds: float, change, out: list) -> threading.Thread:
    def run() -> None:
        with store.following(seconds):
            out.append(store.update("conn", change))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _queued(store: CoalescingGateStore, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(store._queue) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(store._queue) == count, "the follower is waiting in the queue"


def test_a_following_change_is_applied_by_the_next_update_after_that_update_s_own_change():
    """A batch's item waiting for the answer before it asks this way: its admission goes in
    the same store update as that answer, and sees it."""
    inner = SlowStore(seconds=0.0)
    store = CoalescingGateStore(inner, threading.Lock())
    order: list[str] = []

    def recorded(name: str):
        def change(state: GateState):
            order.append(name)
            return take_a_number(state)
        return change

    followed: list[int] = []
    follower = _follow(store, 5.0, recorded("follower"), followed)
    _queued(store, 1)
    answer = store.update("conn", recorded("answer"))
    follower.join(timeout=5)

    assert order == ["answer", "follower"], "queued first, applied after the update's own change"
    assert (answer, followed) == (0, [1]), "each caller got its own result"
    assert inner.updates == 1 and store.changes == 2


def test_a_follower_that_no_update_comes_for_makes_its_own_after_its_wait():
    inner = SlowStore(seconds=0.0)
    store = CoalescingGateStore(inner, threading.Lock())
    followed: list[int] = []

    started = time.monotonic()
    _follow(store, 0.3, take_a_number, followed).join(timeout=5)

    assert followed == [0] and inner.updates == 1
    assert time.monotonic() - started >= 0.3, "it waited for another update first"
    with store.following(0.0):
        assert store.update("conn", take_a_number) == 1, "a zero wait leads at once"
