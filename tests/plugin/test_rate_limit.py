"""Rate-limit headers and wait decisions (network_requests.rate_limit): a fixed clock, no sleeping.

Every rule takes ``now`` and ``rand`` as arguments, so the tests pin both: a wait is
exact, and "never before the server allows" is an equality or an inequality on numbers.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from network_requests.rate_limit import (
    EPOCH_THRESHOLD_SECONDS,
    MAX_HEADER_WAIT_SECONDS,
    Backoff,
    MalformedHeaderError,
    Outcome,
    RateLimitWait,
    WaitSource,
    classify,
    decide_rate_limit_wait,
    parse_delta_seconds,
    parse_http_date,
    parse_retry_after,
    wait_limit_violation,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
#: RFC 9110's example date, and a clock 23 seconds before it.
RFC_DATE = datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc)
BEFORE_RFC_DATE = RFC_DATE - timedelta(seconds=23)
NO_JITTER = Backoff(retry_delay=timedelta(seconds=60), jitter=0.0)

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

#: Local time zones as POSIX TZ strings (no tzdata needed), like urllib3's Retry-After tests:
#: nothing here may depend on the machine's zone.
LOCAL_TIME_ZONES = [
    "UTC0",
    "EST+05EDT,M3.2.0,M11.1.0",  # America/New_York, with DST
    "IST-05:30",  # half-hour offset
    "LINT-14",  # the earliest zone on Earth
    "SST+11",  # one of the latest
    "NST+03:30NDT,M3.2.0,M11.1.0",  # St John's, half-hour offset with DST
]


@pytest.fixture(params=LOCAL_TIME_ZONES)
def local_time_zone(request, monkeypatch):
    """Run the test with the process's local time zone set to ``request.param``."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def decide(headers, *, now=NOW, backoff=NO_JITTER, waits=0, rand=lambda: 0.0) -> RateLimitWait:
    return decide_rate_limit_wait(headers, now=now, backoff=backoff, consecutive_waits=waits, rand=rand)


# -- Retry-After: delta-seconds ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("0", 0, id="zero"),
        pytest.param("1", 1, id="one"),
        pytest.param("1000", 1000, id="thousand"),
        pytest.param("\t42 ", 42, id="optional-whitespace-tab-and-space"),
        pytest.param("  42\t\t", 42, id="more-optional-whitespace"),
        pytest.param("007", 7, id="leading-zeros"),
        pytest.param("0000000000000000000000000042", 42, id="many-leading-zeros"),
        pytest.param(str(MAX_HEADER_WAIT_SECONDS), MAX_HEADER_WAIT_SECONDS, id="exactly-the-cap"),
    ],
)
def test_retry_after_delta_seconds_is_read_as_that_many_seconds(value, seconds):
    assert parse_retry_after(value, NOW) == seconds
    assert parse_delta_seconds(value) == seconds
    wait = decide({"Retry-After": value})
    assert wait.seconds == seconds
    assert wait.source is WaitSource.RETRY_AFTER
    assert wait.fallback_reason is None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("99999999999999999999", id="twenty-digits"),
        pytest.param(str(MAX_HEADER_WAIT_SECONDS + 1), id="one-past-the-cap"),
        pytest.param("1000000000000", id="thirteen-digits"),
        pytest.param("9" * 5000, id="five-thousand-digits"),
    ],
)
def test_an_absurdly_large_retry_after_clamps_to_the_maximum_and_never_overflows(value):
    assert parse_retry_after(value, NOW) == MAX_HEADER_WAIT_SECONDS
    wait = decide({"Retry-After": value})
    assert wait.seconds == MAX_HEADER_WAIT_SECONDS
    assert wait.not_before == NOW + timedelta(seconds=MAX_HEADER_WAIT_SECONDS)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("-1", id="negative"),
        pytest.param("+1", id="explicit-plus"),
        pytest.param("1.0", id="decimal"),
        pytest.param("1.5", id="fraction"),
        pytest.param("1e3", id="exponent"),
        pytest.param("0x10", id="hex"),
        pytest.param("1,000", id="thousands-separator"),
        pytest.param("4 2", id="inner-space"),
        pytest.param("42s", id="unit-suffix"),
        pytest.param("", id="empty"),
        pytest.param(" ", id="only-space"),
        pytest.param("\t \t", id="only-whitespace"),
        pytest.param("42\n", id="newline-is-not-optional-whitespace"),
        pytest.param("\x0b42", id="vertical-tab-is-not-optional-whitespace"),
        pytest.param("\N{NO-BREAK SPACE}42", id="no-break-space-is-not-optional-whitespace"),
        pytest.param("４２", id="fullwidth-digits"),
        pytest.param("²", id="superscript-two"),
        pytest.param("٤٢", id="arabic-indic-digits"),
        pytest.param("४२", id="devanagari-digits"),
        pytest.param("tomorrow", id="word"),
        pytest.param("Sun, 32 Nov 1994 08:49:37 GMT", id="impossible-date"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 +9999", id="impossible-zone-offset"),
    ],
)
def test_a_retry_after_that_is_neither_delta_seconds_nor_a_date_is_refused(value):
    with pytest.raises(MalformedHeaderError, match="not"):
        parse_retry_after(value, NOW)


