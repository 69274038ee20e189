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
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from network_requests.gate import (
    MAX_TICKETS,
    RECHECK_SECONDS,
    STATE_TTL_SECONDS,
    TICKET_TTL_SECONDS,
    GateState,
    Quota,
    admit,
    for_origin,
    is_open,
    observe,
    read_quota,
)

#: A fixed clock (epoch seconds), a multiple of 10 so fixed windows start on it.
NOW = 1_700_000_000.0
ORIGIN = "https://api.example.com:443"

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


# -- read_quota ------------------------------------------------------------------------------


class TestReadQuota:
    def test_ratelimit_headers_give_limit_remaining_and_a_delta_reset(self):
        quota = read_quota({"RateLimit-Limit": "100", "RateLimit-Remaining": "7", "RateLimit-Reset": "30"}, NOW)
        assert quota == Quota(limit=100, remaining=7, reset_at=NOW + 30, interval=None)

    def test_header_names_are_case_insensitive_and_lists_use_their_first_value(self):
        quota = read_quota({"ratelimit-remaining": "3, 50", "RATELIMIT-RESET": " 10 "}, NOW)
        assert (quota.remaining, quota.reset_at) == (3, NOW + 10)

    def test_x_ratelimit_reset_above_the_epoch_threshold_is_an_epoch_time(self):
        quota = read_quota(
            {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 42)}, NOW
        )
        assert quota == Quota(limit=60, remaining=0, reset_at=NOW + 42, interval=None)

    def test_a_small_x_ratelimit_reset_is_a_delta(self):
        assert read_quota({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"}, NOW).reset_at == NOW + 30

    def test_a_fractional_epoch_x_ratelimit_reset_is_kept(self):
        assert read_quota({"X-RateLimit-Reset": f"{int(NOW) + 5}.25"}, NOW).reset_at == NOW + 5.25

    def test_ratelimit_headers_win_over_x_ratelimit_headers(self):
        quota = read_quota({"RateLimit-Remaining": "4", "X-RateLimit-Remaining": "9"}, NOW)
        assert quota.remaining == 4

    @pytest.mark.parametrize("policy", ["5;w=5", '"default";q=5;w=5', ' "burst" ; q=5 ; w=5 ', "5;W=5"])
    def test_ratelimit_policy_gives_seconds_per_request(self, policy):
        assert read_quota({"RateLimit-Policy": policy}, NOW).interval == 1.0

    def test_with_several_policies_the_slowest_one_wins(self):
        policy = '"burst";q=10;w=1, "hourly";q=3600;w=3600, "daily";q=100;w=86400'
        assert read_quota({"RateLimit-Policy": policy}, NOW).interval == pytest.approx(864.0)

    def test_a_policy_alone_gives_only_the_interval(self):
        assert read_quota({"RateLimit-Policy": "10;w=20"}, NOW) == Quota(interval=2.0)

    def test_no_rate_limit_headers_say_nothing(self):
        assert read_quota({"Content-Type": "application/json"}, NOW) == Quota()

    @pytest.mark.parametrize(
        "headers",
        [
            {"RateLimit-Remaining": "abc", "RateLimit-Reset": "soon", "RateLimit-Limit": "-1"},
            {"RateLimit-Remaining": "1.5", "RateLimit-Reset": "-30", "RateLimit-Limit": "1e3"},
            {"RateLimit-Remaining": "", "RateLimit-Reset": "", "RateLimit-Limit": "٣"},  # Arabic-Indic 3
            {"X-RateLimit-Remaining": "none", "X-RateLimit-Reset": "Tue, 01 May 2024 12:00:00 GMT"},
            {"X-RateLimit-Remaining": "-1", "X-RateLimit-Reset": "1e9"},
            {"X-RateLimit-Remaining": "²", "X-RateLimit-Reset": "-5"},
        ],
    )
    def test_malformed_quota_values_are_ignored(self, headers):
        quota = read_quota(headers, NOW)
        assert (quota.limit, quota.remaining, quota.reset_at) == (None, None, None)

    @pytest.mark.parametrize(
        "policy", ["", "garbage", "0;w=5", "5;w=0", "5;w=abc", "5;w=-5", "q=5", "w=5", "5;w=1.5", "5;w=²", ";;;,,,"]
    )
    def test_malformed_or_incomplete_policies_are_ignored(self, policy):
        assert read_quota({"RateLimit-Policy": policy}, NOW).interval is None

    def test_a_malformed_policy_next_to_a_good_one_leaves_the_good_one(self):
        assert read_quota({"RateLimit-Policy": "5;w=abc, 2;w=10"}, NOW).interval == 5.0
    @pytest.mark.parametrize(
        "policy",
        ["1;w=1" + "0" * 400, "1;w=" + "9" * 5000, "9" * 5000 + ";w=5"],
        ids=["float-overflow", "int-digits-limit-window", "int-digits-limit-quota"],
    )
    def test_absurdly_large_policy_numbers_do_not_raise(self, policy):
        # Any server can send these; observe() runs after every response, so a raise here
        # fails the task after a successful request. Wanted: ignored (or clamped).
        quota = read_quota({"RateLimit-Policy": policy}, NOW)
        assert quota.interval is None or math.isfinite(quota.interval)


# -- observe ---------------------------------------------------------------------------------


class TestObserve:
    def test_a_429s_rate_limited_until_blocks_the_gate(self):
        state = observe(GateState(), {}, now=NOW, rate_limited_until=NOW + 30)
        assert state.blocked_until == NOW + 30
        assert not is_open(state, NOW + 29.9)
        assert is_open(state, NOW + 30)

    @pytest.mark.parametrize("first, second", [(30, 90), (90, 30)])
    def test_blocked_until_never_moves_earlier_whatever_the_order_of_two_observations(self, first, second):
        state = observe(GateState(), {}, now=NOW, rate_limited_until=NOW + first)
        state = observe(state, {}, now=NOW + 1, rate_limited_until=NOW + second)
        assert state.blocked_until == NOW + 90

    def test_a_response_without_a_wait_does_not_open_a_blocked_gate(self):
        state = observe(GateState(), {}, now=NOW, rate_limited_until=NOW + 60)
        state = observe(state, {"RateLimit-Remaining": "50", "RateLimit-Reset": "1"}, now=NOW + 1)
        assert state.blocked_until == NOW + 60

    def test_an_absurd_rate_limited_until_is_clamped(self):
        state = observe(GateState(), {}, now=NOW, rate_limited_until=1e300)
        assert NOW < state.blocked_until < 1e12
        assert GateState.from_json(state.to_json()) == state

    def test_remaining_zero_with_a_reset_closes_the_gate_before_any_429(self):
        # Stop before the 429: a 200 saying the quota is spent is enough.
        state = observe(GateState(), {"RateLimit-Remaining": "0", "RateLimit-Reset": "20"}, now=NOW)
        assert state.blocked_until == NOW + 20
        assert admit(state, "next", now=NOW + 1).send_at == NOW + 20

    def test_remaining_zero_with_an_epoch_x_ratelimit_reset_closes_the_gate(self):
        headers = {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 300)}
        assert observe(GateState(), headers, now=NOW).blocked_until == NOW + 300

    def test_remaining_zero_with_a_reset_in_the_past_does_not_block(self):
        headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) - 5)}
        assert observe(GateState(), headers, now=NOW).blocked_until == 0.0

    def test_remaining_above_zero_does_not_block(self):
        state = observe(GateState(), {"RateLimit-Remaining": "1", "RateLimit-Reset": "20"}, now=NOW)
        assert state.blocked_until == 0.0
        assert state.remaining == 1

    def test_the_servers_remaining_is_reduced_by_send_times_already_promised_for_that_window(self):
        promised = GateState(tickets={"a": NOW + 5, "b": NOW + 6, "after-the-window": NOW + 100})
        state = observe(promised, {"RateLimit-Remaining": "5", "RateLimit-Reset": "60"}, now=NOW)
        assert state.remaining == 3  # a and b will spend two of the five

    def test_promised_times_count_against_remaining_when_no_reset_is_known(self):
        promised = GateState(tickets={"a": NOW + 5, "b": NOW + 500})
        assert observe(promised, {"RateLimit-Remaining": "5"}, now=NOW).remaining == 3

    def test_within_one_window_remaining_only_shrinks(self):
        state = GateState(remaining=2, reset_at=NOW + 60, updated_at=NOW - 1)
        # A late response counted before two of our requests: the larger number is stale.
        late = observe(state, {"RateLimit-Remaining": "7", "RateLimit-Reset": "60"}, now=NOW)
        assert late.remaining == 2
        fewer = observe(state, {"RateLimit-Remaining": "1", "RateLimit-Reset": "60"}, now=NOW)
        assert fewer.remaining == 1

    def test_a_new_window_takes_the_servers_remaining(self):
        state = GateState(remaining=2, reset_at=NOW + 60, updated_at=NOW - 1)
        fresh = observe(state, {"RateLimit-Remaining": "7", "RateLimit-Reset": "120"}, now=NOW)
        assert (fresh.remaining, fresh.reset_at) == (7, NOW + 120)

    def test_observe_remembers_limit_and_policy_and_keeps_them_when_a_response_omits_them(self):
        headers = {
            "RateLimit-Limit": "10",
            "RateLimit-Remaining": "9",
            "RateLimit-Reset": "60",
            "RateLimit-Policy": "10;w=20",
        }
        state = observe(GateState(), headers, now=NOW)
        state = observe(state, {"Content-Type": "text/plain"}, now=NOW + 1)
        assert (state.limit, state.remaining, state.interval, state.updated_at) == (10, 9, 2.0, NOW + 1)
    def test_a_quota_without_a_reset_time_is_not_forgotten_a_second_later(self):
        # "Untouched for STATE_TTL_SECONDS after its last time": GateState.horizon ignores
        # updated_at, so a state holding no time at all (a remaining count without a reset)
        # is already expired at the next call.
        state = observe(GateState(), {"RateLimit-Limit": "10", "RateLimit-Remaining": "2"}, now=NOW)
        assert state.remaining == 2
        _, state = admit_all(state, ["a", "b"], now=NOW + 1)
        assert state.remaining == 0

    def test_observe_does_not_touch_tickets(self):
        state = GateState(tickets={"a": NOW + 5})
        assert observe(state, {"RateLimit-Remaining": "3"}, now=NOW).tickets == {"a": NOW + 5}
    def test_a_remaining_count_spent_only_by_promised_times_does_not_reblock_their_holders(self):
        # Window mode: three tasks hold the reset time R of a window of 3. The first to come
        # back sends; the server says 2 left, exactly the two still promised.
        r = NOW + 10
        state = GateState(remaining=0, reset_at=r, limit=3, blocked_until=r, updated_at=NOW)
        times, state = admit_all(state, ["a", "b", "c"])
        assert times == [r, r, r]
        state = admit(state, "a", now=r + 0.1).state
        next_reset = str(int(r) + 10)
        state = observe(
            state,
            {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2", "X-RateLimit-Reset": next_reset},
            now=r + 0.1,
        )
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
        headers = {"RateLimit-Remaining": "0", "RateLimit-Reset": "10", "RateLimit-Policy": "5;w=10"}
        state = observe(GateState(), headers, now=NOW)
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
        headers = {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 60)}
        state = observe(GateState(), headers, now=NOW)
        times, state = admit_all(state, ["a", "b", "c", "d", "e"])
        assert times[:3] == [NOW + 60] * 3
        assert all(t > NOW + 60 for t in times[3:])
        # The rest hold no time: they ask again once the window after can have opened. The
        # window was first reported at NOW, ending at NOW + 60: it is at least 60 s long.
        assert set(state.tickets) == {"a", "b", "c"}
        assert state.window_seconds == 60
        assert times[3:] == [NOW + 60 + 60 + RECHECK_SECONDS] * 2
        assert state.next_window_taken == 5  # 3 times handed out, 2 sent to the window after

    def test_fixed_window_mode_spreads_the_overflow_over_the_windows_it_fits_in(self):
        # A window of 3, first reported at NOW and ending at NOW + 60 (so at least 60 s long):
        # 3 tasks hold the reset time, the next 3 look again once the window after can have
        # opened, the 3 after those a window later. No task comes back before its window.
        headers = {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 60)}
        state = observe(GateState(), headers, now=NOW)
        times, state = admit_all(state, list("abcdefghi"))
        assert times == [NOW + 60] * 3 + [NOW + 121] * 3 + [NOW + 181] * 3
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
        state = observe(
            GateState(), {"RateLimit-Remaining": "0", "RateLimit-Reset": "10", "RateLimit-Policy": "1;w=1"}, now=NOW
        )
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
        state = observe(state, {}, now=NOW + 5, rate_limited_until=NOW + 50)  # a 429 elsewhere
        admission = admit(state, "a", now=NOW + 10)
        assert admission.send_at == NOW + 50
        assert admission.state.tickets == {"a": NOW + 50}

    def test_a_ticket_holder_requeued_with_pacing_goes_to_the_first_free_slot_after_the_block(self):
        state = GateState(remaining=0, interval=1.0, blocked_until=NOW + 10, updated_at=NOW)
        _, state = admit_all(state, ["a", "b"])  # +10, +11
        state = observe(state, {}, now=NOW + 5, rate_limited_until=NOW + 10.5)
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
        )
        assert GateState.from_json(state.to_json()) == state
        assert json.loads(state.to_json())["origin"] == ORIGIN

    @pytest.mark.parametrize(
        "raw",
        [
            None,
            "",
            "not json",
            "[]",
            "null",
            "42",
            '{"tickets": [1, 2]}',
            '{"tickets": {"a": "soon"}}',
            '{"remaining": "many"}',
            '{"blocked_until": {}}',
        ],
    )
    def test_an_unreadable_stored_state_is_a_fresh_gate(self, raw):
        assert GateState.from_json(raw) == GateState()
    @pytest.mark.parametrize("raw", ['{"remaining": 1e999}', '{"next_window_taken": Infinity}'])
    def test_an_overflowing_stored_state_is_a_fresh_gate(self, raw):
        assert GateState.from_json(raw) == GateState()


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
    headers: dict[str, str]
    retry_after: float | None
    #: The time before which this response asked for no request (None: it asked nothing).
    announced: float | None


