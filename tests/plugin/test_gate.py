"""The shared rate-limit gate (network_requests.gate): pure functions, a fixed clock, simulated servers.

Every function of the gate takes ``now`` and returns a new state, so each rule is an
equality on numbers here, and whole runs of tasks against a simulated API (a token bucket,
a fixed window) are a loop over events with a seeded random lateness: no clock, no sleep.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from network_requests.configured_limits import ConfiguredLimit
from network_requests.gate import (
    DAMAGED_STATE_BLOCK_SECONDS,
    HORIZON_SECONDS,
    IN_FLIGHT_TTL_SECONDS,
    MAX_COUNT,
    MAX_LIMIT_LOGS,
    MAX_LOG_ENTRIES,
    MAX_STATE_AGE_SECONDS,
    MAX_TICKETS,
    PROBE_TIMEOUT_SECONDS,
    RECHECK_SECONDS,
    STATE_TTL_SECONDS,
    TICKET_TTL_SECONDS,
    GateState,
    admit,
    for_origin,
    is_open,
    observe,
    release_probe,
)
from network_requests.rate_limit_headers import RateLimitInfo, read_rate_limit_headers

#: A fixed clock (epoch seconds), a multiple of 10 so fixed windows start on it.
NOW = 1_700_000_000.0
ORIGIN = "https://api.example.com:443"

#: A response that said nothing about rate limits.
SILENT = RateLimitInfo()
#: GitHub-style: a window of 3 requests, spent, resetting in 60 s.
WINDOW_OF_3_SPENT = RateLimitInfo(limit=3, remaining=0, reset_after=60, source="X-RateLimit-Reset")

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def admit_all(state: GateState, tickets: list[str], now: float = NOW) -> tuple[list[float], GateState]:
    """Admit each ticket in turn at ``now``: their send times and the final state."""
    times = []
    for ticket in tickets:
        admission = admit(state, ticket, now=now)
        times.append(admission.send_at)
        state = admission.state
    return times, state


# -- observe ---------------------------------------------------------------------------------


class TestObserve:
    def test_a_429s_rate_limited_until_blocks_the_gate(self):
        state = observe(GateState(), SILENT, now=NOW, rate_limited_until=NOW + 30)
        assert state.blocked_until == NOW + 30
        assert not is_open(state, NOW + 29.9)
        assert is_open(state, NOW + 30)

    @pytest.mark.parametrize("first, second", [(30, 90), (90, 30)])
    def test_blocked_until_never_moves_earlier_whatever_the_order_of_two_observations(self, first, second):
        state = observe(GateState(), SILENT, now=NOW, rate_limited_until=NOW + first)
        state = observe(state, SILENT, now=NOW + 1, rate_limited_until=NOW + second)
        assert state.blocked_until == NOW + 90

    def test_a_response_without_a_wait_does_not_open_a_blocked_gate(self):
        state = observe(GateState(), SILENT, now=NOW, rate_limited_until=NOW + 60)
        state = observe(state, RateLimitInfo(remaining=50, reset_after=1), now=NOW + 1)
        assert state.blocked_until == NOW + 60

    def test_an_absurd_rate_limited_until_is_clamped(self):
        state = observe(GateState(), SILENT, now=NOW, rate_limited_until=1e300)
        assert state.blocked_until == NOW + HORIZON_SECONDS
        assert GateState.from_json(state.to_json(), now=NOW) == state

    def test_remaining_zero_with_a_reset_closes_the_gate_before_any_429(self):
        # Stop before the 429: a 200 saying the quota is spent is enough.
        state = observe(GateState(), RateLimitInfo(remaining=0, reset_after=20), now=NOW)
        assert state.blocked_until == NOW + 20
        assert admit(state, "next", now=NOW + 1).send_at == NOW + 20

    def test_remaining_zero_with_an_epoch_x_ratelimit_reset_closes_the_gate(self):
        info = RateLimitInfo(limit=60, remaining=0, reset_after=300, source="X-RateLimit-Reset")
        assert observe(GateState(), info, now=NOW).blocked_until == NOW + 300

    def test_remaining_zero_with_a_reset_in_the_past_does_not_block(self):
        # The reader reports a reset already passed as 0 s from now.
        info = RateLimitInfo(remaining=0, reset_after=0, source="X-RateLimit-Reset")
        assert observe(GateState(), info, now=NOW).blocked_until == 0.0

    def test_remaining_above_zero_does_not_block(self):
        state = observe(GateState(), RateLimitInfo(remaining=1, reset_after=20), now=NOW)
        assert state.blocked_until == 0.0
        assert state.remaining == 1

    def test_the_servers_remaining_is_reduced_by_send_times_already_promised_for_that_window(self):
        promised = GateState(tickets={"a": NOW + 5, "b": NOW + 6, "after-the-window": NOW + 100})
        state = observe(promised, RateLimitInfo(remaining=5, reset_after=60), now=NOW)
        assert state.remaining == 3  # a and b will spend two of the five

    def test_promised_times_count_against_remaining_when_no_reset_is_known(self):
        promised = GateState(tickets={"a": NOW + 5, "b": NOW + 500})
        assert observe(promised, RateLimitInfo(remaining=5), now=NOW).remaining == 3

    def test_within_one_window_remaining_only_shrinks(self):
        state = GateState(remaining=2, reset_at=NOW + 60, updated_at=NOW - 1)
        # A late response counted before two of our requests: the larger number is stale.
        late = observe(state, RateLimitInfo(remaining=7, reset_after=60), now=NOW)
        assert late.remaining == 2
        fewer = observe(state, RateLimitInfo(remaining=1, reset_after=60), now=NOW)
        assert fewer.remaining == 1

    def test_a_new_window_takes_the_servers_remaining(self):
        state = GateState(remaining=2, reset_at=NOW + 60, updated_at=NOW - 1)
        fresh = observe(state, RateLimitInfo(remaining=7, reset_after=120), now=NOW)
        assert (fresh.remaining, fresh.reset_at) == (7, NOW + 120)

    def test_observe_remembers_limit_and_policy_and_keeps_them_when_a_response_omits_them(self):
        info = RateLimitInfo(limit=10, remaining=9, reset_after=60, window=20, interval=2.0)
        state = observe(GateState(), info, now=NOW)
        state = observe(state, SILENT, now=NOW + 1)
        assert (state.limit, state.remaining, state.interval, state.updated_at) == (10, 9, 2.0, NOW + 1)
    def test_a_quota_without_a_reset_time_is_not_forgotten_a_second_later(self):
        # "Untouched for STATE_TTL_SECONDS after its last time": GateState.horizon ignores
        # updated_at, so a state holding no time at all (a remaining count without a reset)
        # is already expired at the next call.
        state = observe(GateState(), RateLimitInfo(limit=10, remaining=2), now=NOW)
        assert state.remaining == 2
        _, state = admit_all(state, ["a", "b"], now=NOW + 1)
        assert state.remaining == 0

    def test_observe_does_not_touch_tickets(self):
        state = GateState(tickets={"a": NOW + 5})
        assert observe(state, RateLimitInfo(remaining=3), now=NOW).tickets == {"a": NOW + 5}
    def test_a_remaining_count_spent_only_by_promised_times_does_not_reblock_their_holders(self):
        # Window mode: three tasks hold the reset time R of a window of 3. The first to come
        # back sends; the server says 2 left, exactly the two still promised.
        r = NOW + 10
        state = GateState(remaining=0, reset_at=r, limit=3, blocked_until=r, updated_at=NOW)
        times, state = admit_all(state, ["a", "b", "c"])
        assert times == [r, r, r]
        state = admit(state, "a", now=r + 0.1).state
        state = observe(state, RateLimitInfo(limit=3, remaining=2, reset_after=9.9), now=r + 0.1)
        # b and c were promised this window's quota: they must still be let through.
        assert admit(state, "b", now=r + 0.2).send_at == r + 0.2


# -- admit -----------------------------------------------------------------------------------


class TestAdmit:
    def test_an_open_gate_lets_a_task_through_with_no_ticket(self):
        admission = admit(GateState(), "a", now=NOW)
        assert (admission.send_at, admission.reason) == (NOW, None)
        assert admission.wait_seconds(NOW) == 0.0
        assert admission.state.tickets == {}

    def test_an_open_gate_with_quota_left_counts_it_down(self):
        times, state = admit_all(GateState(remaining=2, reset_at=NOW + 60), ["a", "b"])
        assert times == [NOW, NOW]
        assert state.remaining == 0

    def test_a_blocked_gate_gives_a_send_time_equal_to_blocked_until(self):
        admission = admit(GateState(blocked_until=NOW + 30), "a", now=NOW)
        assert admission.send_at == NOW + 30
        assert admission.wait_seconds(NOW) == 30
        assert admission.reason
        assert admission.state.tickets == {"a": NOW + 30}

    def test_a_blocked_gate_with_quota_left_gives_that_many_tasks_blocked_until(self):
        times, state = admit_all(GateState(blocked_until=NOW + 30, remaining=2, reset_at=NOW + 30), ["a", "b"])
        assert times == [NOW + 30, NOW + 30]
        assert state.remaining == 0

    def test_with_pacing_successive_tasks_are_spaced_by_the_interval_once_the_quota_is_spent(self):
        info = RateLimitInfo(remaining=0, reset_after=10, limit=5, window=10, interval=2.0)
        state = observe(GateState(), info, now=NOW)
        times, state = admit_all(state, ["a", "b", "c", "d"])
        assert times == [NOW + 10, NOW + 12, NOW + 14, NOW + 16]
        assert state.next_slot == NOW + 18
        assert set(state.tickets) == {"a", "b", "c", "d"}

    def test_pacing_continues_from_now_when_the_last_slot_is_long_past(self):
        state = GateState(remaining=0, interval=2.0, next_slot=NOW - 100, updated_at=NOW - 100)
        times, _ = admit_all(state, ["a", "b"], now=NOW)
        assert times == [NOW, NOW + 2]
    def test_with_pacing_the_first_paced_time_is_one_interval_after_the_last_quota_time(self):
        # The server said 1 request is left, at 1 request per second: the second task must
        # wait a second, not send at once (it would be refused).
        times, _ = admit_all(GateState(remaining=1, interval=1.0), ["a", "b", "c"])
        assert times == [NOW, NOW + 1, NOW + 2]
    def test_with_pacing_a_blocked_gate_hands_out_the_quota_then_paces(self):
        times, _ = admit_all(GateState(blocked_until=NOW + 10, remaining=2, interval=1.0), ["a", "b", "c", "d"])
        assert times == [NOW + 10, NOW + 10, NOW + 11, NOW + 12]

    def test_fixed_window_mode_hands_out_at_most_limit_times_at_the_reset_and_sends_the_rest_later(self):
        state = observe(GateState(), WINDOW_OF_3_SPENT, now=NOW)
        times, state = admit_all(state, ["a", "b", "c", "d", "e"])
        assert times[:3] == [NOW + 60] * 3
        assert all(t > NOW + 60 for t in times[3:])
        # The rest hold no time: they ask again once the window after can have opened. The
        # window was first reported at NOW, ending at NOW + 60: it is at least 60 s long.
        assert set(state.tickets) == {"a", "b", "c"}
        assert state.window_seconds == 60
        assert times[3:] == [NOW + 60 + 60] * 2
        assert state.next_window_taken == 5  # 3 times handed out, 2 sent to the window after

    def test_fixed_window_mode_spreads_the_overflow_over_the_windows_it_fits_in(self):
        # A window of 3, first reported at NOW and ending at NOW + 60 (so at least 60 s long):
        # 3 tasks hold the reset time, the next 3 look again once the window after can have
        # opened, the 3 after those a window later. No task comes back before its window
        # can have opened, nor after (its quota is used as the window opens).
        state = observe(GateState(), WINDOW_OF_3_SPENT, now=NOW)
        times, state = admit_all(state, list("abcdefghi"))
        assert times == [NOW + 60] * 3 + [NOW + 120] * 3 + [NOW + 180] * 3
        assert set(state.tickets) == {"a", "b", "c"}

    def test_an_unknown_window_length_makes_the_overflow_look_again_right_after_the_reset(self):
        state = GateState(remaining=0, reset_at=NOW + 10, limit=2, blocked_until=NOW + 10, updated_at=NOW)
        times, _ = admit_all(state, list("abcde"))
        assert times == [NOW + 10] * 2 + [NOW + 10 + RECHECK_SECONDS] * 3

    def test_a_wait_the_task_cannot_keep_is_stretched_to_its_minimum_and_the_pacing_follows(self):
        state = GateState(remaining=0, interval=1.0, next_slot=NOW + 0.5, observed_at=NOW, updated_at=NOW)
        assert admit_all(state, ["a", "b", "c"])[0] == [NOW + 0.5, NOW + 1.5, NOW + 2.5]
        times = []
        for ticket in ["a", "b", "c"]:
            admission = admit(state, ticket, now=NOW, min_wait=2.0)
            times.append(admission.send_at)
            state = admission.state
        assert times == [NOW + 2.0, NOW + 3.0, NOW + 4.0]

    def test_a_wait_short_enough_to_sleep_through_is_not_stretched(self):
        state = GateState(remaining=0, interval=1.0, next_slot=NOW + 0.5, observed_at=NOW, updated_at=NOW)
        admission = admit(state, "a", now=NOW, in_process_up_to=1.0, min_wait=10.0)
        assert admission.send_at == NOW + 0.5
        assert admit(admission.state, "b", now=NOW, in_process_up_to=1.0, min_wait=10.0).send_at == NOW + 10.0

    def test_a_ticket_holder_coming_back_at_its_time_is_let_through_and_its_ticket_removed(self):
        state = admit(GateState(blocked_until=NOW + 30), "a", now=NOW).state
        admission = admit(state, "a", now=NOW + 30.5)
        assert (admission.send_at, admission.reason) == (NOW + 30.5, None)
        assert "a" not in admission.state.tickets

    def test_a_ticket_holder_coming_back_early_gets_the_same_time_again_without_a_second_reservation(self):
        paced = RateLimitInfo(remaining=0, reset_after=10, limit=1, window=1, interval=1.0)
        state = observe(GateState(), paced, now=NOW)
        _, state = admit_all(state, ["a", "b"])  # a at +10, b at +11
        again = admit(state, "b", now=NOW + 5)
        assert again.send_at == NOW + 11
        assert again.state.next_slot == state.next_slot == NOW + 12
        assert again.state.tickets == state.tickets
        # The next newcomer still gets the next slot, not a doubled one.
        assert admit(again.state, "c", now=NOW + 5).send_at == NOW + 12

    def test_coming_back_early_changes_nothing_so_a_store_need_not_write(self):
        state = admit(GateState(blocked_until=NOW + 30, updated_at=NOW), "a", now=NOW).state
        assert admit(state, "a", now=NOW + 1).state.to_json() == state.to_json()

    def test_a_ticket_holder_queues_again_from_blocked_until_if_the_gate_was_closed_past_its_time(self):
        state = admit(GateState(blocked_until=NOW + 10), "a", now=NOW).state
        state = observe(state, SILENT, now=NOW + 5, rate_limited_until=NOW + 50)  # a 429 elsewhere
        admission = admit(state, "a", now=NOW + 10)
        assert admission.send_at == NOW + 50
        assert admission.state.tickets == {"a": NOW + 50}

    def test_a_ticket_holder_requeued_with_pacing_goes_to_the_first_free_slot_after_the_block(self):
        state = GateState(remaining=0, interval=1.0, blocked_until=NOW + 10, updated_at=NOW)
        _, state = admit_all(state, ["a", "b"])  # +10, +11
        state = observe(state, SILENT, now=NOW + 5, rate_limited_until=NOW + 10.5)
        again = admit(state, "a", now=NOW + 10)
        assert again.send_at == NOW + 12  # b keeps +11; a gets the next free slot
        assert again.state.tickets == {"a": NOW + 12, "b": NOW + 11}

    def test_stale_tickets_expire(self):
        stale = NOW - TICKET_TTL_SECONDS - 1
        state = GateState(blocked_until=NOW + 30, tickets={"gone": stale, "kept": NOW + 30}, updated_at=NOW - 10)
        assert set(admit(state, "new", now=NOW).state.tickets) == {"kept", "new"}

    def test_the_number_of_tickets_is_capped_keeping_the_latest(self):
        tickets = {f"t{i}": NOW + i for i in range(MAX_TICKETS + 10)}
        state = GateState(blocked_until=NOW + 1, tickets=tickets, updated_at=NOW)
        kept = admit(state, "t0", now=NOW).state.tickets  # t0 (at NOW) is among the dropped
        assert len(kept) <= MAX_TICKETS + 1
        assert f"t{MAX_TICKETS + 9}" in kept

    def test_old_state_expires_to_a_fresh_gate_but_keeps_the_rate_and_origin(self):
        old = GateState(
            blocked_until=NOW - STATE_TTL_SECONDS - 100,
            remaining=0,
            reset_at=NOW - STATE_TTL_SECONDS - 100,
            limit=10,
            interval=2.0,
            next_slot=NOW - STATE_TTL_SECONDS - 50,
            tickets={"x": NOW - STATE_TTL_SECONDS - 60},
            updated_at=NOW - STATE_TTL_SECONDS - 200,
            origin=ORIGIN,
        )
        admission = admit(old, "a", now=NOW)
        assert admission.send_at == NOW
        fresh = admission.state
        assert (fresh.blocked_until, fresh.remaining, fresh.reset_at, fresh.limit, fresh.tickets) == (
            0.0, None, None, None, {}
        )
        assert (fresh.interval, fresh.origin) == (2.0, ORIGIN)

    def test_state_is_kept_while_its_last_time_is_recent(self):
        state = GateState(blocked_until=NOW - 10, remaining=0, limit=10, updated_at=NOW - 400, tickets={"x": NOW - 5})
        assert admit(state, "a", now=NOW).state.limit == 10

    def test_a_passed_fixed_window_refills_to_the_limit_less_the_times_handed_out_for_it(self):
        state = GateState(remaining=0, reset_at=NOW + 10, limit=5, updated_at=NOW)
        _, state = admit_all(state, ["a", "b"])  # two of the next window's five
        times, state = admit_all(state, ["c", "d", "e", "f"], now=NOW + 10.5)
        assert times[:3] == [NOW + 10.5] * 3
        assert state.remaining == 0
    def test_once_a_handed_out_window_opens_a_task_without_a_time_still_waits_for_the_holders(self):
        # Three tasks hold the reset time of a window of three. A fourth, told to check again
        # a second after the reset, comes back before any holder has reported: the window's
        # quota is theirs, so it must wait (not send a 4th request into a window of 3).
        state = GateState(remaining=0, reset_at=NOW + 10, limit=3, blocked_until=NOW + 10, updated_at=NOW)
        times, state = admit_all(state, ["a", "b", "c", "d"])
        assert times == [NOW + 10] * 3 + [NOW + 10 + RECHECK_SECONDS]
        again = admit(state, "d", now=NOW + 10 + RECHECK_SECONDS)
        assert again.send_at > NOW + 10 + RECHECK_SECONDS

    def test_is_open_does_not_change_anything(self):
        state = GateState(blocked_until=NOW + 5)
        assert not is_open(state, NOW)
        assert "__probe__" not in state.tickets


class TestOriginAndJson:
    def test_for_origin_keeps_the_state_of_the_same_api(self):
        state = GateState(blocked_until=NOW + 5, origin=ORIGIN)
        assert for_origin(state, ORIGIN) is state

    def test_for_origin_gives_a_fresh_state_for_another_api(self):
        state = GateState(blocked_until=NOW + 5, remaining=0, interval=3.0, tickets={"a": NOW + 5}, origin=ORIGIN)
        assert for_origin(state, "https://other.example.com:443") == GateState(origin="https://other.example.com:443")

    def test_a_state_survives_a_json_round_trip(self):
        state = GateState(
            blocked_until=NOW + 5.5,
            remaining=3,
            reset_at=NOW + 60,
            limit=10,
            interval=0.75,
            next_slot=NOW + 7.25,
            next_window_taken=2,
            tickets={"dag|run|task|-1": NOW + 6, "dag|run|task|3": NOW + 7.25},
            updated_at=NOW,
            origin=ORIGIN,
            observed_at=NOW - 1,
            probe_until=NOW + 3,
            window_first_seen=NOW - 2,
            window_seconds=62.0,
            in_flight={"dag|run|task|4": NOW - 0.5},
            limit_logs={"10/1.0/10": ((NOW - 0.75, 3), (NOW - 0.25, 1)), "5000/3600.0/100": ()},
        )
        # Every stored field is set (a field the reader forgot would come back as its default).
        stored = json.loads(state.to_json())
        assert all(stored[name] != GateState.__dataclass_fields__[name].default for name in stored if name not in (
            "tickets", "in_flight", "limit_logs"
        ))
        assert set(stored) == set(GateState.__dataclass_fields__) - {"damaged"}
        assert GateState.from_json(state.to_json(), now=NOW) == state
        assert stored["origin"] == ORIGIN

    @pytest.mark.parametrize("raw", [None, "", b""])
    def test_nothing_stored_is_a_fresh_gate(self, raw):
        state = GateState.from_json(raw, now=NOW)
        assert state == GateState()
        assert state.damaged is None

    def test_a_state_stored_before_a_field_existed_reads_with_its_default(self):
        old = {"blocked_until": NOW + 5, "remaining": 0, "updated_at": NOW, "origin": ORIGIN}
        state = GateState.from_json(json.dumps(old), now=NOW)
        assert (state.blocked_until, state.in_flight, state.damaged) == (NOW + 5, {}, None)

    def test_damaged_is_neither_stored_nor_compared(self):
        damaged = GateState.from_json("not json", now=NOW)
        assert "damaged" not in json.loads(damaged.to_json())
        assert GateState.from_json(damaged.to_json(), now=NOW) == damaged


# -- a bounded gate that fails safe (issue 10) --------------------------------------------------

#: 2023-11-14T22:13:20Z in epoch *milliseconds*, as several public APIs send X-RateLimit-Reset.
EPOCH_MILLISECONDS = 1_700_000_000_000
#: What blocked_until became from that header before the fix: the year 58,887.
YEAR_58887 = float(EPOCH_MILLISECONDS)


class TestBounded:
    def test_a_millisecond_reset_rejected_by_the_reader_does_not_block_the_gate(self):
        # The finding: a 200 with X-RateLimit-Remaining: 0 and a reset in epoch milliseconds
        # moved blocked_until to the year 58,887. The reader rejects such a reset; the gate
        # is told only that the quota is spent, with no reset time.
        info = RateLimitInfo(
            remaining=0, limit=60, rejected=(f"X-RateLimit-Reset: {EPOCH_MILLISECONDS} is beyond 7 days",)
        )
        state = observe(GateState(), info, now=NOW)

        assert state.blocked_until == 0.0
        assert state.to_json()  # and it serialises: nothing overflowed
        later = admit(state, "next", now=NOW + 1)
        assert NOW + 1 <= later.send_at <= NOW + 1 + HORIZON_SECONDS

    def test_a_reset_beyond_the_horizon_is_clamped_even_if_a_reader_let_it_through(self):
        state = observe(GateState(), RateLimitInfo(remaining=0, reset_after=YEAR_58887), now=NOW)
        assert state.blocked_until == state.reset_at == NOW + HORIZON_SECONDS

    @pytest.mark.parametrize("until", [math.inf, 1e300, YEAR_58887])
    def test_a_far_rate_limited_until_blocks_no_further_than_the_horizon(self, until):
        state = observe(GateState(), SILENT, now=NOW, rate_limited_until=until)
        assert state.blocked_until == NOW + HORIZON_SECONDS

    def test_a_nan_rate_limited_until_changes_no_block(self):
        blocked = GateState(blocked_until=NOW + 30, updated_at=NOW)
        assert observe(blocked, SILENT, now=NOW, rate_limited_until=math.nan).blocked_until == NOW + 30

    def test_counts_and_durations_from_a_response_are_capped(self):
        huge = RateLimitInfo(remaining=10**30, limit=10**30, interval=1e30, reset_after=60)
        state = observe(GateState(), huge, now=NOW)
        assert (state.remaining, state.limit, state.interval) == (MAX_COUNT, MAX_COUNT, HORIZON_SECONDS)

    def test_a_backlog_beyond_the_horizon_is_told_to_ask_again_then_not_promised_a_time(self):
        # 100 requests a day, spent: the 800th task's paced slot is 8 days away.
        state = GateState(remaining=0, interval=864.0, next_slot=NOW, observed_at=NOW, updated_at=NOW)
        times, state = admit_all(state, [f"t{i}" for i in range(800)])
        assert max(times) == NOW + HORIZON_SECONDS
        assert max(state.tickets.values()) <= NOW + HORIZON_SECONDS
        assert state.next_slot <= NOW + HORIZON_SECONDS
        # t0 sends at once; t1..t699 hold a slot whose next one still falls within the
        # horizon (t700's would be at the horizon, its successor's beyond); the rest hold none.
        assert sorted(state.tickets.values()) == [NOW + 864 * k for k in range(1, 700)]
        assert times[700:] == [NOW + HORIZON_SECONDS] * 100

    def test_a_state_built_with_times_beyond_the_horizon_is_bounded_by_any_transition(self):
        far = GateState(blocked_until=YEAR_58887, next_slot=YEAR_58887, tickets={"a": YEAR_58887}, updated_at=NOW)
        admission = admit(far, "b", now=NOW)
        assert admission.send_at == NOW + HORIZON_SECONDS
        assert admission.state.horizon <= NOW + HORIZON_SECONDS
        assert observe(far, SILENT, now=NOW).horizon <= NOW + HORIZON_SECONDS


class TestThroughTheHeaderReader:
    """The findings end to end from response headers: the reader, then the gate."""

    @staticmethod
    def read(status: int, headers: dict[str, str]) -> RateLimitInfo:
        return read_rate_limit_headers(status, headers, now=datetime.fromtimestamp(NOW, timezone.utc))

    def observed(self, status: int, headers: dict[str, str]) -> GateState:
        return observe(GateState(), self.read(status, headers), now=NOW)

    def test_a_200_with_remaining_0_and_a_millisecond_reset_blocks_until_that_reset(self):
        state = self.observed(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str((int(NOW) + 42) * 1000)})
        assert state.blocked_until == NOW + 42

    def test_a_200_with_remaining_0_and_a_reset_years_away_does_not_block_to_that_year(self):
        # 1.7e15 is read as epoch milliseconds (53,816 years away): rejected by the reader.
        headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(EPOCH_MILLISECONDS * 1000)}
        assert self.read(200, headers).rejected, "the reader must have refused this reset"
        state = self.observed(200, headers)
        assert state.blocked_until == 0.0
        assert GateState.from_json(state.to_json(), now=NOW + 1) == state

    def test_the_structured_ratelimit_header_on_a_200_closes_the_gate_for_its_t(self):
        # It was read on a 429 only; a server announcing "no quota for 30 s" on a 200 was hit again at once.
        state = self.observed(200, {"RateLimit": '"default";r=0;t=30'})
        assert state.blocked_until == NOW + 30
        assert admit(state, "next", now=NOW + 1).send_at == NOW + 30

    def test_a_structured_policy_paces_the_tasks_after_the_quota(self):
        headers = {"RateLimit": '"default";r=0;t=30', "RateLimit-Policy": '"default";q=100;w=60'}
        times, _ = admit_all(self.observed(200, headers), ["a", "b", "c"], now=NOW + 1)
        assert times == [NOW + 30, NOW + 30.6, pytest.approx(NOW + 31.2)]


class TestExpiryRelativeToNow:
    def test_a_state_whose_times_are_all_long_past_is_forgotten(self):
        old = GateState(blocked_until=NOW, remaining=0, limit=5, updated_at=NOW - 20, origin=ORIGIN)
        assert admit(old, "a", now=NOW + STATE_TTL_SECONDS).state.limit == 5
        assert admit(old, "a", now=NOW + STATE_TTL_SECONDS + 1).state.limit is None

    def test_even_the_longest_block_is_forgotten_a_ttl_after_it_ends(self):
        blocked = observe(GateState(origin=ORIGIN), SILENT, now=NOW, rate_limited_until=YEAR_58887)
        end = NOW + HORIZON_SECONDS
        assert admit(blocked, "a", now=end - 1).send_at == end
        after = admit(blocked, "a", now=end + STATE_TTL_SECONDS + 1)
        assert after.state.blocked_until == 0.0
        assert after.send_at == end + STATE_TTL_SECONDS + 1  # first contact again: a probe

    def test_a_state_not_written_for_longer_than_the_horizon_is_forgotten_whatever_it_holds(self):
        # Not something the gate writes (its times stay within the horizon of the write);
        # a hand-edited Variable, for example.
        stale = GateState(blocked_until=NOW + 2 * HORIZON_SECONDS, updated_at=NOW - MAX_STATE_AGE_SECONDS - 1)
        assert admit(stale, "a", now=NOW).send_at == NOW

    def test_a_stored_far_future_block_read_later_does_not_live_on(self):
        # Expiry used to be measured from the latest stored time, so a year-58,887 block
        # never expired. Read against now, that time is damage: a short block, then gone.
        raw = json.dumps({"blocked_until": YEAR_58887, "updated_at": NOW, "origin": ORIGIN})
        state = GateState.from_json(raw, now=NOW)
        assert state.blocked_until == NOW + DAMAGED_STATE_BLOCK_SECONDS
        assert "blocked_until" in state.damaged


class TestFailSafe:
    @pytest.mark.parametrize(
        "raw",
        [
            "not json",
            "{",
            "[]",
            "null",
            "42",
            '"text"',
            "[" * 100_000,  # deeper than the JSON parser's recursion limit
            b"\xff\xfe",
            '{"tickets": [1, 2]}',
            '{"tickets": {"a": "soon"}}',
            '{"remaining": "many"}',
            '{"remaining": -1}',
            '{"remaining": 1.5}',
            '{"remaining": true}',
            '{"blocked_until": {}}',
            '{"blocked_until": -5}',
            '{"origin": 7}',
            '{"interval": 1e300}',
            '{"remaining": 1e999}',
            '{"next_window_taken": Infinity}',
            '{"blocked_until": NaN}',
            '{"limit": ' + "9" * 4000 + "}",
        ],
    )
    def test_an_unreadable_stored_state_is_a_short_conservative_block_not_an_open_gate(self, raw):
        state = GateState.from_json(raw, now=NOW)

        assert state.damaged
        assert state.blocked_until == NOW + DAMAGED_STATE_BLOCK_SECONDS
        assert not is_open(state, NOW)
        assert admit(state, "a", now=NOW).send_at == NOW + DAMAGED_STATE_BLOCK_SECONDS

    def test_one_bad_field_keeps_a_valid_longer_block(self):
        # The finding: one bad field discarded the whole state, its block included, and the
        # next task went out as a probe.
        raw = json.dumps({"blocked_until": NOW + 600, "remaining": "many", "updated_at": NOW - 1, "origin": ORIGIN})
        state = GateState.from_json(raw, now=NOW)

        assert state.damaged == "remaining: 'many' is not a number"
        assert (state.blocked_until, state.origin) == (NOW + 600, ORIGIN)
        assert admit(for_origin(state, ORIGIN), "a", now=NOW).send_at == NOW + 600

    def test_a_valid_block_shorter_than_the_conservative_one_is_lengthened(self):
        raw = json.dumps({"blocked_until": NOW + 5, "tickets": {"a": "soon"}})
        assert GateState.from_json(raw, now=NOW).blocked_until == NOW + DAMAGED_STATE_BLOCK_SECONDS

    def test_after_the_conservative_block_one_request_goes_first_to_learn_the_limits(self):
        state = GateState.from_json('{"remaining": "many"}', now=NOW)
        after = NOW + DAMAGED_STATE_BLOCK_SECONDS
        first = admit(state, "a", now=after)
        second = admit(first.state, "b", now=after)
        assert first.send_at == after
        assert second.send_at > after, "b waits for what a learns"

    def test_tasks_that_waited_out_the_conservative_block_do_not_all_go_at_once(self):
        state = GateState.from_json("not json", now=NOW)
        end = NOW + DAMAGED_STATE_BLOCK_SECONDS
        times, state = admit_all(state, ["a", "b", "c"], now=NOW + 1)
        assert times == [end] * 3

        first = admit(state, "a", now=end)
        second = admit(first.state, "b", now=end + 0.1)
        assert first.send_at == end
        assert end + 0.1 < second.send_at <= end + 0.1 + RECHECK_SECONDS, "b waits for what a learns"
        assert "b" not in second.state.tickets

    def test_the_block_of_a_damaged_state_holds_for_its_connection_when_its_origin_is_unreadable(self):
        state = GateState.from_json('{"origin": 7, "blocked_until": %s}' % (NOW + 90), now=NOW)
        assert state.origin == ""
        assert for_origin(state, ORIGIN).blocked_until == NOW + 90

    def test_a_damaged_state_about_another_api_does_not_hold_this_one(self):
        raw = json.dumps({"origin": "https://other.example.com:443", "remaining": "many"})
        assert for_origin(GateState.from_json(raw, now=NOW), ORIGIN) == GateState(origin=ORIGIN)

    def test_a_stored_time_a_little_beyond_the_horizon_is_another_hosts_clock_and_is_read(self):
        raw = json.dumps({"blocked_until": NOW + HORIZON_SECONDS + 60, "updated_at": NOW})
        state = GateState.from_json(raw, now=NOW)
        assert (state.blocked_until, state.damaged) == (NOW + HORIZON_SECONDS, None)

    def test_more_tickets_than_the_cap_are_read_keeping_the_latest(self):
        tickets = {f"t{i}": NOW + i for i in range(MAX_TICKETS + 3)}
        state = GateState.from_json(json.dumps({"tickets": tickets, "updated_at": NOW}), now=NOW)
        assert state.damaged is None
        assert len(state.tickets) == MAX_TICKETS and f"t{MAX_TICKETS + 2}" in state.tickets


# -- simulations -----------------------------------------------------------------------------
#
# Tasks behave like NetworkRequestOperator._attempt: admit; if told to wait, come back at the
# send time plus a random lateness (scheduler, reschedule, trigger latency); send; observe the
# response (with rate_limited_until on a 429); on a 429, come back after Retry-After plus a
# lateness. Each server records what it *announced* (Retry-After, or the reset while remaining
# is 0): a request sent before an announced time it was told about is an early request.

EPS = 1e-9


@dataclass
class Response:
    status: int
    #: What the header reader makes of the response's headers.
    info: RateLimitInfo
    retry_after: float | None
    #: The time before which this response asked for no request (None: it asked nothing).
    announced: float | None


class TokenBucketServer:
    """R tokens a second, burst B; ``RateLimit-*`` headers with a policy (``B;w=B/R``), 429 +
    ``Retry-After`` when empty."""

    def __init__(self, rate: float = 1.0, burst: int = 5, start: float = NOW) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = float(burst), start
        self.window = round(burst / rate)

    def handle(self, t: float) -> Response:
        self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
        self.last = t
        if self.tokens >= 1 - EPS:
            self.tokens = max(self.tokens - 1, 0.0)
            remaining = math.floor(self.tokens + EPS)
            # Seconds until the next whole token (delta-seconds, rounded up).
            reset = max(1, math.ceil((remaining + 1 - self.tokens) / self.rate - EPS))
            return Response(200, self._info(remaining, reset), None, t + reset if remaining == 0 else None)
        retry_after = max(1, math.ceil((1 - self.tokens) / self.rate - EPS))
        info = replace(self._info(0, retry_after), retry_after=retry_after, source="Retry-After")
        return Response(429, info, retry_after, t + retry_after)

    def _info(self, remaining: int, reset: int) -> RateLimitInfo:
        return RateLimitInfo(
            limit=self.burst,
            remaining=remaining,
            reset_after=reset,
            window=self.window,
            interval=self.window / self.burst,
            source="RateLimit-Reset",
        )


class FixedWindowServer:
    """N requests per W-second window; ``X-RateLimit-*`` with an epoch reset, as GitHub does."""

    def __init__(self, limit: int = 10, window: int = 10) -> None:
        self.limit, self.window = limit, window
        self.current: int | None = None
        self.count = 0

    def handle(self, t: float) -> Response:
        index = math.floor(t / self.window)
        if index != self.current:
            self.current, self.count = index, 0
        end = (index + 1) * self.window
        # An epoch reset, read against the response's time: seconds from now.
        info = RateLimitInfo(limit=self.limit, reset_after=end - t, source="X-RateLimit-Reset")
        if self.count < self.limit:
            self.count += 1
            remaining = self.limit - self.count
            return Response(200, replace(info, remaining=remaining), None, float(end) if remaining == 0 else None)
        retry_after = max(1, math.ceil(end - t - EPS))
        return Response(429, replace(info, remaining=0, retry_after=retry_after), retry_after, t + retry_after)


@dataclass
class SimResult:
    tasks: int
    successes: int = 0
    rate_limited: int = 0
    #: Requests sent before a time the server had announced (and the client had received).
    early: int = 0
    #: Requests that reached the server before a time it had announced to anyone (what the
    #: demo API counts as "sent before a wait told to another client").
    early_at_server: int = 0
    makespan: float = 0.0
    admits: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    unfinished: int = 0

    @property
    def max_admits(self) -> int:
        return max(self.admits.values())

    @property
    def mean_admits(self) -> float:
        return sum(self.admits.values()) / len(self.admits)

    def summary(self) -> str:
        return (
            f"{self.successes}/{self.tasks} done, {self.rate_limited} x 429, {self.early} early, "
            f"{self.early_at_server} early at the server, "
            f"makespan {self.makespan:.1f}s, admits/task max {self.max_admits} mean {self.mean_admits:.2f}, "
            f"{self.steps} steps"
        )


def simulate(
    server,
    *,
    tasks: int,
    seed: int,
    max_lateness: float = 2.0,
    arrival_spread: float = 1.0,
    latency: float = 0.0,
    min_wait: float = 0.0,
    reports_answers: bool = False,
    send_delay: float = 0.0,
    max_steps: int = 20_000,
) -> SimResult:
    """Run ``tasks`` tasks against ``server`` through the pure gate, from ``NOW``.

    With ``latency == 0`` a task sends and observes in one step (as one operator does); with
    ``latency > 0`` the response is observed that much later, so other tasks interleave.
    With ``send_delay > 0`` a request reaches the server up to that long after the gate let
    it out (a task on a busy host), so requests may reach it in another order.
    A task told to wait comes back no sooner than ``min_wait`` (a deferral's minimum delay),
    which the gate is told.
    """
    rng = random.Random(seed)
    state = GateState(origin=ORIGIN)
    result = SimResult(tasks=tasks)
    announced = 0.0  # the latest not-before the client side has been told
    told_by_server = 0.0  # the latest not-before the server has answered to anyone
    events: list[tuple[float, int, str, Response | str | None]] = []
    sequence = 0

    def push(at: float, task: str, response: Response | str | None = None) -> None:
        nonlocal sequence
        heapq.heappush(events, (at, sequence, task, response))
        sequence += 1

    def deliver(at: float, task: str, response: Response) -> None:
        nonlocal state, announced
        until = None if response.retry_after is None else at + response.retry_after
        state = observe(state, response.info, now=at, rate_limited_until=until, ticket=task)
        if response.announced is not None:
            announced = max(announced, response.announced)
        if response.status == 429:
            result.rate_limited += 1
            push(at + response.retry_after + rng.uniform(0, max_lateness), task)
        else:
            result.successes += 1
            result.makespan = max(result.makespan, at - NOW)

    def reach_server(at: float, task: str) -> None:
        nonlocal told_by_server
        if at < told_by_server - EPS:
            result.early_at_server += 1
        sent = server.handle(at)
        if sent.announced is not None:
            told_by_server = max(told_by_server, sent.announced)
        if latency:
            push(at + latency, task, sent)
        else:
            deliver(at, task, sent)

    for index in range(tasks):
        push(NOW + rng.uniform(0, arrival_spread), f"dag|run|fetch|{index}")
    while events and result.steps < max_steps:
        result.steps += 1
        now, _, task, response = heapq.heappop(events)
        if response == ARRIVES:
            reach_server(now, task)
            continue
        if response is not None:
            deliver(now, task, response)
            continue
        result.admits[task] = result.admits.get(task, 0) + 1
        admission = admit(state, task, now=now, min_wait=min_wait, reports_answers=reports_answers)
        state = admission.state
        assert admission.send_at >= max(now, state.blocked_until)
        if admission.send_at > now:
            push(max(admission.send_at, now + min_wait) + rng.uniform(0, max_lateness), task)
            continue
        if now < announced - EPS:
            result.early += 1
        if send_delay:
            push(now + rng.uniform(0, send_delay), task, ARRIVES)
        else:
            reach_server(now, task)
    result.unfinished = tasks - result.successes
    return result


#: A simulation event: the task's request reaches the server.
ARRIVES = "arrives"


SERVERS = {
    # rate R in requests per second of each shape (for the makespan bound)
    "token-bucket": (TokenBucketServer, 1.0),
    "fixed-window": (FixedWindowServer, 1.0),
}
MAX_LATENESS = 2.0
SIM_CASES = [(shape, tasks, seed) for shape in SERVERS for tasks in (30, 45, 60) for seed in (1, 2, 3)]


def _sim_param(shape: str, tasks: int, seed: int):
    return pytest.param(shape, tasks, seed, id=f"{shape}-{tasks}tasks-seed{seed}")


def assert_well_behaved(result: SimResult, rate: float) -> None:
    ideal = result.tasks / rate + MAX_LATENESS
    summary = result.summary()
    assert result.unfinished == 0, f"livelock or starvation: {summary}"
    assert result.max_admits <= 10, f"a task went round the gate too often: {summary}"
    assert result.early == 0, f"a request was sent before a time the server announced: {summary}"
    assert result.rate_limited <= 0.10 * result.successes, f"too many 429s: {summary}"
    assert result.makespan <= 1.3 * ideal, f"makespan above 1.3 x {ideal:.0f}s: {summary}"


class TestSimulatedApis:
    @pytest.mark.parametrize("shape, tasks, seed", [_sim_param(*case) for case in SIM_CASES])
    def test_tasks_sharing_the_gate_finish_without_early_requests_few_429s_and_near_the_api_rate(
        self, shape, tasks, seed
    ):
        server_class, rate = SERVERS[shape]
        result = simulate(server_class(), tasks=tasks, seed=seed, max_lateness=MAX_LATENESS)
        assert_well_behaved(result, rate)

    @pytest.mark.parametrize(
        "shape", [pytest.param("token-bucket"), pytest.param("fixed-window")]
    )
    def test_tasks_coming_back_exactly_on_time_are_as_well_behaved(self, shape):
        server_class, rate = SERVERS[shape]
        result = simulate(server_class(), tasks=40, seed=7, max_lateness=0.0)
        assert_well_behaved(result, rate)

    @pytest.mark.parametrize(
        "shape", [pytest.param("token-bucket"), pytest.param("fixed-window")]
    )
    def test_with_a_network_round_trip_no_request_goes_before_a_time_the_gate_was_told(self, shape):
        # Responses arrive 50 ms after the send: other tasks admit in between, so a few 429s
        # on first contact are unavoidable; what the gate has been told it must still honour.
        server_class, rate = SERVERS[shape]
        result = simulate(server_class(), tasks=40, seed=11, max_lateness=MAX_LATENESS, latency=0.05)
        summary = result.summary()
        assert result.unfinished == 0, summary
        assert result.early == 0, summary
        assert result.max_admits <= 10, summary
        assert result.makespan <= 1.3 * (40 / rate + MAX_LATENESS), summary

    @pytest.mark.parametrize(
        "shape", [pytest.param("token-bucket"), pytest.param("fixed-window")]
    )
    def test_tasks_arriving_over_twenty_seconds_are_as_well_behaved(self, shape):
        server_class, rate = SERVERS[shape]
        result = simulate(server_class(), tasks=50, seed=5, max_lateness=MAX_LATENESS, arrival_spread=20.0)
        assert_well_behaved(result, rate)

    @pytest.mark.parametrize("shape", ["token-bucket", "fixed-window"])
    def test_tasks_that_cannot_come_back_within_two_seconds_are_as_well_behaved(self, shape):
        # A deferral is due no sooner than min_heartbeat_interval (say 2 s). Told so, the gate
        # gives each task a time it can really keep, and the times stay spaced.
        server_class, rate = SERVERS[shape]
        result = simulate(server_class(), tasks=60, seed=4, max_lateness=0.5, min_wait=2.0)
        assert_well_behaved(result, rate)
        assert result.rate_limited == 0, result.summary()

    @pytest.mark.parametrize("shape", ["token-bucket", "fixed-window"])
    @pytest.mark.parametrize("latency", [0.0, 0.05])
    def test_tasks_that_report_their_answers_and_send_at_their_time_without_a_write_are_as_well_behaved(
        self, shape, latency
    ):
        server_class, rate = SERVERS[shape]
        result = simulate(server_class(), tasks=50, seed=8, max_lateness=MAX_LATENESS, latency=latency,
                          reports_answers=True)
        summary = result.summary()
        assert result.unfinished == 0 and result.early == 0, summary
        assert result.rate_limited <= 0.10 * result.successes, summary
        assert result.makespan <= 1.3 * (50 / rate + MAX_LATENESS), summary

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_requests_slow_to_reach_the_server_never_arrive_before_a_time_it_told_anyone(self, seed):
        # Two requests a second (RateLimit-Policy: 2;w=1), and a task takes up to 0.6 s from
        # being let out to its request reaching the server (two busy cores). Paced by when
        # they were let out, the next request could arrive before the answer that spent the
        # quota was stored; it waits for that answer instead (issue 12, item 4).
        result = simulate(TokenBucketServer(rate=2.0, burst=2), tasks=60, seed=seed, max_lateness=0.2,
                          latency=0.02, send_delay=0.6, reports_answers=True)
        summary = result.summary()
        assert result.unfinished == 0, summary
        assert result.early == 0 and result.early_at_server == 0, summary
        assert result.max_admits <= 60, summary  # looks again every 0.1 s while an answer is out
        assert result.makespan <= 2.0 * (60 / 2.0) + 2, summary

    def test_in_a_fixed_window_no_task_goes_round_the_gate_more_than_twice(self):
        # Each go round is a task launch in Airflow: a task that does not fit in the current
        # window should come back once, when its window has opened, not every window.
        result = simulate(FixedWindowServer(), tasks=60, seed=3, max_lateness=0.5)
        assert_well_behaved(result, SERVERS["fixed-window"][1])
        assert result.max_admits <= 2, result.summary()

    def test_without_the_gate_the_same_load_is_mostly_refused(self):
        # The control: the same tasks each on their own (a fresh state per request) hammer the API.
        rng = random.Random(1)
        server = TokenBucketServer()
        refused = sum(server.handle(NOW + rng.uniform(0, 1.0)).status == 429 for _ in range(30))
        assert refused >= 20


# -- properties ------------------------------------------------------------------------------

#: What the header reader can return: every time validated, 0 to the horizon.
_SECONDS = st.one_of(
    st.floats(min_value=0, max_value=120, allow_nan=False),
    st.sampled_from([0.0, 1.0, 30.0, 3600.0, float(HORIZON_SECONDS)]),
)
_COUNT = st.one_of(st.integers(0, 12), st.integers(0, 10**12))
_INFO = st.builds(
    RateLimitInfo,
    retry_after=st.none() | _SECONDS,
    reset_after=st.none() | _SECONDS,
    remaining=st.none() | _COUNT,
    limit=st.none() | _COUNT,
    window=st.none() | _SECONDS,
    interval=st.none() | st.floats(min_value=0.001, max_value=HORIZON_SECONDS, allow_nan=False),
)
_STEP = st.one_of(
    st.floats(min_value=0, max_value=30, allow_nan=False),
    st.sampled_from([0.0, 1.0, STATE_TTL_SECONDS + 1, TICKET_TTL_SECONDS + 1]),
)
_TICKET = st.sampled_from(["a", "b", "c", "d", "e", "f"])
_OBSERVE = st.tuples(
    st.just("observe"),
    _STEP,
    st.tuples(_INFO, st.none() | _TICKET),
    st.one_of(st.none(), st.floats(min_value=-60, max_value=10**7, allow_nan=False)),
)
_LIMITS = st.sampled_from(
    [(), (ConfiguredLimit(2, 1.0, 2),), (ConfiguredLimit(3, 5.0, 1), ConfiguredLimit(5, 3600.0, 5))]
)
#: (ticket, in_process_up_to, min_wait, limits, reports_answers, cheap_looks): how long the
#: task can wait where it is, the least it waits otherwise (a deferral's minimum delay), its
#: configured limits, whether it reports how its request ended, whether it waits in a trigger.
_ADMIT = st.tuples(
    st.just("admit"),
    _STEP,
    st.tuples(
        _TICKET,
        st.sampled_from([0.0, 1.0, 60.0, math.inf]),
        st.sampled_from([0.0, 1.0, 2.0]),
        _LIMITS,
        st.booleans(),
        st.booleans(),
    ),
    st.none(),
)


def assert_bounded(state: GateState, now: float) -> None:
    """Every time finite, from 0 to the horizon after ``now``; every count within its cap."""
    latest = now + HORIZON_SECONDS
    times = [
        state.blocked_until, state.next_slot, state.updated_at, state.observed_at, state.probe_until,
        state.window_first_seen, *(t for t in [state.reset_at] if t is not None),
        *state.tickets.values(), *state.in_flight.values(),
    ]
    assert all(math.isfinite(t) and 0 <= t <= latest for t in times), state
    for count in (state.remaining, state.limit, state.next_window_taken):
        assert count is None or (isinstance(count, int) and 0 <= count <= MAX_COUNT), state
    for seconds in (state.interval, state.window_seconds):
        assert seconds is None or 0 <= seconds <= HORIZON_SECONDS, state
    assert len(state.tickets) <= MAX_TICKETS + 1 and len(state.in_flight) <= MAX_TICKETS + 1
    assert len(state.limit_logs) <= MAX_LIMIT_LOGS, state
    for key, entries in state.limit_logs.items():
        assert len(entries) <= MAX_LOG_ENTRIES, state
        assert list(entries) == sorted(entries), state
        assert all(math.isfinite(at) and 0 <= at <= latest and 0 < count <= MAX_COUNT for at, count in entries), state
        assert max([at + ConfiguredLimit.from_key(key).per_seconds for at, _ in entries], default=0) <= latest, state


@PROPERTY_SETTINGS
@given(
    operations=st.lists(st.one_of(_OBSERVE, _ADMIT), max_size=40),
    damaged=st.none() | st.sampled_from(["not json", '{"remaining": "many", "blocked_until": %r}' % (NOW + 90)]),
)
def test_any_sequence_of_observations_and_admissions_keeps_the_gates_invariants(operations, damaged):
    # From a fresh gate, or from the conservative block that replaced an unreadable one.
    state = GateState(origin=ORIGIN) if damaged is None else for_origin(GateState.from_json(damaged, now=NOW), ORIGIN)
    now = NOW
    for kind, step, payload, wait in operations:
        now += step
        before = state
        if kind == "observe":
            info, ticket = payload
            until = None if wait is None else now + wait
            state = observe(state, info, now=now, rate_limited_until=until, ticket=ticket)
            if until is not None and until > now:
                assert state.blocked_until >= min(until, now + HORIZON_SECONDS) - 1e-6
        else:
            ticket, in_process_up_to, min_wait, limits, reports_answers, cheap_looks = payload
            admission = admit(
                state, ticket, now=now, in_process_up_to=in_process_up_to, min_wait=min_wait, limits=limits,
                reports_answers=reports_answers, cheap_looks=cheap_looks,
            )
            state = admission.state
            # Never a send time before blocked_until, whether before or after the change.
            assert admission.send_at >= now
            assert admission.send_at >= before.blocked_until or before.blocked_until <= now
            assert admission.send_at >= state.blocked_until or state.blocked_until <= now
            assert admission.send_at <= now + HORIZON_SECONDS
            assert (admission.reason is None) == (admission.send_at == now)
            if admission.send_at > now and admission.reason != "quota spent; checking the shared gate again":
                assert state.tickets[ticket] == admission.send_at
        # blocked_until only moves later, unless the whole state expired (long past it).
        expired = before.updated_at and now > before.horizon + STATE_TTL_SECONDS
        assert state.blocked_until >= before.blocked_until or expired
        # And however it changes, no task may send earlier than before.
        assert max(state.blocked_until, now) >= max(before.blocked_until, now)
        assert state.origin == ORIGIN
        assert_bounded(state, now)
        # What is stored reads back the same, now and as long as it still matters.
        assert GateState.from_json(state.to_json(), now=now) == state
        assert GateState.from_json(state.to_json(), now=now + 1).damaged is None


_FIELD_VALUE = (
    st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()  # NaN and ±Infinity too: json.dumps writes them, json.loads reads them
    | st.sampled_from([YEAR_58887, 1e300, NOW + HORIZON_SECONDS + 1e6, -1.0, NOW + 30])
    | st.text(max_size=5)
    | st.none()
    | st.booleans()
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers() | st.floats() | st.text(max_size=3), max_size=2)
)


@PROPERTY_SETTINGS
@given(
    raw=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=50),
        st.builds(
            json.dumps,
            st.dictionaries(
                st.sampled_from(list(GateState.__dataclass_fields__)) | st.text(max_size=10),
                _FIELD_VALUE,
                max_size=6,
            ),
        ),
        st.builds(json.dumps, _FIELD_VALUE),
    ),
    later=st.sampled_from([0.0, 1.0, STATE_TTL_SECONDS, HORIZON_SECONDS]),
)
def test_from_json_never_raises_and_reads_only_bounded_times(raw, later):
    now = NOW + later
    state = GateState.from_json(raw, now=now)

    assert isinstance(state, GateState)
    assert_bounded(state, now)
    if state.damaged is not None:
        assert state.blocked_until >= now + DAMAGED_STATE_BLOCK_SECONDS
        assert not is_open(state, now)
    # Whatever was read, the gate works on it and stores it readably.
    admission = admit(state, "a", now=now)
    assert admission.send_at >= max(now, state.blocked_until)
    assert GateState.from_json(admission.state.to_json(), now=now).damaged is None


def test_on_first_contact_one_request_goes_ahead_and_the_others_wait_for_what_it_learns():
    first = admit(GateState(), "a", now=NOW)
    second = admit(first.state, "b", now=NOW)

    assert first.send_at == NOW
    assert second.send_at > NOW, "b must not send before a's answer is known"
    assert second.send_at <= NOW + RECHECK_SECONDS

    learned = observe(second.state, RateLimitInfo(remaining=4, reset_after=1), now=NOW + 0.1)
    assert admit(learned, "b", now=NOW + 0.2).send_at == NOW + 0.2


def test_a_probe_that_never_reports_stops_holding_the_others_after_its_timeout():
    from network_requests.gate import PROBE_TIMEOUT_SECONDS

    probing = admit(GateState(), "a", now=NOW).state

    assert admit(probing, "b", now=NOW + PROBE_TIMEOUT_SECONDS + 0.1).send_at == NOW + PROBE_TIMEOUT_SECONDS + 0.1


def test_the_probe_asking_again_is_let_out_again_and_the_others_still_wait():
    # Found by the Variable store across TMPDIRs (tests/distributed/test_gate_processes.py):
    # a store that redid the probe's admission on a state already holding it held the probe
    # back for itself, and every task stalled until the probe timed out, again and again.
    from network_requests.gate import PROBE_TIMEOUT_SECONDS

    probing = admit(GateState(), "a", now=NOW).state

    again = admit(probing, "a", now=NOW + 0.5)
    other = admit(again.state, "b", now=NOW + 0.6)

    assert again.send_at == NOW + 0.5
    assert again.state.probe_until == NOW + 0.5 + PROBE_TIMEOUT_SECONDS
    assert other.send_at > NOW + 0.6, "b must still wait for the probe's answer"


def test_a_timed_out_probe_asking_again_waits_for_the_probe_after_it():
    from network_requests.gate import PROBE_TIMEOUT_SECONDS

    late = NOW + PROBE_TIMEOUT_SECONDS + 0.1
    second_probe = admit(admit(GateState(), "a", now=NOW).state, "b", now=late).state

    assert admit(second_probe, "a", now=late + 0.1).send_at > late + 0.1


def test_an_api_without_rate_limit_headers_is_not_serialised_after_the_first_answer():
    known = observe(admit(GateState(), "a", now=NOW).state, SILENT, now=NOW + 0.1)

    times, _ = admit_all(known, ["b", "c", "d"], now=NOW + 0.2)

    assert times == [NOW + 0.2] * 3


def test_a_probe_that_got_no_answer_is_released_for_the_next_task():
    probing = admit(GateState(), "a", now=NOW).state

    assert admit(release_probe(probing), "b", now=NOW + 0.1).send_at == NOW + 0.1


# A response's RateLimit-Remaining counts the requests the server had seen when it answered,
# not those the gate let out after this one: found by the benchmark, where a trigger let out
# right after another got the last token's 429 while the first one's answer was on its way.
PACED = {"limit": 5, "window": 5, "interval": 1.0, "reset_after": 1}


def test_requests_let_out_after_a_response_was_sent_still_count_against_its_remaining():
    known = observe(GateState(), RateLimitInfo(**PACED, remaining=2), now=NOW)
    # Past the reset the server knows: what the next answer says is a new count.
    a = admit(known, "a", now=NOW + 1.5)
    b = admit(a.state, "b", now=NOW + 1.6)
    assert (a.send_at, b.send_at) == (NOW + 1.5, NOW + 1.6)

    # a's answer: one left, which b (already out) is about to take.
    answered = observe(b.state, RateLimitInfo(**PACED, remaining=1), now=NOW + 1.7, ticket="a")

    assert answered.remaining == 0
    assert admit(answered, "c", now=NOW + 1.8).send_at > NOW + 1.8, "c would take b's token"


# Nor does it count every request let out before this one: requests overtake each other on
# the way to the server. Found by tests/distributed/test_gate_processes.py, where the last of
# four processes let out as a window opened was answered first ("3 left"), and the gate let a
# fifth request into that window of 4.
WINDOW_OF_4_SPENT = RateLimitInfo(limit=4, remaining=0, reset_after=2, source="X-RateLimit-Reset")


def test_a_response_that_came_back_first_may_not_count_a_request_let_out_before_it():
    known = observe(GateState(), RateLimitInfo(**PACED, remaining=3), now=NOW)
    a = admit(known, "a", now=NOW + 1.5)
    b = admit(a.state, "b", now=NOW + 1.6)

    # b reached the server first (a is still on its way) and was told 2 are left.
    answered = observe(b.state, RateLimitInfo(**PACED, remaining=2), now=NOW + 1.7, ticket="b")

    assert answered.remaining == 1, "a will spend one of the 2"
    assert set(answered.in_flight) == {"a"}


@pytest.mark.parametrize("reports_answers", [False, True])
def test_requests_let_out_as_a_window_opens_all_count_against_the_answer_that_overtook_them(reports_answers):
    # Four tasks hold the reset of a spent window of 4 and go one after another as it opens;
    # the last one let out reaches the server first and is told 3 are left.
    _, state = admit_all(observe(GateState(), WINDOW_OF_4_SPENT, now=NOW), list("abcd"))
    for index, ticket in enumerate("abcd"):
        state = admit(state, ticket, now=NOW + 2 + index / 100, reports_answers=reports_answers).state
    overtaken = observe(state, replace(WINDOW_OF_4_SPENT, remaining=3), now=NOW + 2.05, ticket="d")

    assert overtaken.remaining == 0
    assert admit(overtaken, "fifth", now=NOW + 2.06).send_at >= NOW + 4, "a fifth request in a window of 4"


def test_answers_in_the_order_the_server_saw_the_requests_count_nothing_twice():
    # The cost of counting every request out: none when the answers come back in the order
    # the server counted the requests (what one process sees).
    state = observe(GateState(), replace(WINDOW_OF_4_SPENT, remaining=4), now=NOW)
    a = admit(state, "a", now=NOW + 0.1)
    b = admit(a.state, "b", now=NOW + 0.1)
    state = observe(b.state, replace(WINDOW_OF_4_SPENT, remaining=3), now=NOW + 0.2, ticket="a")
    assert state.remaining == 2
    state = observe(state, replace(WINDOW_OF_4_SPENT, remaining=2), now=NOW + 0.2, ticket="b")
    assert state.remaining == 2


def test_past_a_block_that_said_only_when_one_task_goes_first_and_the_others_look_again_after_it():
    # A window of 4 ending at NOW + 2: its last request is refused with only a Retry-After
    # reaching past the reset (a block). Four tasks held the reset, four more ask during the
    # block: how much of the quota the block ends in is left, nothing says.
    state = observe(GateState(), replace(WINDOW_OF_4_SPENT, remaining=1), now=NOW)
    state = admit(state, "last", now=NOW + 0.5).state
    _, state = admit_all(state, [f"held{i}" for i in range(4)], now=NOW + 0.5)
    blocked_until = NOW + 3.6
    state = observe(state, RateLimitInfo(retry_after=3.1, source="Retry-After"), now=NOW + 0.5,
                    rate_limited_until=blocked_until, ticket="last")

    times = []
    for ticket in [f"held{i}" for i in range(4)] + [f"new{i}" for i in range(4)]:
        admission = admit(state, ticket, now=NOW + 2.1)
        times.append(admission.send_at)
        state = admission.state

    # All eight used to be given the block's end, four more than a window of 4 holds.
    assert sorted(times) == [blocked_until] + [blocked_until + RECHECK_SECONDS] * 7
    assert len(state.tickets) == 1


def test_the_others_wait_for_the_one_that_went_first_no_longer_than_for_a_first_contact_probe():
    # Its request went and its task died without reporting (or its report was lost).
    state = GateState(limit=4, remaining=0, observed_at=NOW, updated_at=NOW, in_flight={"dead": NOW})
    assert admit(state, "a", now=NOW + 1).send_at == NOW + 1 + RECHECK_SECONDS

    later = NOW + PROBE_TIMEOUT_SECONDS + 0.1
    first = admit(state, "a", now=later)
    assert first.send_at == later
    assert admit(first.state, "b", now=later).send_at == later + RECHECK_SECONDS


def test_quota_left_in_a_window_is_no_use_past_a_block_that_ends_after_its_reset():
    # 3 of a window of 4 left until NOW + 2, then a block until NOW + 3.4: whoever goes at
    # the block's end goes in the next window, where 4 are allowed in all.
    state = observe(GateState(), replace(WINDOW_OF_4_SPENT, remaining=3), now=NOW)
    state = observe(state, RateLimitInfo(retry_after=3.3, source="Retry-After"), now=NOW + 0.1,
                    rate_limited_until=NOW + 3.4)

    times, state = admit_all(state, [f"t{i}" for i in range(6)], now=NOW + 0.2)

    assert times[:4] == [NOW + 3.4] * 4, "the 3 left used to be handed out at the block's end too"
    assert all(at > NOW + 3.4 for at in times[4:])


def test_a_request_sent_within_a_second_of_the_reset_counts_in_both_windows():
    # The reset is read against a whole-second Date, up to a second late: a request sent in
    # that second may land in the next window, whose quota is being handed out.
    state = observe(GateState(), replace(WINDOW_OF_4_SPENT, remaining=2), now=NOW)
    late = admit(state, "late", now=NOW + 1.5)
    assert late.send_at == NOW + 1.5
    assert late.state.remaining == 1

    times, _ = admit_all(late.state, ["last", "next0", "next1", "next2"], now=NOW + 1.6)

    # "late" and "last" may be in the next window: 2 more of its 4 are handed out.
    assert times[:3] == [NOW + 1.6, NOW + 2, NOW + 2]
    assert times[3] > NOW + 2


def test_a_slow_answer_about_a_window_that_is_over_does_not_bring_its_quota_back():
    # A window of 60 s. Its last request goes half a second before the reset; three tasks
    # hold the reset and go as the next window opens.
    window = RateLimitInfo(limit=4, remaining=1, reset_after=60, source="X-RateLimit-Reset")
    state = admit(observe(GateState(), window, now=NOW), "last", now=NOW + 59.5).state
    _, state = admit_all(state, ["h1", "h2", "h3"], now=NOW + 59.6)
    for index, ticket in enumerate(["h1", "h2", "h3"]):
        state = admit(state, ticket, now=NOW + 60).state
        state = observe(state, replace(window, remaining=3 - index), now=NOW + 60.05, ticket=ticket)
    # The last request reached the server before the turn; its answer comes after theirs:
    # "0 left, resetting in a second" is about the window that is over.
    state = observe(state, replace(window, remaining=0, reset_after=1), now=NOW + 60.3, ticket="last")

    assert state.reset_at == pytest.approx(NOW + 120.05)
    times, _ = admit_all(state, ["n1", "n2", "n3", "n4"], now=NOW + 61.5)
    # It used to set the reset back to NOW + 61.3, and past it the gate let in a full quota.
    assert all(at >= NOW + 120 for at in times), times


def test_times_handed_out_past_a_newly_reported_reset_still_count_against_the_window_after_it():
    # A window of 4 ends at NOW + 2. One of its requests is still out when another is refused
    # with a block until NOW + 4.2; four tasks are given the block's end.
    state = observe(GateState(), replace(WINDOW_OF_4_SPENT, remaining=2), now=NOW)
    state = admit(state, "slow", now=NOW + 0.5).state
    state = admit(state, "refused", now=NOW + 0.5).state
    state = observe(state, RateLimitInfo(retry_after=3.6, source="Retry-After"), now=NOW + 0.6,
                    rate_limited_until=NOW + 4.2, ticket="refused")
    held, state = admit_all(state, [f"held{i}" for i in range(4)], now=NOW + 0.7)
    assert held == [NOW + 4.2] * 4
    # The slow request reached the server in the next window: 3 left there, until NOW + 4.05.
    state = observe(state, replace(WINDOW_OF_4_SPENT, remaining=3), now=NOW + 2.05, ticket="slow")

    times, _ = admit_all(state, [f"more{i}" for i in range(4)], now=NOW + 2.1)

    # The block's end is in the window after that one, whose 4 are the holders': these four
    # used to be given it too.
    assert all(at > NOW + 4.2 for at in times), times


def test_two_answers_of_one_window_read_against_dates_a_second_apart_do_not_open_a_new_window():
    # A window of 4, 3 left until NOW + 2. x and y go at NOW + 0.9; the server counts x at
    # NOW + 0.99 (Date NOW: "2 left, reset in 2 s") and y at NOW + 1.0 (Date NOW + 1: "1 left,
    # reset in 1 s"), and y's answer is observed first.
    state = observe(GateState(), replace(WINDOW_OF_4_SPENT, remaining=3), now=NOW)
    _, state = admit_all(state, ["x", "y"], now=NOW + 0.9)
    state = observe(state, replace(WINDOW_OF_4_SPENT, remaining=1, reset_after=1), now=NOW + 1.01, ticket="y")
    # x's reset reads 1.01 s later than y's: the same window (x went before the known reset).
    state = observe(state, replace(WINDOW_OF_4_SPENT, remaining=2, reset_after=2), now=NOW + 1.02, ticket="x")

    assert state.remaining == 0
    assert admit(state, "z", now=NOW + 1.03).send_at >= NOW + 2, "it used to be taken for a new window with 2 left"


def test_a_holder_back_after_its_window_has_ended_queues_again():
    # Four tasks hold the reset of a window of 4 that lasts 2 s; three go at their time,
    # one is held up elsewhere.
    _, state = admit_all(observe(GateState(), WINDOW_OF_4_SPENT, now=NOW), ["a", "b", "c", "late"])
    for index, ticket in enumerate("abc"):
        state = admit(state, ticket, now=NOW + 2).state
        state = observe(state, replace(WINDOW_OF_4_SPENT, remaining=3 - index), now=NOW + 2.05, ticket=ticket)
    # The window after holds four more tasks, sent as it opens.
    _, state = admit_all(state, ["e", "f", "g", "h"], now=NOW + 2.1)
    for ticket in "efgh":
        state = admit(state, ticket, now=NOW + 4.05).state

    back = admit(state, "late", now=NOW + 4.5)

    # Its time was counted in the window before: now it would be a fifth in this one.
    assert back.send_at > NOW + 4.5


def test_a_request_without_an_answer_is_no_longer_out_and_one_never_reported_is_forgotten():
    known = observe(GateState(), RateLimitInfo(**PACED, remaining=3), now=NOW)
    out = admit(admit(known, "a", now=NOW).state, "b", now=NOW).state
    assert set(out.in_flight) == {"a", "b"}

    assert set(release_probe(out, "a").in_flight) == {"b"}
    later = observe(out, SILENT, now=NOW + IN_FLIGHT_TTL_SECONDS + 1)
    assert later.in_flight == {}
    assert GateState.from_json(out.to_json(), now=NOW).in_flight == out.in_flight


# -- configured limits (issue 11) -------------------------------------------------------------
#
# Limits a user declared for an API that announces none. A request counts against a limit from
# when the gate lets it out until the limit's window after its answer was observed.

TEN_PER_SECOND = ConfiguredLimit(10, 1.0, 10)
TEN_PER_SECOND_SPACED = ConfiguredLimit(10, 1.0, 1)
TWO_PER_SECOND = ConfiguredLimit(2, 1.0, 2)


def known_api(limits, *, now: float = NOW, answer: RateLimitInfo = SILENT, **observed) -> GateState:
    """A gate past first contact: one request let out and answered (by default with no
    rate-limit headers) at ``now``."""
    state = admit(GateState(origin=ORIGIN), "first", now=now, limits=limits).state
    return observe(state, answer, now=now, ticket="first", **observed)


def admit_each(state, tickets, *, now, limits, **hints) -> tuple[list[float], GateState]:
    times = []
    for ticket in tickets:
        admission = admit(state, ticket, now=now, limits=limits, **hints)
        times.append(admission.send_at)
        state = admission.state
    return times, state


class TestConfiguredLimits:
    def test_the_whole_quota_goes_at_once_then_the_next_waits_for_the_first_answers_window(self):
        state = known_api([TEN_PER_SECOND])  # one answered at NOW
        times, state = admit_each(state, [f"t{i}" for i in range(10)], now=NOW + 0.1, limits=[TEN_PER_SECOND])
        assert times[:9] == [NOW + 0.1] * 9
        # The 10th in one second: after NOW + 1, when the first answer leaves the window.
        assert times[9] == NOW + 1.0
        assert "configured rate limit 10 per 1s" in admit(state, "late", now=NOW + 0.1, limits=[TEN_PER_SECOND]).reason

    def test_burst_one_spaces_requests_evenly(self):
        state = known_api([TEN_PER_SECOND_SPACED])
        times, _ = admit_each(state, [f"t{i}" for i in range(5)], now=NOW, limits=[TEN_PER_SECOND_SPACED])
        assert times == pytest.approx([NOW + 0.1, NOW + 0.2, NOW + 0.3, NOW + 0.4, NOW + 0.5], abs=1e-6)

    def test_a_request_counts_from_its_answer_so_a_slow_answer_holds_the_next_window_back(self):
        state = admit(GateState(origin=ORIGIN), "a", now=NOW, limits=[ConfiguredLimit(1, 1.0, 1)]).state
        # Out, no answer yet: the next request waits for it, whenever that is.
        assert admit(state, "b", now=NOW + 5, limits=[ConfiguredLimit(1, 1.0, 1)]).send_at > NOW + 5
        answered = observe(state, SILENT, now=NOW + 5, ticket="a")
        assert admit(answered, "b", now=NOW + 5.5, limits=[ConfiguredLimit(1, 1.0, 1)]).send_at == NOW + 6

    def test_the_stricter_of_configured_and_announced_wins(self):
        # The server allows 100 more; the configured 2 per second allows one more after "first".
        generous = known_api([TWO_PER_SECOND], answer=RateLimitInfo(remaining=100, reset_after=60))
        times, _ = admit_each(generous, ["a", "b"], now=NOW + 0.1, limits=[TWO_PER_SECOND])
        assert times == [NOW + 0.1, NOW + 1.0]
        # The server blocks for 30 s; the configured limit would allow now.
        blocked = known_api([TWO_PER_SECOND], rate_limited_until=NOW + 30)
        assert admit(blocked, "a", now=NOW + 0.1, limits=[TWO_PER_SECOND]).send_at == NOW + 30

    def test_several_limits_hold_at_once(self):
        per_second_and_per_minute = [ConfiguredLimit(3, 1.0, 3), ConfiguredLimit(4, 60.0, 4)]
        state = known_api(per_second_and_per_minute)
        times, _ = admit_each(state, ["a", "b", "c", "d"], now=NOW + 0.1, limits=per_second_and_per_minute)
        # "first", a and b fill the second: c waits for first's second to be over; d would be
        # the 5th in a minute: it waits for first's minute.
        assert times == [NOW + 0.1, NOW + 0.1, NOW + 1, NOW + 60]

    def test_the_times_promised_to_other_tasks_count(self):
        state = known_api([TWO_PER_SECOND])
        times, state = admit_each(state, ["a", "b", "c", "d"], now=NOW + 0.1, limits=[TWO_PER_SECOND])
        # a goes; b is promised NOW + 1 (first's window), c too (a is out, counted as answered
        # at any moment now: NOW + 0.1 + 1), d after both promised times' window.
        assert times == [NOW + 0.1, NOW + 1.0, NOW + 1.1, NOW + 2.0]

    def test_a_task_back_late_pushes_the_next_batch_so_no_window_holds_more_than_declared(self):
        # Jitter and lateness: promised times are hints; what holds is the window after each
        # request that was really sent. Two per second: c and d are promised NOW + 1, e and f
        # NOW + 2. d comes back on time; c comes back half a second late.
        state = known_api([TWO_PER_SECOND])
        second = observe(admit(state, "b", now=NOW, limits=[TWO_PER_SECOND]).state, SILENT, now=NOW, ticket="b")
        times, state = admit_each(second, ["c", "d", "e", "f"], now=NOW, limits=[TWO_PER_SECOND])
        assert times == [NOW + 1, NOW + 1, NOW + 2, NOW + 2]
        state = admit(state, "d", now=NOW + 1, limits=[TWO_PER_SECOND]).state
        state = observe(state, SILENT, now=NOW + 1, ticket="d")
        late = admit(state, "c", now=NOW + 1.5, limits=[TWO_PER_SECOND])
        assert late.send_at == NOW + 1.5, "c's place was kept: d is the only request in its window"
        state = observe(late.state, SILENT, now=NOW + 1.5, ticket="c")
        e = admit(state, "e", now=NOW + 2, limits=[TWO_PER_SECOND])
        f = admit(e.state, "f", now=NOW + 2, limits=[TWO_PER_SECOND])
        assert e.send_at == NOW + 2
        # c (NOW + 1.5) and e fill (NOW + 1, NOW + 2]: f waits until c's window is over.
        assert f.send_at == NOW + 2.5
        assert f.state.tickets["f"] == NOW + 2.5

    def test_a_time_stretched_to_the_tasks_minimum_wait_is_fitted_again(self):
        state = known_api([TEN_PER_SECOND_SPACED])
        times, state = admit_each(state, ["a", "b"], now=NOW, limits=[TEN_PER_SECOND_SPACED])
        assert times == pytest.approx([NOW + 0.1, NOW + 0.2])
        # c could go at NOW + 0.3 but can't be back before NOW + 2: it gets NOW + 2, and d,
        # who can sleep where it is, is not put at the same moment.
        c = admit(state, "c", now=NOW, min_wait=2.0, limits=[TEN_PER_SECOND_SPACED])
        d = admit(c.state, "d", now=NOW, in_process_up_to=60, limits=[TEN_PER_SECOND_SPACED])
        assert c.send_at == NOW + 2.0
        assert d.send_at == pytest.approx(NOW + 0.3)
        e = admit(d.state, "e", now=NOW, in_process_up_to=60, limits=[TEN_PER_SECOND_SPACED])
        assert e.send_at == pytest.approx(NOW + 0.4)

    def test_a_request_without_an_answer_counts_from_when_it_was_given_up(self):
        state = admit(known_api([TWO_PER_SECOND]), "a", now=NOW + 0.5, limits=[TWO_PER_SECOND]).state
        released = release_probe(state, "a", now=NOW + 3)
        assert released.in_flight == {}
        assert released.limit_logs[TWO_PER_SECOND.key][-1] == (NOW + 3, 1)

    def test_a_request_whose_task_never_reported_counts_until_its_in_flight_time_is_over(self):
        hourly = ConfiguredLimit(2, 3600.0, 2)
        state = admit(known_api([hourly]), "a", now=NOW + 0.5, limits=[hourly]).state
        later = admit(state, "b", now=NOW + 0.5 + IN_FLIGHT_TTL_SECONDS + 10, limits=[hourly])
        assert "a" not in later.state.in_flight
        assert later.state.limit_logs[hourly.key] == ((NOW, 1), (NOW + 0.5 + IN_FLIGHT_TTL_SECONDS, 1))
        assert later.send_at == NOW + 3600, "first and a fill the hour"

    def test_an_hours_limit_is_not_forgotten_when_the_gate_is_idle_for_minutes(self):
        hourly = ConfiguredLimit(3, 3600.0, 3)
        state = known_api([hourly])
        _, state = admit_each(state, ["a", "b"], now=NOW, limits=[hourly])
        state = observe(observe(state, SILENT, now=NOW, ticket="a"), SILENT, now=NOW, ticket="b")
        idle = NOW + 10 * STATE_TTL_SECONDS
        assert admit(state, "c", now=idle, limits=[hourly]).send_at == NOW + 3600
        # Once the hour is over, the whole state may go.
        assert admit(state, "c", now=NOW + 3600 + STATE_TTL_SECONDS + 1, limits=[hourly]).state.limit_logs == {
            hourly.key: ()
        }

    def test_a_long_log_is_compacted_into_later_times_never_earlier(self):
        daily = ConfiguredLimit(1000, 86400.0, 1000)
        state = known_api([daily])
        sent = []
        for i in range(200):
            now = NOW + 1 + i * (1 + (i % 7))
            state = admit(state, f"t{i}", now=now, limits=[daily]).state
            state = observe(state, SILENT, now=now, ticket=f"t{i}")
            sent.append(now)
        (entries,) = state.limit_logs.values()
        assert len(entries) == MAX_LOG_ENTRIES
        assert sum(count for _, count in entries) == 201
        # Each answer is counted at its time or later: for any moment, the log counts at
        # least as many answers after it as there really were.
        for moment in sent:
            assert sum(count for at, count in entries if at >= moment) >= sum(1 for at in sent if at >= moment)

    def test_logs_are_stored_and_read_back_and_an_unreadable_one_is_damage(self):
        state = known_api([TEN_PER_SECOND, TWO_PER_SECOND])
        assert GateState.from_json(state.to_json(), now=NOW) == state
        stored = json.loads(state.to_json())
        stored["limit_logs"] = {"ten a second": [[NOW, 1]]}
        damaged = GateState.from_json(json.dumps(stored), now=NOW)
        assert "limit_logs: 'ten a second' is not a configured limit" in damaged.damaged
        assert not is_open(damaged, NOW)

    def test_a_log_is_dropped_once_its_window_is_over_and_no_request_is_out(self):
        state = known_api([TWO_PER_SECOND])
        assert state.limit_logs == {TWO_PER_SECOND.key: ((NOW, 1),)}
        assert admit(state, "a", now=NOW + 1.5).state.limit_logs == {}


class TestGateKeys:
    """An explicit gate key is shared on purpose by Connections that may have other base URLs."""

    def test_the_default_key_resets_a_state_written_for_another_api(self):
        state = known_api([TWO_PER_SECOND])
        uploads = "https://uploads.example.com:443"
        assert for_origin(state, uploads) == GateState(origin=uploads)

    def test_a_shared_key_keeps_the_quota_whatever_api_asks(self):
        state = known_api([TWO_PER_SECOND])
        shared = for_origin(state, "https://uploads.example.com:443", checks_origin=False)
        assert shared is state
        assert admit(shared, "a", now=NOW + 0.1, limits=[TWO_PER_SECOND]).send_at == NOW + 0.1
        assert admit(admit(shared, "a", now=NOW + 0.1, limits=[TWO_PER_SECOND]).state, "b", now=NOW + 0.1,
                     limits=[TWO_PER_SECOND]).send_at == NOW + 1

    def test_requests_alternating_between_two_apis_on_a_shared_key_do_not_flip_flop_the_state(self):
        state = GateState()
        for i, origin in enumerate(["https://a.example:443", "https://b.example:443"] * 3):
            state = for_origin(state, origin, checks_origin=False)
            state = observe(state, RateLimitInfo(remaining=10 - i, reset_after=60 - i), now=NOW + i)
        assert state.remaining == 5
        assert state.origin == "https://a.example:443"

    def test_a_fresh_shared_state_takes_the_first_origin_and_a_damaged_block_holds(self):
        assert for_origin(GateState(), ORIGIN, checks_origin=False).origin == ORIGIN
        damaged = for_origin(GateState.from_json("not json", now=NOW), ORIGIN, checks_origin=False)
        assert damaged.blocked_until == NOW + DAMAGED_STATE_BLOCK_SECONDS


# -- header-less APIs, simulated ----------------------------------------------------------------


class HeaderlessFixedWindow:
    """``limit`` requests per ``window`` s, windows starting at ``offset``; a bare 429 beyond."""

    def __init__(self, limit: int, window: float, offset: float) -> None:
        self.limit, self.window, self.offset = limit, window, offset
        self.counts: dict[int, int] = {}

    def accepts(self, t: float) -> bool:
        index = math.floor((t - self.offset) / self.window)
        if self.counts.get(index, 0) >= self.limit:
            return False
        self.counts[index] = self.counts.get(index, 0) + 1
        return True


class HeaderlessTokenBucket:
    def __init__(self, rate: float, burst: int, start: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, float(burst), start

    def accepts(self, t: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
        self.last = t
        if self.tokens >= 1 - EPS:
            self.tokens = max(self.tokens - 1, 0.0)
            return True
        return False


class HeaderlessSlidingLog:
    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window, self.accepted = limit, window, []

    def accepts(self, t: float) -> bool:
        if sum(1 for at in self.accepted if at > t - self.window) >= self.limit:
            return False
        self.accepted.append(t)
        return True


@dataclass
class DeclaredRun:
    arrivals: list[float] = field(default_factory=list)
    refused: int = 0
    answered: int = 0
    admits: int = 0
    last_answer: float = NOW
    unfinished: int = 0


def run_declared(
    server,
    limits,
    *,
    tasks: int,
    rng: random.Random,
    arrival_spread: float = 1.0,
    max_lateness: float = 0.3,
    max_latency: float = 0.1,
    min_wait: float = 0.0,
    in_process_up_to: float = 0.0,
    lost_answers: float = 0.0,
    max_steps: int = 50_000,
) -> DeclaredRun:
    """Tasks through the pure gate with ``limits`` against a header-less ``server``: each
    request reaches the server a random part of its latency after it is let out, and its
    answer (or, with probability ``lost_answers``, a timeout: ``release_probe``) is observed
    at the end of it. A task told to wait comes back late by up to ``max_lateness``."""
    state = GateState(origin=ORIGIN)
    run = DeclaredRun()
    events: list[tuple[float, int, str, str, bool]] = []
    sequence = 0

    def push(at: float, kind: str, task: str, accepted: bool = False) -> None:
        nonlocal sequence
        heapq.heappush(events, (at, sequence, kind, task, accepted))
        sequence += 1

    for index in range(tasks):
        push(NOW + rng.uniform(0, arrival_spread), "ask", f"t{index}")
    steps = 0
    while events and steps < max_steps:
        steps += 1
        now, _, kind, task, accepted = heapq.heappop(events)
        if kind == "ask":
            run.admits += 1
            admission = admit(state, task, now=now, limits=limits, min_wait=min_wait, in_process_up_to=in_process_up_to)
            state = admission.state
            if admission.send_at > now:
                back = admission.send_at
                if back - now > in_process_up_to:
                    back = max(back, now + min_wait) + rng.uniform(0, max_lateness)
                push(back, "ask", task)
                continue
            reaches = now + rng.uniform(0, max_latency)
            push(reaches, "arrive", task)
            push(reaches + rng.uniform(0, max_latency), "answer", task)
        elif kind == "arrive":
            run.arrivals.append(now)
            ok = server.accepts(now)
            run.refused += not ok
            events[:] = [(at, seq, k, t, ok if (k, t) == ("answer", task) else a) for at, seq, k, t, a in events]
            heapq.heapify(events)
        elif rng.random() < lost_answers:
            state = release_probe(state, task, now=now)
            push(now + 1.0, "ask", task)  # timed out: the task tries again
        else:
            state = observe(state, SILENT, now=now, ticket=task)
            if accepted:
                run.answered += 1
                run.last_answer = max(run.last_answer, now)
            else:
                push(now + 1.0, "ask", task)  # a bare 429: the task backs off and asks again
    run.unfinished = tasks - run.answered
    return run


def most_in_a_window(times: list[float], seconds: float) -> int:
    """The largest number of ``times`` in any window ``(t - seconds, t]``."""
    ordered = sorted(times)
    return max((sum(1 for s in ordered if end - seconds + 1e-6 < s <= end) for end in ordered), default=0)


class TestHeaderlessApis:
    @pytest.mark.parametrize("offset", [0.0, 0.25, 0.5, 0.999])
    @pytest.mark.parametrize("seed", [1, 2])
    def test_ten_per_second_declared_sends_no_request_a_fixed_window_refuses_however_its_windows_fall(
        self, offset, seed
    ):
        run = run_declared(HeaderlessFixedWindow(10, 1.0, NOW + offset), [TEN_PER_SECOND], tasks=60,
                           rng=random.Random(seed))
        assert run.unfinished == 0
        assert run.refused == 0, f"{run.refused} x 429 out of {len(run.arrivals)}"
        # And it keeps up: 60 requests at 10 a second, each window waiting for an answer.
        assert run.last_answer - NOW <= 60 / 10 * 1.3 + 1

    @pytest.mark.parametrize("burst", [1, 3, 10])
    def test_a_token_bucket_of_the_declared_rate_and_burst_refuses_nothing(self, burst):
        limit = ConfiguredLimit(10, 1.0, burst)
        run = run_declared(HeaderlessTokenBucket(10.0, burst, NOW), [limit], tasks=50, rng=random.Random(burst))
        assert (run.unfinished, run.refused) == (0, 0)

    def test_a_sliding_log_server_refuses_nothing_even_with_slow_and_lost_answers(self):
        run = run_declared(HeaderlessSlidingLog(5, 2.0), [ConfiguredLimit(5, 2.0, 5)], tasks=40,
                           rng=random.Random(3), max_latency=0.8, lost_answers=0.2, max_lateness=2.0)
        assert (run.unfinished, run.refused) == (0, 0)

    def test_tasks_that_can_only_come_back_after_a_minimum_delay_still_send_nothing_early(self):
        run = run_declared(HeaderlessFixedWindow(10, 1.0, NOW + 0.5), [TEN_PER_SECOND], tasks=60,
                           rng=random.Random(4), min_wait=2.0)
        assert (run.unfinished, run.refused) == (0, 0)

    def test_without_the_declared_limit_the_same_load_is_refused(self):
        # The control: the same tasks, the gate told nothing (the API sends no headers).
        run = run_declared(HeaderlessFixedWindow(10, 1.0, NOW + 0.5), [], tasks=60, rng=random.Random(1))
        assert run.refused >= 20


_DECLARED = st.integers(1, 5).flatmap(
    lambda requests: st.builds(
        ConfiguredLimit, st.just(requests), st.sampled_from([0.5, 1.0, 2.0, 5.0]), st.integers(1, requests)
    )
)


@PROPERTY_SETTINGS
@given(
    limits=st.lists(_DECLARED, min_size=1, max_size=2),
    tasks=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    max_lateness=st.sampled_from([0.0, 0.5, 2.0]),
    max_latency=st.sampled_from([0.0, 0.05, 0.5]),
    min_wait=st.sampled_from([0.0, 1.0, 2.0]),
    in_process_up_to=st.sampled_from([0.0, 1.0, 60.0]),
    lost_answers=st.sampled_from([0.0, 0.3]),
)
def test_requests_under_declared_limits_never_exceed_them_in_any_window_at_the_server(
    limits, tasks, seed, max_lateness, max_latency, min_wait, in_process_up_to, lost_answers
):
    # Wherever in its latency each request reaches the server, however late tasks come back,
    # whatever their minimum wait: in every window of every limit, at most what it declares.
    rng = random.Random(seed)
    run = run_declared(
        HeaderlessSlidingLog(10**6, 1.0), limits, tasks=tasks, rng=rng, arrival_spread=3.0,
        max_lateness=max_lateness, max_latency=max_latency, min_wait=min_wait,
        in_process_up_to=in_process_up_to, lost_answers=lost_answers,
    )
    assert run.unfinished == 0, "every task got through"
    for limit in limits:
        for at_most, seconds in limit.windows:
            assert most_in_a_window(run.arrivals, seconds) <= at_most, (limit, seconds, sorted(run.arrivals))


# -- the fixed-window shape of make bench, simulated (issue 12) ----------------------------------
#
# bench/rate_limited_server.py's fixed window: 20 requests per 20 s for everyone, windows from
# the first request's whole second, GitHub's X-RateLimit-Reset (epoch seconds). The header reader
# measures that reset against the response's Date (whole seconds), so each answer reports the
# window's end up to a second late. 60 tasks start 4 at a time (worker slots, ~1.15 s a launch),
# defer (a deferral's minimum delay: 1 s), wait in the triggerer (an exact sleep, then a
# wake-up latency), and reach the gate through a
# store that serialises its updates: an update that writes costs `write_seconds`, one that
# changes nothing `read_seconds` (the stores skip the write). A task's `now` is taken before it
# queues for the store, as gate_access does.


class BenchFixedWindow:
    def __init__(self, limit: int = 20, window: int = 20) -> None:
        self.limit, self.window = limit, window
        self.anchor: int | None = None
        self.index, self.used = -1, 0

    def handle(self, t: float) -> tuple[bool, RateLimitInfo, float]:
        """(accepted, what the reader makes of the answer at ``t``, the window's end)."""
        if self.anchor is None:
            self.anchor = math.floor(t)
        index = max(0, math.floor((t - self.anchor) / self.window))
        if index != self.index:
            self.index, self.used = index, 0
        end = self.anchor + (index + 1) * self.window
        accepted = self.used < self.limit
        self.used += accepted
        # Measured against Date: the reset is whole seconds after the answer's second.
        info = RateLimitInfo(limit=self.limit, remaining=self.limit - self.used, reset_after=end - math.floor(t),
                             source="X-RateLimit-Reset")
        if not accepted:
            info = replace(info, retry_after=max(1, math.ceil(end - t)))
        return accepted, info, float(end)


@dataclass
class BenchRun:
    makespan: float
    ideal: float
    refused: int
    early: int
    admits: int
    writes: int

    @property
    def over_ideal(self) -> float:
        return self.makespan - self.ideal


def run_bench_window(
    seed: int,
    *,
    tasks: int = 60,
    write_seconds: float = 0.0,
    read_seconds: float = 0.0,
    wake_latency: float = 0.1,
    round_trip: float = 0.01,
    slots: int = 4,
    launch_seconds: float = 1.15,
    reports_answers: bool = True,
    cheap_looks: bool = True,
    min_defer_seconds: float = 1.0,
) -> BenchRun:
    rng = random.Random(seed)
    start = NOW + rng.random()  # the first request's offset in its second shapes the first window
    server, state = BenchFixedWindow(), GateState(origin=ORIGIN)
    store_free = 0.0
    events: list[tuple[float, int, str, str, tuple]] = []
    sequence = 0

    def push(at: float, kind: str, task: str, payload: tuple = ()) -> None:
        nonlocal sequence
        heapq.heappush(events, (at, sequence, kind, task, payload))
        sequence += 1

    for index in range(tasks):
        push(start + (index // slots) * launch_seconds + rng.uniform(0, 0.3), "ask", f"dag|run|fetch|{index}")
    first = last = None
    refused = early = admits = writes = 0
    deferred: set[str] = set()
    announced = 0.0
    while events:
        at, _, kind, task, payload = heapq.heappop(events)
        if kind == "send":
            first = at if first is None else first
            if at < announced - EPS:
                early += 1
            accepted, info, end = server.handle(at)
            if info.remaining == 0:
                announced = max(announced, end)
            if accepted:
                last = at
            else:
                refused += 1
                push(at + info.retry_after + rng.uniform(0, wake_latency), "ask", task)
            push(at + round_trip, "tell", task, (info, None if accepted else at + info.retry_after))
            continue
        # ask or tell: through the store, decided with the time the task asked at
        began = max(at, store_free)
        before = state.to_json()
        if kind == "ask":
            admits += 1
            # The first ask is on a worker, which defers what it can't wait in process; the
            # others are in the triggerer, which sleeps to any moment.
            in_worker = task not in deferred
            deferred.add(task)
            admission = admit(
                state, task, now=at, reports_answers=reports_answers,
                in_process_up_to=0.0 if in_worker else math.inf,
                min_wait=min_defer_seconds if in_worker else 0.0,
                cheap_looks=cheap_looks or not in_worker,
            )
            state = admission.state
        else:
            info, until = payload
            state = observe(state, info, now=at, rate_limited_until=until, ticket=task)
        changed = state.to_json() != before
        writes += changed
        store_free = began + (write_seconds if changed else read_seconds)
        if kind == "ask":
            if admission.send_at <= at:
                push(store_free, "send", task)
            else:
                push(max(admission.send_at, store_free) + rng.uniform(0, wake_latency), "ask", task)
    windows = math.ceil(tasks / server.limit)
    ideal = (windows - 1) * server.window - (first - math.floor(first))
    return BenchRun(last - first, ideal, refused, early, admits, writes)


class TestFixedWindowPacing:
    """Use each window's quota as soon as it opens (issue 12): no time lost at the gate."""

    WINDOW_OF_20 = RateLimitInfo(limit=20, remaining=0, reset_after=20, source="X-RateLimit-Reset")

    def spent_window(self, *, first_seen_offset: float = 0.0) -> GateState:
        """A window of 20 reported first at NOW + offset, spent, ending at NOW + 20."""
        state = observe(GateState(), replace(self.WINDOW_OF_20, remaining=19, reset_after=20 - first_seen_offset),
                        now=NOW + first_seen_offset)
        return observe(state, replace(self.WINDOW_OF_20, reset_after=20 - first_seen_offset - 0.5),
                       now=NOW + first_seen_offset + 0.5)

    def test_a_task_for_the_window_after_next_that_can_wait_where_it_is_looks_a_quarter_window_before(self):
        state = self.spent_window(first_seen_offset=0.3)  # length known from below: 19.7 s
        _, state = admit_all(state, [f"next{i}" for i in range(20)], now=NOW + 1)
        look = admit(state, "later", now=NOW + 1, in_process_up_to=math.inf)
        assert look.send_at == pytest.approx(NOW + 20 + 19.7 - 19.7 / 4)
        assert "later" not in look.state.tickets

    def test_looking_early_it_holds_the_exact_reset_the_next_window_reported(self):
        state = self.spent_window()
        _, state = admit_all(state, [f"next{i}" for i in range(20)], now=NOW + 1)
        state = admit(state, "later", now=NOW + 1, in_process_up_to=math.inf).state
        # The next window opens; its holders send and its answers report its end, NOW + 40.3
        # (read against a whole-second Date, a fraction late).
        for i in range(20):
            state = admit(state, f"next{i}", now=NOW + 20.1).state
            state = observe(state, RateLimitInfo(limit=20, remaining=19 - i, reset_after=20.2), now=NOW + 20.1,
                            ticket=f"next{i}")
        held = admit(state, "later", now=NOW + 35, in_process_up_to=math.inf)
        assert held.send_at == pytest.approx(NOW + 40.3)
        assert held.state.tickets["later"] == held.send_at

    def test_a_task_deferred_from_a_worker_looks_early_too_when_told_looks_are_cheap(self):
        state = self.spent_window(first_seen_offset=0.3)
        _, state = admit_all(state, [f"next{i}" for i in range(20)], now=NOW + 1)
        hints = {"in_process_up_to": 5.0, "min_wait": 1.0}
        assert admit(state, "later", now=NOW + 1, cheap_looks=True, **hints).send_at == pytest.approx(
            NOW + 20 + 19.7 * 3 / 4
        )
        assert admit(state, "later", now=NOW + 1, **hints).send_at == NOW + 40  # a reschedule: at the opening

    def test_a_task_that_cannot_wait_where_it_is_looks_when_its_window_opens_not_a_second_after(self):
        # The length from the first answer (at NOW + 0.3) to the reset is 19.7 s: windows last
        # whole seconds, so 20. The old rule (19.7 + 1 s) came back 0.7 s after the opening.
        state = self.spent_window(first_seen_offset=0.3)
        _, state = admit_all(state, [f"next{i}" for i in range(20)], now=NOW + 1)
        assert admit(state, "later", now=NOW + 1).send_at == NOW + 40

    def test_a_holder_whose_block_moved_a_fraction_later_keeps_its_place(self):
        # Twenty tasks hold the reset an answer reported (NOW + 20.2); the answer that spends
        # the quota reports the same window's end read against another Date (NOW + 20.7).
        state = observe(GateState(), RateLimitInfo(limit=20, remaining=1, reset_after=20.2), now=NOW)
        times, state = admit_all(state, ["last-of-window"] + [f"next{i}" for i in range(20)], now=NOW)
        assert times[1:] == [NOW + 20.2] * 20
        state = observe(state, RateLimitInfo(limit=20, remaining=0, reset_after=20.7), now=NOW, ticket="last-of-window")
        assert state.blocked_until == NOW + 20.7
        back = admit(state, "next0", now=NOW + 20.2)
        # It waits the half second, holding its place: it used to queue again behind every task
        # of the window after next, and lose two windows.
        assert back.send_at == NOW + 20.7
        assert back.state.tickets["next0"] == NOW + 20.7
        assert admit(back.state, "next0", now=NOW + 20.7).send_at == NOW + 20.7

    def test_a_holder_whose_answer_will_be_reported_is_let_through_without_changing_the_state(self):
        _, state = admit_all(self.spent_window(), ["a", "b"], now=NOW + 1)
        # The first back after the reset changes the state: the window is over.
        first = admit(state, "a", now=NOW + 20, reports_answers=True)
        assert (first.send_at, first.reason) == (NOW + 20, None)
        # The next holder changes nothing at all: a store has nothing to write.
        second = admit(first.state, "b", now=NOW + 20.05, reports_answers=True)
        assert (second.send_at, second.reason) == (NOW + 20.05, None)
        assert second.state.to_json() == first.state.to_json()
        assert second.state.tickets == {"a": NOW + 20, "b": NOW + 20}
        # A caller that does not report answers releases its ticket as before.
        assert "b" not in admit(first.state, "b", now=NOW + 20.05).state.tickets

    def test_its_ticket_stands_for_the_request_until_its_answer_or_its_failure_is_reported(self):
        state = admit(self.spent_window(), "a", now=NOW + 1).state
        state = admit(admit(state, "b", now=NOW + 1).state, "a", now=NOW + 20, reports_answers=True).state
        state = admit(state, "b", now=NOW + 20, reports_answers=True).state
        assert set(state.tickets) == {"a", "b"}
        # a's answer (19 left) comes first; b is out too: 18 left for anyone else.
        answered = observe(state, RateLimitInfo(limit=20, remaining=19, reset_after=20), now=NOW + 20.1, ticket="a")
        assert set(answered.tickets) == {"b"}
        assert answered.remaining == 18
        assert release_probe(answered, "b", now=NOW + 25).tickets == {}

    def test_a_ticket_left_by_a_task_that_died_after_sending_stops_counting_after_the_in_flight_time(self):
        state = admit(self.spent_window(), "dead", now=NOW + 1).state
        state = admit(state, "dead", now=NOW + 20, reports_answers=True).state
        soon = observe(state, RateLimitInfo(limit=20, remaining=10, reset_after=19), now=NOW + 21)
        assert soon.remaining == 9
        gone = NOW + 20 + IN_FLIGHT_TTL_SECONDS + 1
        late = observe(state, RateLimitInfo(limit=20, remaining=10, reset_after=19), now=gone)
        assert late.remaining == 10

    def test_with_configured_limits_a_holder_is_counted_out_even_when_it_reports_answers(self):
        state = admit(known_api([TWO_PER_SECOND]), "a", now=NOW + 0.1, limits=[TWO_PER_SECOND]).state
        state = admit(state, "b", now=NOW + 0.1, limits=[TWO_PER_SECOND]).state  # promised NOW + 1
        back = admit(state, "b", now=NOW + 1, limits=[TWO_PER_SECOND], reports_answers=True)
        assert back.send_at == NOW + 1
        assert "b" in back.state.in_flight and "b" not in back.state.tickets


class TestBenchFixedWindow:
    SEEDS = range(12)

    def test_with_an_instant_store_the_run_ends_within_a_second_of_the_ideal(self):
        runs = [run_bench_window(seed) for seed in self.SEEDS]
        assert all(run.refused == 0 and run.early == 0 for run in runs), runs
        # What is left: the wake-up latency, and the last window's opening read up to a second
        # late (its reset measured against a whole-second Date). The gate before issue 12 was
        # 1.9 s over on average here, up to 2.8 s.
        over = [round(run.over_ideal, 2) for run in runs]
        assert max(over) <= 1.2 and sum(over) / len(over) <= 0.8, over

    @pytest.mark.parametrize("write_seconds", [0.05, 0.1, 0.15])
    def test_with_a_slow_store_no_window_is_lost_and_nothing_goes_early(self, write_seconds):
        runs = [run_bench_window(seed, write_seconds=write_seconds, read_seconds=write_seconds / 3)
                for seed in self.SEEDS]
        assert all(run.refused == 0 and run.early == 0 for run in runs), runs
        # Before: 4 s over at 100 ms a write, and at 150 ms holders pushed by a reset read a
        # fraction later queued again behind two windows (15 s over on average, up to 24 s).
        over = [round(run.over_ideal, 2) for run in runs]
        assert max(over) <= 1.2 + 8 * write_seconds, over

    def test_holders_that_send_without_a_write_shorten_the_queue_at_the_store_when_a_window_opens(self):
        def mean_over(reports_answers: bool) -> float:
            runs = [run_bench_window(seed, write_seconds=0.1, read_seconds=0.03, reports_answers=reports_answers)
                    for seed in self.SEEDS]
            assert all(run.refused == 0 and run.early == 0 for run in runs), runs
            return sum(run.over_ideal for run in runs) / len(runs)

        # 20 holders at a window's opening each read the store instead of writing it.
        assert mean_over(True) < mean_over(False) - 0.5

    def test_tasks_deferred_from_a_worker_that_look_early_send_as_the_last_window_opens(self):
        def mean_over(cheap_looks: bool) -> float:
            runs = [run_bench_window(seed, cheap_looks=cheap_looks) for seed in self.SEEDS]
            assert all(run.refused == 0 and run.early == 0 for run in runs), runs
            return sum(run.over_ideal for run in runs) / len(runs)

        # Told that looking again costs them nothing, they hold the exact reset before the
        # window opens; otherwise they come when it can have opened, a whole second late when
        # the reset was read a fraction late.
        assert mean_over(True) < mean_over(False) - 0.3


# -- the multi-process workload, simulated -------------------------------------------------------
#
# tests/distributed/test_gate_processes.py runs 8 OS processes through one Redis gate against
# gate_api.WindowedApi. The same API (its decision, with the clock injected) and the same steps
# as gate_workload.run_requests, with random delays on the way to the server and back: requests
# overtake each other, answers come back out of the order the server counted them, and blocks
# say only when. The API judges every request against what it had announced when it arrived.


@dataclass
class WorkloadRun:
    score: dict
    makespan: float
    done: int
    #: Answers observed after an answer to a request the server had counted later.
    overtaken: int


def run_workload(seed: int, *, processes: int = 8, requests: int = 5, way: float = 0.03, wake: float = 0.02,
                 reports_answers: bool = False) -> WorkloadRun:
    from email.utils import formatdate

    from tests.distributed.gate_api import WindowedApi

    rng = random.Random(seed)
    clock = [NOW]
    api = WindowedApi(limit=4, window_s=2, block_every=2, block_extra_s=1, block_margin_s=0.5, clock=lambda: clock[0])
    state = GateState(origin=ORIGIN)
    events: list[tuple[float, int, str, str, tuple]] = []
    sequence = 0

    def push(at: float, kind: str, name: str, payload: tuple = ()) -> None:
        nonlocal sequence
        heapq.heappush(events, (at, sequence, kind, name, payload))
        sequence += 1

    done = {f"p{index}": 0 for index in range(processes)}
    for name in done:
        push(NOW + rng.uniform(0, 0.05), "ask", name)
    counted = latest_counted = overtaken = 0
    at = NOW
    for _ in range(20_000):
        if not events:
            break
        at, _, kind, name, payload = heapq.heappop(events)
        ticket = f"{name}|{done[name]}"
        if kind == "ask":
            admission = admit(state, ticket, now=at, in_process_up_to=3600.0, reports_answers=reports_answers)
            state = admission.state
            if admission.send_at > at:
                push(admission.send_at + rng.uniform(0, wake), "ask", name)
            else:
                push(at + rng.uniform(0, way), "arrive", name)
        elif kind == "arrive":
            clock[0] = at
            status, headers = api.handle(name)
            counted += 1
            headers = {**headers, "Date": formatdate(at, usegmt=True)}
            push(at + rng.uniform(0, way), "answer", name, (status, headers, counted))
        else:
            status, headers, position = payload
            overtaken += position < latest_counted
            latest_counted = max(latest_counted, position)
            info = read_rate_limit_headers(status, headers, now=datetime.fromtimestamp(at, timezone.utc))
            until = at + info.wait_seconds() if status == 429 else None
            state = observe(state, info, now=at, rate_limited_until=until, ticket=ticket)
            done[name] += status == 200
            if done[name] < requests:
                push(at, "ask", name)
    return WorkloadRun(api.score(), at - NOW, sum(done.values()), overtaken)


class TestTheMultiProcessWorkloadSimulated:
    SEEDS = range(30)

    @pytest.mark.parametrize("reports_answers", [False, True])
    def test_requests_overtaking_each_other_and_blocks_that_say_only_when_send_nothing_early(self, reports_answers):
        runs = [run_workload(seed, reports_answers=reports_answers) for seed in self.SEEDS]
        # The faults happened: answers came back out of the server's order, and blocks came.
        assert sum(run.overtaken for run in runs) >= len(runs), [run.overtaken for run in runs]
        assert all(run.score["blocks"] >= 1 for run in runs), [run.score for run in runs]
        assert all(run.done == 8 * 5 for run in runs), [run.done for run in runs]
        # The gate before this was 100 early requests over 40 seeds (20 when answers are reported).
        assert [run.score["early"] for run in runs] == [0] * len(runs), [run.score for run in runs]