@pytest.mark.parametrize("value", ["-1", "+1", "1.0", "", " ", "４２", "²", "٤٢"])
def test_a_malformed_retry_after_falls_back_to_backoff_and_says_why(value):
    wait = decide({"Retry-After": value})
    assert wait.source is WaitSource.BACKOFF
    assert wait.seconds == 60
    assert wait.fallback_reason is not None
    assert "Retry-After ignored" in wait.fallback_reason
    assert repr(value) in wait.fallback_reason


def test_a_malformed_retry_after_falls_back_to_a_reset_header_before_backoff():
    wait = decide({"Retry-After": "soon", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
    assert wait.source is WaitSource.X_RATELIMIT_RESET
    assert wait.seconds == 30
    assert "Retry-After ignored" in wait.fallback_reason


def test_parse_delta_seconds_refuses_what_is_not_ascii_digits():
    for value in ("", "-1", "1.0", "٤٢", "²", "0x1"):
        with pytest.raises(MalformedHeaderError, match="not a number of seconds"):
            parse_delta_seconds(value)


# -- Retry-After: HTTP-date ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Sun, 06 Nov 1994 08:49:37 GMT", id="IMF-fixdate"),
        pytest.param("Sunday, 06-Nov-94 08:49:37 GMT", id="RFC-850"),
        pytest.param("Sun Nov  6 08:49:37 1994", id="asctime"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 -0000", id="minus-zero-zone"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 +0000", id="plus-zero-zone"),
        pytest.param("Sun, 06 Nov 1994 08:49:37", id="no-zone-is-utc"),
        pytest.param("Sun, 06 Nov 1994 09:49:37 +0100", id="numeric-zone"),
        pytest.param("  Sun, 06 Nov 1994 08:49:37 GMT\t", id="optional-whitespace"),
    ],
)
def test_a_retry_after_http_date_in_any_format_waits_until_that_moment(value, local_time_zone):
    assert parse_retry_after(value, BEFORE_RFC_DATE) == 23
    wait = decide({"Retry-After": value}, now=BEFORE_RFC_DATE)
    assert (wait.seconds, wait.source) == (23, WaitSource.RETRY_AFTER)
    assert wait.not_before == RFC_DATE


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_an_http_date_is_read_as_the_same_instant_in_every_local_time_zone(value, local_time_zone):
    assert parse_http_date(value) == RFC_DATE
    assert parse_http_date(value).utcoffset() == timedelta(0)


def test_a_date_without_a_zone_is_read_as_utc_not_local_time(local_time_zone):
    parsed = parse_http_date("Sun Nov  6 08:49:37 1994")
    assert parsed.tzinfo is not None
    assert parsed == RFC_DATE


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_a_retry_after_date_in_the_past_means_no_wait(value, local_time_zone):
    assert parse_retry_after(value, NOW) == 0
    wait = decide({"Retry-After": value})
    assert (wait.seconds, wait.source, wait.not_before) == (0, WaitSource.RETRY_AFTER, NOW)