class TokenBucketServer:
    """R tokens a second, burst B; ``RateLimit-*`` headers, 429 + ``Retry-After`` when empty."""

    def __init__(self, rate: float = 1.0, burst: int = 5, start: float = NOW) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = float(burst), start
        self.policy = f"{burst};w={round(burst / rate)}"

    def handle(self, t: float) -> Response:
        self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
        self.last = t
        if self.tokens >= 1 - EPS:
            self.tokens = max(self.tokens - 1, 0.0)
            remaining = math.floor(self.tokens + EPS)
            # Seconds until the next whole token (delta-seconds, rounded up).
            reset = max(1, math.ceil((remaining + 1 - self.tokens) / self.rate - EPS))
            headers = self._headers(remaining, reset)
            return Response(200, headers, None, t + reset if remaining == 0 else None)
        retry_after = max(1, math.ceil((1 - self.tokens) / self.rate - EPS))
        headers = {**self._headers(0, retry_after), "Retry-After": str(retry_after)}
        return Response(429, headers, retry_after, t + retry_after)

    def _headers(self, remaining: int, reset: int) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.burst),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(reset),
            "RateLimit-Policy": self.policy,
        }


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
        headers = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Reset": str(int(end))}
        if self.count < self.limit:
            self.count += 1
            remaining = self.limit - self.count
            headers["X-RateLimit-Remaining"] = str(remaining)
            return Response(200, headers, None, float(end) if remaining == 0 else None)
        retry_after = max(1, math.ceil(end - t - EPS))
        headers.update({"X-RateLimit-Remaining": "0", "Retry-After": str(retry_after)})
        return Response(429, headers, retry_after, t + retry_after)


