"""Wait decisions and status meanings (network_requests.rate_limit): a fixed clock, no sleeping.

Every rule takes ``now`` and ``rand`` as arguments, so the tests pin both: a wait is
exact, and "never before the server allows" is an equality or an inequality on numbers.
The header forms themselves are tested in test_rate_limit_headers.py; here they matter only
as far as they change the decision.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from network_requests.rate_limit import (
    Backoff,
    Outcome,
    RateLimitWait,
    WaitSource,
    classify,
    decide_rate_limit_wait,
    wait_limit_violation,
)
from network_requests.rate_limit_headers import MAX_HORIZON_SECONDS, RateLimitInfo, read_rate_limit_headers

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
#: RFC 9110's example date, and a clock 23 seconds before it.
RFC_DATE = datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc)
BEFORE_RFC_DATE = RFC_DATE - timedelta(seconds=23)
NO_JITTER = Backoff(retry_delay=timedelta(seconds=60), jitter=0.0)

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

def decide(headers, *, status=429, now=NOW, backoff=NO_JITTER, waits=0, rand=lambda: 0.0) -> RateLimitWait:
    info = read_rate_limit_headers(status, headers, now=now)
    return decide_rate_limit_wait(info, now=now, backoff=backoff, consecutive_waits=waits, rand=rand)


# -- The server's wait ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds", "source"),
    [
        pytest.param({"Retry-After": "0"}, 0, WaitSource.RETRY_AFTER, id="retry-after-zero"),
        pytest.param({"Retry-After": "\t42 "}, 42, WaitSource.RETRY_AFTER, id="retry-after-seconds"),
        pytest.param({"Retry-After": "1.5"}, 1.5, WaitSource.RETRY_AFTER, id="retry-after-decimal"),
        pytest.param({"Retry-After": "120, 60"}, 120, WaitSource.RETRY_AFTER, id="retry-after-joined"),
        pytest.param({"RateLimit": '"default";r=0;t=30'}, 30, WaitSource.RATELIMIT, id="structured"),
        pytest.param({"RateLimit": '"default";t=30'}, 30, WaitSource.RATELIMIT, id="structured-no-remaining"),
        pytest.param(
            {"RateLimit": '"burst";r=0;t=10, "daily";r=5;t=60'}, 10, WaitSource.RATELIMIT, id="structured-spent-policy"
        ),
        pytest.param({"RateLimit-Reset": "30"}, 30, WaitSource.RATELIMIT_RESET, id="ratelimit-reset-no-remaining"),
        pytest.param(
            {"RateLimit-Reset": "30", "RateLimit-Remaining": " 0 "}, 30, WaitSource.RATELIMIT_RESET, id="ratelimit-spent"
        ),
        pytest.param({"X-RateLimit-Reset": "2.5"}, 2.5, WaitSource.X_RATELIMIT_RESET, id="x-delta"),
        pytest.param(
            {"X-RateLimit-Reset": str(int(NOW.timestamp()) + 90), "X-RateLimit-Remaining": "0"},
            90,
            WaitSource.X_RATELIMIT_RESET,
            id="x-epoch-seconds",
        ),
        pytest.param(
            {"X-RateLimit-Reset": str((int(NOW.timestamp()) + 90) * 1000), "X-RateLimit-Remaining": "0"},
            90,
            WaitSource.X_RATELIMIT_RESET,
            id="x-epoch-milliseconds",
        ),
        pytest.param({"X-RateLimit-Reset": str(int(NOW.timestamp()) - 60)}, 0, WaitSource.X_RATELIMIT_RESET, id="x-past"),
    ],
)
def test_the_wait_is_the_one_the_server_asked_for(headers, seconds, source):
    wait = decide(headers)
    assert (wait.seconds, wait.source, wait.fallback_reason) == (seconds, source, None)
    assert wait.not_before == NOW + timedelta(seconds=seconds)


def test_a_retry_after_date_waits_until_that_moment_by_the_servers_clock():
    headers = {"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT", "Date": "Sun, 06 Nov 1994 08:49:14 GMT"}
    local_now = BEFORE_RFC_DATE + timedelta(days=-400)
    wait = decide(headers, now=local_now)
    assert (wait.seconds, wait.source) == (23, WaitSource.RETRY_AFTER)
    assert wait.not_before == local_now + timedelta(seconds=23)


@pytest.mark.parametrize("remaining", ["1", "42"])
def test_a_reset_is_no_wait_while_quota_remains(remaining):
    for headers in (
        {"RateLimit-Reset": "30", "RateLimit-Remaining": remaining},
        {"X-RateLimit-Reset": str(int(NOW.timestamp()) + 90), "X-RateLimit-Remaining": remaining},
        {"RateLimit": f'"default";r={remaining};t=30'},
    ):
        wait = decide(headers)
        assert (wait.source, wait.seconds, wait.fallback_reason) == (WaitSource.BACKOFF, 60, None)


def test_an_unreadable_remaining_count_on_a_429_still_waits_for_the_reset_and_says_why():
    wait = decide({"X-RateLimit-Reset": "30", "X-RateLimit-Remaining": "unreadable"})
    assert (wait.seconds, wait.source) == (30, WaitSource.X_RATELIMIT_RESET)
    assert wait.fallback_reason == "X-RateLimit-Remaining: 'unreadable' is not a count"


@pytest.mark.parametrize("value", ["-1", "+1", "", " ", "４２", "²", "٤٢", "soon"])
def test_a_malformed_retry_after_falls_back_to_backoff_and_says_why(value):
    wait = decide({"Retry-After": value})
    assert (wait.source, wait.seconds) == (WaitSource.BACKOFF, 60)
    assert wait.fallback_reason == f"Retry-After: {value!r} is not delay-seconds or an HTTP-date"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Retry-After": str(10 * 365 * 24 * 3600)}, id="ten-year-retry-after"),
        pytest.param({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, id="year-9999-retry-after"),
        pytest.param({"RateLimit-Reset": "99999999", "RateLimit-Remaining": "0"}, id="three-year-ratelimit-reset"),
        pytest.param({"X-RateLimit-Reset": "1700000000000000", "X-RateLimit-Remaining": "0"}, id="epoch-microseconds"),
        pytest.param({"X-RateLimit-Reset": str(10**9 - 1)}, id="thirty-year-delta"),
    ],
)
def test_a_wait_beyond_seven_days_is_not_believed_the_backoff_is_used_and_the_reason_given(headers):
    wait = decide(headers)
    assert (wait.source, wait.seconds) == (WaitSource.BACKOFF, 60)
    assert "beyond 7 days" in wait.fallback_reason


def test_a_malformed_retry_after_falls_back_to_a_reset_header_before_backoff():
    wait = decide({"Retry-After": "soon", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
    assert (wait.seconds, wait.source) == (30, WaitSource.X_RATELIMIT_RESET)
    assert wait.fallback_reason.startswith("Retry-After: 'soon'")


def test_a_malformed_structured_field_falls_through_to_a_valid_x_ratelimit_reset():
    wait = decide({"RateLimit": '"default";r=0;t=soon', "X-RateLimit-Reset": "30"})
    assert (wait.seconds, wait.source) == (30, WaitSource.X_RATELIMIT_RESET)
    assert wait.fallback_reason.startswith("RateLimit: ")


def test_a_malformed_reset_header_falls_back_to_backoff_and_says_why():
    wait = decide({"RateLimit-Reset": "soon", "RateLimit-Remaining": "0"})
    assert wait.source is WaitSource.BACKOFF
    assert wait.fallback_reason == "RateLimit-Reset: 'soon' is not a number"


def test_the_decision_takes_the_readers_result_and_nothing_else():
    info = RateLimitInfo(reset_after=12.0, remaining=0, source="X-RateLimit-Reset", rejected=("Date: 'x' ...",))
    wait = decide_rate_limit_wait(info, now=NOW, backoff=NO_JITTER, consecutive_waits=0, rand=lambda: 0.0)
    assert (wait.seconds, wait.source, wait.fallback_reason) == (12, WaitSource.X_RATELIMIT_RESET, "Date: 'x' ...")


def test_raw_headers_are_refused_with_a_message_naming_the_reader():
    with pytest.raises(TypeError, match="read_rate_limit_headers"):
        decide_rate_limit_wait({"Retry-After": "7"}, now=NOW, backoff=NO_JITTER, consecutive_waits=0, rand=lambda: 0.0)


# -- Precedence and header names -----------------------------------------------------------------


def test_retry_after_beats_every_reset_header():
    headers = {
        "Retry-After": "5",
        "RateLimit": '"default";r=0;t=30',
        "RateLimit-Reset": "40",
        "X-RateLimit-Reset": "50",
    }
    wait = decide(headers)
    assert (wait.seconds, wait.source) == (5, WaitSource.RETRY_AFTER)


def test_retry_after_beats_a_reset_header_asking_for_less():
    wait = decide({"Retry-After": "50", "X-RateLimit-Reset": "5"})
    assert (wait.seconds, wait.source) == (50, WaitSource.RETRY_AFTER)


def test_ratelimit_reset_beats_x_ratelimit_reset():
    wait = decide({"RateLimit-Reset": "40", "X-RateLimit-Reset": "50"})
    assert (wait.seconds, wait.source) == (40, WaitSource.RATELIMIT_RESET)


def test_a_reset_header_beats_backoff_even_when_shorter():
    wait = decide({"X-RateLimit-Reset": "1"}, backoff=Backoff(retry_delay=timedelta(minutes=5)))
    assert (wait.seconds, wait.source) == (1, WaitSource.X_RATELIMIT_RESET)


def test_no_rate_limit_header_means_backoff_without_a_fallback_reason():
    wait = decide({"Content-Type": "application/json"})
    assert (wait.seconds, wait.source, wait.fallback_reason) == (60, WaitSource.BACKOFF, None)


def test_malformed_retry_after_and_reset_headers_both_appear_in_the_fallback_reason():
    wait = decide({"Retry-After": "-1", "X-RateLimit-Reset": "soon"})
    assert wait.source is WaitSource.BACKOFF
    assert wait.fallback_reason == (
        "Retry-After: '-1' is not delay-seconds or an HTTP-date; X-RateLimit-Reset: 'soon' is not a number"
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "7"},
        {"RETRY-AFTER": "7"},
        {"rEtRy-AfTeR": "7"},
        CaseInsensitiveDict({"Retry-After": "7"}),
    ],
)
def test_retry_after_is_found_whatever_the_case_of_its_name(headers):
    assert decide(headers).source is WaitSource.RETRY_AFTER
    assert decide(headers).seconds == 7


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-reset": "7", "x-ratelimit-remaining": "0"},
        {"X-RATELIMIT-RESET": "7", "X-RATELIMIT-REMAINING": "0"},
        {"ratelimit-reset": "7", "RATELIMIT-REMAINING": "0"},
        {"ratelimit": '"p";r=0;t=7'},
        CaseInsensitiveDict({"X-RateLimit-Reset": "7", "X-RateLimit-Remaining": "0"}),
    ],
)
def test_reset_headers_are_found_whatever_the_case_of_their_names(headers):
    assert decide(headers).seconds == 7


def test_remaining_quota_is_found_whatever_the_case_of_its_name():
    assert decide({"X-RateLimit-Reset": "7", "x-ratelimit-remaining": "3"}).source is WaitSource.BACKOFF


@pytest.mark.parametrize(
    "now",
    [
        NOW,
        NOW.astimezone(timezone(timedelta(hours=14))),
        NOW.astimezone(timezone(timedelta(hours=-9, minutes=-30))),
    ],
)
@pytest.mark.parametrize(
    "headers", [{"Retry-After": "17"}, {"X-RateLimit-Reset": "17"}, {"RateLimit-Reset": "17"}, {}]
)
def test_not_before_is_now_plus_the_wait(headers, now):
    wait = decide(headers, now=now, rand=lambda: 0.5)
    assert wait.not_before == now + timedelta(seconds=wait.seconds)


# -- Backoff -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rand_value",
    [0.0, 1e-12, 0.5, 0.999, 1.0, 1.5, 7.0, -0.5, -7.0, math.inf, -math.inf],
)
@pytest.mark.parametrize("jitter", [0.0, 0.1, 1.0])
def test_backoff_is_never_below_retry_delay_whatever_rand_returns(rand_value, jitter):
    backoff = Backoff(retry_delay=timedelta(seconds=10), jitter=jitter)
    seconds = backoff.seconds(0, lambda: rand_value)
    assert 10 <= seconds <= 10 * (1 + jitter)
    assert decide({}, backoff=backoff, rand=lambda: rand_value).seconds == seconds


def test_backoff_is_never_below_retry_delay_when_rand_returns_nan():
    backoff = Backoff(retry_delay=timedelta(seconds=10))
    assert backoff.seconds(0, lambda: math.nan) >= 10
    assert decide({}, backoff=backoff, rand=lambda: math.nan).seconds >= 10


def test_backoff_grows_by_the_multiplier_with_each_consecutive_wait():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, jitter=0.0)
    assert [backoff.seconds(n, lambda: 0.0) for n in range(5)] == [10, 20, 40, 80, 160]


def test_backoff_grows_by_a_fractional_multiplier():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=1.5, jitter=0.0)
    assert [backoff.seconds(n, lambda: 0.0) for n in range(3)] == [10, 15, 22.5]


@pytest.mark.parametrize("multiplier", [0.0, 1.0, -2.0])
def test_backoff_without_a_growing_multiplier_stays_at_retry_delay(multiplier):
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=multiplier, jitter=0.0)
    assert {backoff.seconds(n, lambda: 0.0) for n in range(6)} == {10}


def test_backoff_with_a_shrinking_multiplier_never_drops_below_retry_delay():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=0.5, jitter=0.0)
    assert {backoff.seconds(n, lambda: 0.0) for n in range(6)} == {10}


def test_a_negative_count_of_consecutive_waits_counts_as_none():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, jitter=0.0)
    assert backoff.seconds(-3, lambda: 0.0) == 10


def test_backoff_is_capped_by_max_delay():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, max_delay=timedelta(minutes=5), jitter=0.0)
    assert [backoff.seconds(n, lambda: 0.0) for n in (0, 4, 5, 10, 100)] == [10, 160, 300, 300, 300]


def test_max_delay_also_caps_the_jitter():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, max_delay=timedelta(seconds=50), jitter=1.0)
    assert backoff.seconds(2, lambda: 0.999) == 50


def test_a_max_delay_below_retry_delay_never_lowers_the_wait_below_retry_delay():
    backoff = Backoff(retry_delay=timedelta(seconds=60), multiplier=2.0, max_delay=timedelta(seconds=5), jitter=0.5)
    assert backoff.seconds(3, lambda: 0.9) == 60


def test_jitter_only_ever_adds_to_the_backoff():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, jitter=0.25)
    assert backoff.seconds(1, lambda: 0.0) == 20
    assert backoff.seconds(1, lambda: 0.5) == 22.5
    assert backoff.seconds(1, lambda: 1.0) == 25


def test_a_negative_jitter_is_no_jitter():
    backoff = Backoff(retry_delay=timedelta(seconds=10), jitter=-1.0)
    assert backoff.seconds(0, lambda: 1.0) == 10


def test_a_negative_retry_delay_means_no_wait():
    backoff = Backoff(retry_delay=timedelta(seconds=-10), jitter=0.5)
    assert backoff.seconds(0, lambda: 1.0) == 0


@pytest.mark.parametrize(
    ("multiplier", "consecutive_waits"),
    [
        pytest.param(2.0, 2000, id="float-overflow"),
        pytest.param(1e308, 10, id="huge-multiplier"),
        pytest.param(math.inf, 3, id="infinite-multiplier"),
        pytest.param(10, 400, id="int-multiplier-past-float-range"),
    ],
)
def test_a_huge_multiplier_clamps_and_never_raises(multiplier, consecutive_waits):
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=multiplier, jitter=0.1)
    assert backoff.seconds(consecutive_waits, lambda: 0.5) >= MAX_HORIZON_SECONDS
    wait = decide({}, backoff=backoff, waits=consecutive_waits, rand=lambda: 0.5)
    assert wait.seconds == MAX_HORIZON_SECONDS
    assert wait.not_before == NOW + timedelta(seconds=MAX_HORIZON_SECONDS)


def test_a_huge_multiplier_is_still_capped_by_max_delay():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, max_delay=timedelta(hours=1))
    assert backoff.seconds(5000, lambda: 0.5) == 3600


def test_a_retry_delay_longer_than_the_horizon_is_capped_at_seven_days():
    backoff = Backoff(retry_delay=timedelta(days=365 * 100))
    assert decide({}, backoff=backoff).seconds == MAX_HORIZON_SECONDS


def test_the_backoff_decision_uses_the_count_of_consecutive_waits():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=3.0, jitter=0.0)
    assert [decide({}, backoff=backoff, waits=n).seconds for n in range(3)] == [10, 30, 90]


# -- classify ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "outcome"),
    [
        (200, {}, Outcome.SUCCESS),
        (201, {}, Outcome.SUCCESS),
        (204, {}, Outcome.SUCCESS),
        (299, {}, Outcome.SUCCESS),
        (200, {"Retry-After": "5"}, Outcome.SUCCESS),
        (429, {}, Outcome.RATE_LIMITED),
        (429, {"Retry-After": "5"}, Outcome.RATE_LIMITED),
        (429, {"Retry-After": "garbage"}, Outcome.RATE_LIMITED),
        (503, {"Retry-After": "5"}, Outcome.RATE_LIMITED),
        (503, {"retry-after": "Sun, 06 Nov 1994 08:49:37 GMT"}, Outcome.RATE_LIMITED),
        (503, {}, Outcome.TRANSIENT),
        (503, {"X-RateLimit-Remaining": "0"}, Outcome.TRANSIENT),
        (403, {"X-RateLimit-Remaining": "0"}, Outcome.RATE_LIMITED),
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1700000000"}, Outcome.RATE_LIMITED),
        (403, {"RateLimit-Remaining": "0"}, Outcome.RATE_LIMITED),
        (403, {"RateLimit": '"default";r=0;t=30'}, Outcome.RATE_LIMITED),
        (403, {"Retry-After": "60"}, Outcome.RATE_LIMITED),
        (403, {}, Outcome.PERMANENT),
        (403, {"X-RateLimit-Remaining": "12"}, Outcome.PERMANENT),
        (403, {"X-RateLimit-Remaining": "unreadable"}, Outcome.PERMANENT),
        (403, {"RateLimit": '"default";r=5;t=30'}, Outcome.PERMANENT),
        (403, {"RateLimit": '"default";r=bad'}, Outcome.PERMANENT),
        (408, {}, Outcome.TRANSIENT),
        (500, {}, Outcome.TRANSIENT),
        (502, {}, Outcome.TRANSIENT),
        (504, {}, Outcome.TRANSIENT),
        (599, {}, Outcome.TRANSIENT),
        (400, {}, Outcome.PERMANENT),
        (401, {}, Outcome.PERMANENT),
        (404, {}, Outcome.PERMANENT),
        (404, {"Retry-After": "5"}, Outcome.PERMANENT),
        (422, {}, Outcome.PERMANENT),
        (301, {}, Outcome.PERMANENT),
        (304, {}, Outcome.PERMANENT),
        (100, {}, Outcome.PERMANENT),
    ],
)
def test_classify_tells_what_a_status_means(status, headers, outcome):
    assert classify(status, headers) is outcome
    assert classify(status, CaseInsensitiveDict(headers)) is outcome


@pytest.mark.parametrize(
    "status, headers, sent_key, outcome",
    [
        (409, {}, True, Outcome.IN_PROGRESS),  # an earlier send of this keyed request is being processed
        (409, {"Retry-After": "2"}, True, Outcome.IN_PROGRESS),
        (409, {}, False, Outcome.PERMANENT),  # no key: a conflict no wait mends
        (409, {"Retry-After": "2"}, False, Outcome.PERMANENT),
        (422, {}, True, Outcome.PERMANENT),  # the key reused with another payload (the draft's 422)
        (429, {}, True, Outcome.RATE_LIMITED),
        (201, {}, True, Outcome.SUCCESS),
        (500, {}, True, Outcome.TRANSIENT),
    ],
)
def test_a_409_means_still_in_progress_only_for_a_request_that_carried_an_idempotency_key(
    status, headers, sent_key, outcome
):
    assert classify(status, headers, sent_idempotency_key=sent_key) is outcome


# -- wait_limit_violation ------------------------------------------------------------------------


def wait_of(seconds: float, source: WaitSource = WaitSource.RETRY_AFTER) -> RateLimitWait:
    return RateLimitWait(seconds, source, NOW + timedelta(seconds=seconds))


def test_a_wait_over_the_single_wait_cap_names_what_the_server_asked_and_the_cap():
    message = wait_limit_violation(
        wait_of(7200), waited_so_far=timedelta(0), max_single_wait=timedelta(hours=1), total_timeout=None
    )
    assert message is not None
    assert "asked to wait 2.0h" in message
    assert "Retry-After" in message
    assert "max_rate_limit_wait=60.0min" in message


def test_a_wait_over_the_single_wait_cap_names_a_reset_header_source():
    message = wait_limit_violation(
        wait_of(90, WaitSource.X_RATELIMIT_RESET),
        waited_so_far=timedelta(0),
        max_single_wait=timedelta(seconds=30),
        total_timeout=None,
    )
    assert "asked to wait 90s (X-RateLimit-Reset)" in message
    assert "max_rate_limit_wait=30s" in message


def test_a_wait_exactly_at_the_single_wait_cap_is_allowed():
    assert (
        wait_limit_violation(
            wait_of(3600), waited_so_far=timedelta(0), max_single_wait=timedelta(hours=1), total_timeout=None
        )
        is None
    )


def test_a_wait_that_would_exceed_the_total_timeout_says_so_before_waiting():
    message = wait_limit_violation(
        wait_of(1200),
        waited_so_far=timedelta(minutes=50),
        max_single_wait=timedelta(hours=1),
        total_timeout=timedelta(hours=1),
    )
    assert message is not None
    assert "waiting 20.0min more (Retry-After)" in message
    assert "after 50.0min already spent" in message
    assert "rate_limit_timeout=60.0min" in message


def test_a_wait_ending_exactly_at_the_total_timeout_is_allowed():
    assert (
        wait_limit_violation(
            wait_of(600),
            waited_so_far=timedelta(minutes=50),
            max_single_wait=None,
            total_timeout=timedelta(hours=1),
        )
        is None
    )


def test_the_single_wait_cap_is_reported_before_the_total_timeout():
    message = wait_limit_violation(
        wait_of(7200),
        waited_so_far=timedelta(minutes=50),
        max_single_wait=timedelta(hours=1),
        total_timeout=timedelta(hours=1),
    )
    assert "max_rate_limit_wait" in message
    assert "rate_limit_timeout" not in message


def test_a_wait_within_both_limits_is_allowed():
    assert (
        wait_limit_violation(
            wait_of(30),
            waited_so_far=timedelta(minutes=5),
            max_single_wait=timedelta(hours=1),
            total_timeout=timedelta(hours=1),
        )
        is None
    )


def test_no_caps_mean_any_wait_is_allowed():
    assert (
        wait_limit_violation(
            wait_of(MAX_HORIZON_SECONDS),
            waited_so_far=timedelta(days=365),
            max_single_wait=None,
            total_timeout=None,
        )
        is None
    )


# -- Properties ----------------------------------------------------------------------------------

HEADER_NAMES = [
    "retry-after",
    "ratelimit",
    "ratelimit-reset",
    "ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-remaining",
    "date",
    "content-type",
]
OWS = st.sampled_from(["", " ", "\t", " \t "])


@st.composite
def http_dates(draw) -> str:
    moment = draw(
        st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc))
    )
    style = draw(st.sampled_from(["imf", "rfc850", "asctime", "numeric-zone", "no-zone"]))
    if style == "imf":
        return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")
    if style == "rfc850":
        return moment.strftime("%A, %d-%b-%y %H:%M:%S GMT")
    if style == "asctime":
        return moment.strftime("%a %b ") + f"{moment.day:2d}" + moment.strftime(" %H:%M:%S %Y")
    if style == "numeric-zone":
        return moment.strftime("%a, %d %b %Y %H:%M:%S ") + draw(st.from_regex(r"\A[+-][0-9]{4}\Z"))
    return moment.strftime("%a, %d %b %Y %H:%M:%S")


header_values = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, n, b: f"{a}{n}{b}", OWS, st.integers(min_value=0, max_value=10**30), OWS),
    st.from_regex(r"\A[0-9]{1,20}(\.[0-9]{1,5})?\Z"),
    st.builds(str, st.floats()),
    st.builds(str, st.integers(min_value=-(10**12), max_value=10**12)),
    http_dates(),
    st.builds(
        lambda r, t: f'"default";r={r};t={t}',
        st.one_of(st.integers(0, 10**20), st.text(max_size=5)),
        st.one_of(st.integers(0, 10**20), st.text(max_size=5)),
    ),
)


@st.composite
def header_dicts(draw) -> dict[str, str]:
    """Headers with unique names (as an HTTP client delivers them) in random letter case."""
    names = draw(st.lists(st.sampled_from(HEADER_NAMES), unique=True, max_size=len(HEADER_NAMES)))
    headers = {}
    for name in names:
        cased = draw(st.sampled_from([name, name.upper(), name.title(), name.swapcase().title().swapcase()]))
        headers[cased] = draw(header_values)
    return headers


nows = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [timezone.utc, timezone(timedelta(hours=14)), timezone(timedelta(hours=-11)), timezone(timedelta(hours=5, minutes=30))]
    ),
)
backoffs = st.builds(
    Backoff,
    retry_delay=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30)),
    multiplier=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    max_delay=st.none() | st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30)),
    jitter=st.floats(min_value=0, max_value=10, allow_nan=False),
)
rand_values = st.floats(allow_nan=False)


def valid_delta_seconds(headers: dict[str, str]) -> int | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            stripped = value.strip(" \t")
            if stripped and all(c in "0123456789" for c in stripped):
                return int(stripped)
    return None


@PROPERTY_SETTINGS
@given(headers=header_dicts(), now=nows, backoff=backoffs, waits=st.integers(-3, 3000), rand_value=rand_values)
def test_any_headers_give_a_bounded_wait_exactly_a_valid_retry_after_and_never_a_disbelieved_one(
    headers, now, backoff, waits, rand_value
):
    info = read_rate_limit_headers(429, headers, now=now)
    wait = decide_rate_limit_wait(info, now=now, backoff=backoff, consecutive_waits=waits, rand=lambda: rand_value)

    assert math.isfinite(wait.seconds)
    assert 0 <= wait.seconds <= MAX_HORIZON_SECONDS
    assert wait.not_before == now + timedelta(seconds=wait.seconds)
    delta = valid_delta_seconds(headers)
    if delta is not None and delta <= MAX_HORIZON_SECONDS:
        assert (wait.source, wait.seconds) == (WaitSource.RETRY_AFTER, delta)
    elif delta is not None:
        assert wait.source is not WaitSource.RETRY_AFTER
        assert "beyond 7 days" in wait.fallback_reason


@PROPERTY_SETTINGS
@given(headers=st.dictionaries(st.text(max_size=30), st.text(max_size=40), max_size=8), now=nows)
def test_entirely_arbitrary_headers_never_make_the_decision_raise(headers, now):
    wait = decide(headers, now=now, rand=lambda: 0.5)
    assert 0 <= wait.seconds <= MAX_HORIZON_SECONDS


@PROPERTY_SETTINGS
@given(backoff=backoffs, waits=st.integers(-3, 3000), rand_value=rand_values)
def test_backoff_is_never_below_retry_delay_for_any_settings_and_rand(backoff, waits, rand_value):
    seconds = backoff.seconds(waits, lambda: rand_value)
    assert not math.isnan(seconds)
    # A retry_delay beyond the horizon (7 days) is capped there like any other wait.
    assert seconds >= min(backoff.retry_delay.total_seconds(), MAX_HORIZON_SECONDS)
    if backoff.max_delay is not None and backoff.max_delay >= backoff.retry_delay:
        assert seconds <= backoff.max_delay.total_seconds()


@PROPERTY_SETTINGS
@given(status=st.integers(min_value=100, max_value=599), headers=header_dicts())
def test_classify_never_raises_for_any_status_and_headers(status, headers):
    outcome = classify(status, headers)
    assert isinstance(outcome, Outcome)
    if 200 <= status < 300:
        assert outcome is Outcome.SUCCESS
    elif status == 429:
        assert outcome is Outcome.RATE_LIMITED
    elif status == 500 or status in (502, 504, 408):
        assert outcome is Outcome.TRANSIENT


@PROPERTY_SETTINGS
@given(
    status=st.integers(min_value=100, max_value=599),
    headers=st.dictionaries(st.text(max_size=30), st.text(max_size=40), max_size=8),
)
def test_classify_never_raises_for_entirely_arbitrary_headers(status, headers):
    assert isinstance(classify(status, headers), Outcome)