def test_a_retry_after_date_exactly_now_means_no_wait():
    assert parse_retry_after(format_datetime(NOW, usegmt=True), NOW) == 0


def test_a_retry_after_date_far_in_the_future_clamps_to_the_maximum():
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", NOW) == MAX_HEADER_WAIT_SECONDS
    wait = decide({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})
    assert wait.seconds == MAX_HEADER_WAIT_SECONDS


def test_a_retry_after_date_is_measured_against_a_now_in_any_time_zone(local_time_zone):
    now_in_india = BEFORE_RFC_DATE.astimezone(timezone(timedelta(hours=5, minutes=30)))
    wait = decide({"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT"}, now=now_in_india)
    assert wait.seconds == 23
    assert wait.not_before == RFC_DATE


@pytest.mark.parametrize(
    "local_clock_skew",
    [
        pytest.param(timedelta(minutes=10), id="local-clock-ahead"),
        pytest.param(timedelta(minutes=-10), id="local-clock-behind"),
        pytest.param(timedelta(days=-400), id="local-clock-far-behind"),
    ],
)
def test_a_retry_after_date_is_measured_against_the_servers_date_header(local_clock_skew, local_time_zone):
    # The server says it is 08:49:14 and asks for 08:49:37: 23 seconds, whatever our clock says.
    headers = {
        "Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT",
        "Date": "Sun, 06 Nov 1994 08:49:14 GMT",
    }
    local_now = BEFORE_RFC_DATE + local_clock_skew
    assert parse_retry_after(headers["Retry-After"], local_now, server_date=BEFORE_RFC_DATE) == 23
    wait = decide(headers, now=local_now)
    assert (wait.seconds, wait.source) == (23, WaitSource.RETRY_AFTER)
    assert wait.not_before == local_now + timedelta(seconds=23)


def test_the_servers_date_header_is_found_whatever_its_case():
    headers = {"retry-after": "Sun, 06 Nov 1994 08:49:37 GMT", "DATE": "Sun, 06 Nov 1994 08:49:14 GMT"}
    assert decide(headers, now=NOW).seconds == 23


@pytest.mark.parametrize("date", ["", "yesterday", "Sun, 32 Nov 1994 08:49:37 GMT", "٤٢"])
def test_an_unreadable_date_header_is_ignored_and_the_local_clock_used(date):
    headers = {"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT", "Date": date}
    wait = decide(headers, now=BEFORE_RFC_DATE)
    assert (wait.seconds, wait.source, wait.fallback_reason) == (23, WaitSource.RETRY_AFTER, None)


def test_the_date_header_does_not_change_a_delta_seconds_retry_after():
    wait = decide({"Retry-After": "30", "Date": "Sun, 06 Nov 1994 08:49:14 GMT"})
    assert wait.seconds == 30


# -- Reset headers -------------------------------------------------------------------------------


@pytest.mark.parametrize("remaining", [{"RateLimit-Remaining": "0"}, {"RateLimit-Remaining": " 0 "}, {}])
def test_ratelimit_reset_is_used_when_the_remaining_quota_is_zero_or_not_stated(remaining):
    wait = decide({"RateLimit-Reset": "30", **remaining})
    assert (wait.seconds, wait.source, wait.fallback_reason) == (30, WaitSource.RATELIMIT_RESET, None)


@pytest.mark.parametrize("remaining", ["1", "42", "unreadable"])
def test_ratelimit_reset_is_ignored_while_quota_remains(remaining):
    wait = decide({"RateLimit-Reset": "30", "RateLimit-Remaining": remaining})
    assert wait.source is WaitSource.BACKOFF
    assert wait.seconds == 60