@dataclass
class SimResult:
    tasks: int
    successes: int = 0
    rate_limited: int = 0
    #: Requests sent before a time the server had announced (and the client had received).
    early: int = 0
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
    max_steps: int = 20_000,
) -> SimResult:
    """Run ``tasks`` tasks against ``server`` through the pure gate, from ``NOW``.

    With ``latency == 0`` a task sends and observes in one step (as one operator does); with
    ``latency > 0`` the response is observed that much later, so other tasks interleave.
    A task told to wait comes back no sooner than ``min_wait`` (a deferral's minimum delay),
    which the gate is told.
    """
    rng = random.Random(seed)
    state = GateState(origin=ORIGIN)
    result = SimResult(tasks=tasks)
    announced = 0.0  # the latest not-before the client side has been told
    events: list[tuple[float, int, str, Response | None]] = []
    sequence = 0

    def push(at: float, task: str, response: Response | None = None) -> None:
        nonlocal sequence
        heapq.heappush(events, (at, sequence, task, response))
        sequence += 1

    def deliver(at: float, task: str, response: Response) -> None:
        nonlocal state, announced
        until = None if response.retry_after is None else at + response.retry_after
        state = observe(state, response.headers, now=at, rate_limited_until=until, ticket=task)
        if response.announced is not None:
            announced = max(announced, response.announced)
        if response.status == 429:
            result.rate_limited += 1
            push(at + response.retry_after + rng.uniform(0, max_lateness), task)
        else:
            result.successes += 1
            result.makespan = max(result.makespan, at - NOW)

    for index in range(tasks):
        push(NOW + rng.uniform(0, arrival_spread), f"dag|run|fetch|{index}")
    while events and result.steps < max_steps:
        result.steps += 1
        now, _, task, response = heapq.heappop(events)
        if response is not None:
            deliver(now, task, response)
            continue
        result.admits[task] = result.admits.get(task, 0) + 1
        admission = admit(state, task, now=now, min_wait=min_wait)
        state = admission.state
        assert admission.send_at >= max(now, state.blocked_until)
        if admission.send_at > now:
            push(max(admission.send_at, now + min_wait) + rng.uniform(0, max_lateness), task)
            continue
        if now < announced - EPS:
            result.early += 1
        sent = server.handle(now)
        if latency:
            push(now + latency, task, sent)
        else:
            deliver(now, task, sent)
    result.unfinished = tasks - result.successes
    return result


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