def test_a_malformed_ratelimit_reset_falls_back_to_backoff_and_says_why():
    wait = decide({"RateLimit-Reset": "soon", "RateLimit-Remaining": "0"})
    assert wait.source is WaitSource.BACKOFF
    assert "reset header ignored" in wait.fallback_reason
    assert "'soon'" in wait.fallback_reason


@pytest.mark.parametrize("remaining", [{"X-RateLimit-Remaining": "0"}, {}])
def test_x_ratelimit_reset_as_an_epoch_waits_until_that_moment(remaining):
    epoch = int(NOW.timestamp()) + 90
    wait = decide({"X-RateLimit-Reset": str(epoch), **remaining})
    assert (wait.seconds, wait.source) == (90, WaitSource.X_RATELIMIT_RESET)
    assert wait.not_before == NOW + timedelta(seconds=90)


def test_x_ratelimit_reset_as_an_epoch_is_independent_of_the_local_time_zone(local_time_zone):
    epoch = int(NOW.timestamp()) + 90
    now_elsewhere = NOW.astimezone(timezone(timedelta(hours=-11)))
    assert decide({"X-RateLimit-Reset": str(epoch)}, now=now_elsewhere).seconds == 90


def test_x_ratelimit_reset_as_a_fractional_epoch_keeps_the_fraction():
    wait = decide({"X-RateLimit-Reset": f"{int(NOW.timestamp()) + 12}.5"})
    assert wait.seconds == pytest.approx(12.5)
    assert wait.source is WaitSource.X_RATELIMIT_RESET


@pytest.mark.parametrize("epoch", [int(NOW.timestamp()) - 1, int(NOW.timestamp()) - 86400, EPOCH_THRESHOLD_SECONDS])
def test_x_ratelimit_reset_as_an_epoch_in_the_past_means_no_wait(epoch):
    wait = decide({"X-RateLimit-Reset": str(epoch)})
    assert (wait.seconds, wait.source, wait.not_before) == (0, WaitSource.X_RATELIMIT_RESET, NOW)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0), ("1", 1), ("30", 30), ("3600", 3600), ("2.5", 2.5)])
def test_x_ratelimit_reset_below_the_epoch_threshold_is_read_as_delta_seconds(value, seconds):
    wait = decide({"X-RateLimit-Reset": value})
    assert (wait.seconds, wait.source) == (seconds, WaitSource.X_RATELIMIT_RESET)


def test_x_ratelimit_reset_just_below_the_epoch_threshold_is_a_delta_clamped_to_the_maximum():
    wait = decide({"X-RateLimit-Reset": str(EPOCH_THRESHOLD_SECONDS - 1)})
    assert wait.seconds == MAX_HEADER_WAIT_SECONDS


def test_x_ratelimit_reset_at_the_epoch_threshold_is_read_as_an_epoch():
    now = datetime.fromtimestamp(EPOCH_THRESHOLD_SECONDS - 5, tz=timezone.utc)
    assert decide({"X-RateLimit-Reset": str(EPOCH_THRESHOLD_SECONDS)}, now=now).seconds == 5


@pytest.mark.parametrize("remaining", ["1", "4999", "unreadable"])
def test_x_ratelimit_reset_is_ignored_while_quota_remains(remaining):
    wait = decide({"X-RateLimit-Reset": str(int(NOW.timestamp()) + 90), "X-RateLimit-Remaining": remaining})
    assert wait.source is WaitSource.BACKOFF


@pytest.mark.parametrize("value", ["", "soon", "-30", "1e9", "0x10", "1" * 16, "٤٢", "1.", ".5"])
def test_a_malformed_x_ratelimit_reset_falls_back_to_backoff_and_says_why(value):
    wait = decide({"X-RateLimit-Reset": value})
    assert wait.source is WaitSource.BACKOFF
    assert "X-RateLimit-Reset is not a number" in wait.fallback_reason


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param('"default";r=0;t=30', 30, id="draft-example"),
        pytest.param('"default";t=30', 30, id="remaining-not-stated"),
        pytest.param('"default"; r=0; t=30', 30, id="whitespace-around-parameters"),
        pytest.param('"default";R=0;T=30', 30, id="parameter-names-any-case"),
        pytest.param('"burst";r=0;t=10, "daily";r=5;t=60', 60, id="two-policies-longest-reset"),
    ],
)
def test_the_structured_ratelimit_field_gives_the_reset_when_quota_is_spent(value, seconds):
    wait = decide({"RateLimit": value})
    assert (wait.seconds, wait.source) == (seconds, WaitSource.RATELIMIT_RESET)


def test_the_structured_ratelimit_field_is_ignored_while_quota_remains():
    assert decide({"RateLimit": '"default";r=5;t=30'}).source is WaitSource.BACKOFF


def test_a_malformed_structured_ratelimit_field_falls_through_to_a_valid_x_ratelimit_reset():
    wait = decide({"RateLimit": '"default";r=0;t=soon', "X-RateLimit-Reset": "30"})
    assert (wait.seconds, wait.source) == (30, WaitSource.X_RATELIMIT_RESET)
    assert "reset header ignored" in wait.fallback_reason


def test_a_malformed_structured_ratelimit_field_falls_back_and_says_why():
    wait = decide({"RateLimit": '"default";r=0;t=soon'})
    assert wait.source is WaitSource.BACKOFF
    assert "reset header ignored" in wait.fallback_reason


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
    assert "Retry-After ignored" in wait.fallback_reason
    assert "reset header ignored" in wait.fallback_reason


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
    assert backoff.seconds(consecutive_waits, lambda: 0.5) >= MAX_HEADER_WAIT_SECONDS
    wait = decide({}, backoff=backoff, waits=consecutive_waits, rand=lambda: 0.5)
    assert wait.seconds == MAX_HEADER_WAIT_SECONDS
    assert wait.not_before == NOW + timedelta(seconds=MAX_HEADER_WAIT_SECONDS)


def test_a_huge_multiplier_is_still_capped_by_max_delay():
    backoff = Backoff(retry_delay=timedelta(seconds=10), multiplier=2.0, max_delay=timedelta(hours=1))
    assert backoff.seconds(5000, lambda: 0.5) == 3600


def test_a_retry_delay_longer_than_the_maximum_wait_clamps_in_the_decision():
    backoff = Backoff(retry_delay=timedelta(days=365 * 100))
    assert decide({}, backoff=backoff).seconds == MAX_HEADER_WAIT_SECONDS


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
            wait_of(MAX_HEADER_WAIT_SECONDS),
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
def test_any_headers_give_a_finite_bounded_wait_and_never_one_before_a_valid_retry_after(
    headers, now, backoff, waits, rand_value
):
    wait = decide_rate_limit_wait(headers, now=now, backoff=backoff, consecutive_waits=waits, rand=lambda: rand_value)

    assert math.isfinite(wait.seconds)
    assert 0 <= wait.seconds <= MAX_HEADER_WAIT_SECONDS
    assert wait.not_before == now + timedelta(seconds=wait.seconds)
    delta = valid_delta_seconds(headers)
    if delta is not None:
        assert wait.source is WaitSource.RETRY_AFTER
        assert wait.seconds >= min(delta, MAX_HEADER_WAIT_SECONDS)
        assert wait.seconds == min(delta, MAX_HEADER_WAIT_SECONDS)


@PROPERTY_SETTINGS
@given(headers=st.dictionaries(st.text(max_size=30), st.text(max_size=40), max_size=8), now=nows)
def test_entirely_arbitrary_headers_never_make_the_decision_raise(headers, now):
    wait = decide(headers, now=now, rand=lambda: 0.5)
    assert 0 <= wait.seconds <= MAX_HEADER_WAIT_SECONDS


@PROPERTY_SETTINGS
@given(backoff=backoffs, waits=st.integers(-3, 3000), rand_value=rand_values)
def test_backoff_is_never_below_retry_delay_for_any_settings_and_rand(backoff, waits, rand_value):
    seconds = backoff.seconds(waits, lambda: rand_value)
    assert not math.isnan(seconds)
    assert seconds >= backoff.retry_delay.total_seconds()
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