_DIGITS = st.integers(min_value=0, max_value=10**12).map(str)
_EPOCH = st.floats(min_value=NOW - 1000, max_value=NOW + 10**6, allow_nan=False).map(lambda v: str(int(v)))
_POLICY = st.builds(
    lambda q, w, name: (f'"{name}";' if name else "") + f"q={q};w={w}",
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from(["", "default", "burst"]),
)
_VALUE = st.one_of(_DIGITS, _EPOCH, _POLICY, st.text(max_size=20), st.sampled_from(["0", "1", " 5 ", "-1", "1.5"]))
_NAME = st.sampled_from(
    [
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
        "RateLimit-Policy",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "ratelimit-remaining",
        "x-ratelimit-reset",
        "Retry-After",
    ]
)
_HEADERS = st.dictionaries(_NAME, _VALUE, max_size=6)
_STEP = st.one_of(
    st.floats(min_value=0, max_value=30, allow_nan=False),
    st.sampled_from([0.0, 1.0, STATE_TTL_SECONDS + 1, TICKET_TTL_SECONDS + 1]),
)
_OBSERVE = st.tuples(
    st.just("observe"),
    _STEP,
    _HEADERS,
    st.one_of(st.none(), st.floats(min_value=-60, max_value=10**7, allow_nan=False)),
)
_ADMIT = st.tuples(st.just("admit"), _STEP, st.sampled_from(["a", "b", "c", "d", "e", "f"]), st.none())


@PROPERTY_SETTINGS
@given(operations=st.lists(st.one_of(_OBSERVE, _ADMIT), max_size=40))
def test_any_sequence_of_observations_and_admissions_keeps_the_gates_invariants(operations):
    state = GateState(origin=ORIGIN)
    now = NOW
    for kind, step, payload, wait in operations:
        now += step
        before = state
        if kind == "observe":
            until = None if wait is None else now + wait
            state = observe(state, payload, now=now, rate_limited_until=until)
            if until is not None and until > now:
                assert state.blocked_until >= min(until, now + 10 * 365 * 24 * 3600) - 1e-6
        else:
            admission = admit(state, payload, now=now)
            state = admission.state
            assert admission.send_at >= now
            assert admission.send_at >= before.blocked_until or before.blocked_until <= now
            assert admission.send_at >= state.blocked_until or state.blocked_until <= now
            assert (admission.reason is None) == (admission.send_at == now)
            if admission.send_at > now and admission.reason != "quota spent; checking the shared gate again":
                assert state.tickets[payload] == admission.send_at
        # blocked_until only moves later, unless the whole state expired (long past it).
        expired = before.updated_at and now > before.horizon + STATE_TTL_SECONDS
        assert state.blocked_until >= before.blocked_until or expired
        # And however it changes, no task may send earlier than before.
        assert max(state.blocked_until, now) >= max(before.blocked_until, now)
        assert state.origin == ORIGIN
        assert all(math.isfinite(t) for t in (state.blocked_until, state.next_slot, *state.tickets.values()))
        assert state.remaining is None or state.remaining >= 0
        assert GateState.from_json(state.to_json()) == state


@PROPERTY_SETTINGS
@given(headers=st.dictionaries(st.one_of(_NAME, st.text(max_size=10)), st.one_of(_VALUE, st.text()), max_size=8))
def test_read_quota_never_raises_and_gives_only_sane_numbers(headers):
    quota = read_quota(headers, NOW)
    assert quota.remaining is None or quota.remaining >= 0
    assert quota.limit is None or quota.limit >= 0
    assert quota.reset_at is None or quota.reset_at >= NOW or "x-ratelimit-reset" in {k.lower() for k in headers}
    assert quota.interval is None or (quota.interval > 0 and math.isfinite(quota.interval))


@PROPERTY_SETTINGS
@given(
    raw=st.one_of(
        st.text(max_size=200),
        st.builds(
            json.dumps,
            st.dictionaries(
                st.sampled_from(list(GateState.__dataclass_fields__)) | st.text(max_size=10),
                st.integers()
                | st.floats(allow_infinity=False)
                | st.text(max_size=5)
                | st.none()
                | st.booleans()
                | st.lists(st.integers(), max_size=2)
                | st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3), max_size=2),
                max_size=6,
            ),
        ),
    )
)
def test_from_json_never_raises_on_finite_json(raw):
    assert isinstance(GateState.from_json(raw), GateState)


def test_on_first_contact_one_request_goes_ahead_and_the_others_wait_for_what_it_learns():
    first = admit(GateState(), "a", now=NOW)
    second = admit(first.state, "b", now=NOW)

    assert first.send_at == NOW
    assert second.send_at > NOW, "b must not send before a's answer is known"
    assert second.send_at <= NOW + RECHECK_SECONDS

    learned = observe(second.state, {"RateLimit-Remaining": "4", "RateLimit-Reset": "1"}, now=NOW + 0.1)
    assert admit(learned, "b", now=NOW + 0.2).send_at == NOW + 0.2


def test_a_probe_that_never_reports_stops_holding_the_others_after_its_timeout():
    from network_requests.gate import PROBE_TIMEOUT_SECONDS

    probing = admit(GateState(), "a", now=NOW).state

    assert admit(probing, "b", now=NOW + PROBE_TIMEOUT_SECONDS + 0.1).send_at == NOW + PROBE_TIMEOUT_SECONDS + 0.1


def test_an_api_without_rate_limit_headers_is_not_serialised_after_the_first_answer():
    known = observe(admit(GateState(), "a", now=NOW).state, {"Content-Type": "application/json"}, now=NOW + 0.1)

    times, _ = admit_all(known, ["b", "c", "d"], now=NOW + 0.2)

    assert times == [NOW + 0.2] * 3


def test_a_probe_that_got_no_answer_is_released_for_the_next_task():
    from network_requests.gate import release_probe

    probing = admit(GateState(), "a", now=NOW).state

    assert admit(release_probe(probing), "b", now=NOW + 0.1).send_at == NOW + 0.1


# A response's RateLimit-Remaining counts the requests the server had seen when it answered,
# not those the gate let out after this one: found by the benchmark, where a trigger let out
# right after another got the last token's 429 while the first one's answer was on its way.
PACED = {"RateLimit-Policy": "5;w=5", "RateLimit-Reset": "1"}


def test_requests_let_out_after_a_response_was_sent_still_count_against_its_remaining():
    known = observe(GateState(), {**PACED, "RateLimit-Remaining": "2"}, now=NOW)
    # Past the reset the server knows: what the next answer says is a new count.
    a = admit(known, "a", now=NOW + 1.5)
    b = admit(a.state, "b", now=NOW + 1.6)
    assert (a.send_at, b.send_at) == (NOW + 1.5, NOW + 1.6)

    # a's answer: one left, which b (already out) is about to take.
    answered = observe(b.state, {**PACED, "RateLimit-Remaining": "1"}, now=NOW + 1.7, ticket="a")

    assert answered.remaining == 0
    assert admit(answered, "c", now=NOW + 1.8).send_at > NOW + 1.8, "c would take b's token"


def test_a_response_counts_only_the_requests_let_out_after_its_own():
    known = observe(GateState(), {**PACED, "RateLimit-Remaining": "3"}, now=NOW)
    a = admit(known, "a", now=NOW + 1.5)
    b = admit(a.state, "b", now=NOW + 1.6)

    # b's answer came first; a went before b, so the server had counted it already.
    answered = observe(b.state, {**PACED, "RateLimit-Remaining": "1"}, now=NOW + 1.7, ticket="b")

    assert answered.remaining == 1
    assert set(answered.in_flight) == {"a"}


def test_a_request_without_an_answer_is_no_longer_out_and_one_never_reported_is_forgotten():
    from network_requests.gate import IN_FLIGHT_TTL_SECONDS, release_probe

    known = observe(GateState(), {**PACED, "RateLimit-Remaining": "3"}, now=NOW)
    out = admit(admit(known, "a", now=NOW).state, "b", now=NOW).state
    assert set(out.in_flight) == {"a", "b"}

    assert set(release_probe(out, "a").in_flight) == {"b"}
    later = observe(out, {}, now=NOW + IN_FLIGHT_TTL_SECONDS + 1)
    assert later.in_flight == {}
    assert GateState.from_json(out.to_json()).in_flight == out.in_flight
