"""The rate-limit header reader (network_requests.rate_limit_headers): a fixed clock, one form at a time.

Tables in the style of urllib3's Retry-After tests (valid and invalid forms, the three HTTP-date
formats, the same cases under several local time zones), then the quota headers of every draft
and the X- convention, then hypothesis: for any header bytes the reader never raises, and every
time it returns is finite and within the horizon, or the header is listed as rejected.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPHeaderDict

from network_requests.rate_limit_headers import (
    EPOCH_MILLISECONDS_FROM,
    EPOCH_SECONDS_FROM,
    MAX_HORIZON_SECONDS,
    RateLimitInfo,
    lower_headers,
    read_rate_limit_headers,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
NOW_EPOCH = int(NOW.timestamp())
#: RFC 9110's example date, and a clock 23 seconds before it.
RFC_DATE = datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc)
BEFORE_RFC_DATE = RFC_DATE - timedelta(seconds=23)
TEN_YEARS = 10 * 365 * 24 * 3600

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

#: Local time zones as POSIX TZ strings (no tzdata needed): nothing may depend on the machine's zone.
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


def read(headers, *, status=429, now=NOW) -> RateLimitInfo:
    return read_rate_limit_headers(status, headers, now=now)


def http_date(moment: datetime) -> str:
    return format_datetime(moment, usegmt=True)


# -- Retry-After: delay-seconds ------------------------------------------------------------------


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
        pytest.param("1.5", 1.5, id="decimal"),
        pytest.param("1.0", 1.0, id="decimal-zero-fraction"),
        pytest.param("0.25", 0.25, id="decimal-below-one"),
        pytest.param("120, 120", 120, id="joined-duplicate"),
        pytest.param("120,60", 120, id="joined-without-space"),
        # A thousands separator or a joined value: the longer reading, so that neither is early.
        pytest.param("1,000", 1000, id="thousands-separator-not-one-second"),
        pytest.param("120,120", 120120, id="thousands-separator-or-joined-takes-the-longer"),
        pytest.param(" 86,400\t", 86_400, id="a-day-with-a-separator-and-whitespace"),
        pytest.param("60, 120", 120, id="joined-disagreeing-takes-the-largest"),
        pytest.param("120, 60", 120, id="joined-disagreeing-largest-first"),
        pytest.param(str(MAX_HORIZON_SECONDS), MAX_HORIZON_SECONDS, id="exactly-the-horizon"),
    ],
)
def test_retry_after_delay_seconds_is_read_as_that_many_seconds(value, seconds):
    info = read({"Retry-After": value})
    assert info.retry_after == seconds
    assert info.source == "Retry-After"
    assert info.rejected == ()
    assert info.wait_seconds() == seconds


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("-1", id="negative"),
        pytest.param("+1", id="explicit-plus"),
        pytest.param("1.", id="trailing-point"),
        pytest.param(".5", id="leading-point"),
        pytest.param("1e3", id="exponent"),
        pytest.param("0x10", id="hex"),
        pytest.param("nan", id="nan"),
        pytest.param("inf", id="infinity"),
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
        pytest.param("4²", id="superscript-after-a-digit"),
        pytest.param("٤٢", id="arabic-indic-digits"),
        pytest.param("४२", id="devanagari-digits"),
        pytest.param("42\x00", id="nul"),
        pytest.param("tomorrow", id="word"),
        pytest.param("120, soon", id="joined-with-a-bad-part"),
        pytest.param("120, -1", id="joined-with-a-negative-part"),
        pytest.param("Sun, 32 Nov 1994 08:49:37 GMT", id="impossible-date"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 +9999", id="impossible-zone-offset"),
    ],
)
def test_a_retry_after_that_is_neither_delay_seconds_nor_a_date_is_rejected_with_a_reason(value):
    info = read({"Retry-After": value})
    assert info.retry_after is None
    assert info.wait_seconds() is None
    (reason,) = info.rejected
    assert reason.startswith("Retry-After: ")
    assert "is not delay-seconds or an HTTP-date" in reason


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(str(TEN_YEARS), id="ten-years"),
        pytest.param(str(MAX_HORIZON_SECONDS + 1), id="one-second-past-the-horizon"),
        pytest.param("99999999999999999999", id="twenty-digits"),
        pytest.param("9" * 4000, id="four-thousand-digits"),
        pytest.param("60, 315360000", id="joined-with-ten-years"),
        pytest.param("1,000,000", id="thousands-separators-beyond-the-horizon"),
    ],
)
def test_a_retry_after_beyond_seven_days_is_rejected_not_clamped(value):
    info = read({"Retry-After": value})
    assert info.retry_after is None
    assert info.wait_seconds() is None
    (reason,) = info.rejected
    assert reason.startswith("Retry-After: ")
    assert "away (beyond 7 days)" in reason


def test_a_ten_year_retry_after_says_how_far_away_it_was():
    (reason,) = read({"Retry-After": str(TEN_YEARS)}).rejected
    assert reason == f"Retry-After: '{TEN_YEARS}' is 10 years away (beyond 7 days)"


def test_a_rejected_value_is_quoted_shortly_in_the_reason():
    (reason,) = read({"Retry-After": "x" * 1000}).rejected
    assert len(reason) < 120


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
def test_a_retry_after_http_date_in_any_format_is_the_seconds_until_that_moment(value, local_time_zone):
    info = read({"Retry-After": value}, now=BEFORE_RFC_DATE)
    assert (info.retry_after, info.source, info.rejected) == (23, "Retry-After", ())


def test_a_date_without_a_zone_is_read_as_utc_not_local_time(local_time_zone):
    assert read({"Retry-After": "Sun Nov  6 08:49:37 1994"}, now=BEFORE_RFC_DATE).retry_after == 23


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", id="joined-duplicate"),
        pytest.param("Sun, 06 Nov 1994 08:49:30 GMT, Sun, 06 Nov 1994 08:49:37 GMT", id="joined-later-second"),
        pytest.param("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:30 GMT", id="joined-later-first"),
        pytest.param("Sun Nov  6 08:49:37 1994, 5", id="date-and-seconds"),
        pytest.param("5, Sunday, 06-Nov-94 08:49:37 GMT", id="seconds-and-date"),
    ],
)
def test_a_joined_retry_after_of_dates_waits_for_the_latest(value):
    assert read({"Retry-After": value}, now=BEFORE_RFC_DATE).retry_after == 23


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_a_retry_after_date_in_the_past_means_no_wait(value, local_time_zone):
    info = read({"Retry-After": value})
    assert (info.retry_after, info.wait_seconds(), info.rejected) == (0, 0, ())


def test_a_retry_after_date_exactly_now_means_no_wait():
    assert read({"Retry-After": http_date(NOW)}).retry_after == 0


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Fri, 31 Dec 9999 23:59:59 GMT", id="year-9999"),
        pytest.param("Fri, 31 Dec 9999 23:59:59 -1400", id="year-9999-latest-zone"),
        pytest.param(http_date(NOW + timedelta(days=3650)), id="ten-years"),
        pytest.param(http_date(NOW + timedelta(days=7, seconds=1)), id="one-second-past-seven-days"),
    ],
)
def test_a_retry_after_date_beyond_seven_days_is_rejected(value):
    info = read({"Retry-After": value})
    assert info.retry_after is None
    (reason,) = info.rejected
    assert reason.startswith("Retry-After: ") and "beyond 7 days" in reason


def test_a_retry_after_date_exactly_seven_days_away_is_read():
    assert read({"Retry-After": http_date(NOW + timedelta(days=7))}).retry_after == MAX_HORIZON_SECONDS


def test_a_retry_after_date_is_measured_against_a_now_in_any_time_zone(local_time_zone):
    now_in_india = BEFORE_RFC_DATE.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert read({"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT"}, now=now_in_india).retry_after == 23


def test_a_naive_now_is_read_as_utc():
    assert read({"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT"}, now=BEFORE_RFC_DATE.replace(tzinfo=None)).retry_after == 23


@pytest.mark.parametrize(
    "local_clock_skew",
    [
        pytest.param(timedelta(minutes=10), id="local-clock-ahead"),
        pytest.param(timedelta(minutes=-10), id="local-clock-behind"),
        pytest.param(timedelta(days=-400), id="local-clock-far-behind"),
        pytest.param(timedelta(days=400), id="local-clock-far-ahead"),
    ],
)
def test_a_retry_after_date_is_measured_against_the_servers_date_header(local_clock_skew, local_time_zone):
    # The server says it is 08:49:14 and asks for 08:49:37: 23 seconds, whatever our clock says.
    headers = {"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT", "Date": "Sun, 06 Nov 1994 08:49:14 GMT"}
    info = read(headers, now=BEFORE_RFC_DATE + local_clock_skew)
    assert (info.retry_after, info.rejected) == (23, ())


def test_the_servers_date_header_is_found_whatever_its_case():
    headers = {"retry-after": "Sun, 06 Nov 1994 08:49:37 GMT", "DATE": "Sun, 06 Nov 1994 08:49:14 GMT"}
    assert read(headers).retry_after == 23


@pytest.mark.parametrize("date", ["", "yesterday", "Sun, 32 Nov 1994 08:49:37 GMT", "٤٢", "1714564800"])
def test_an_unreadable_date_header_is_listed_and_the_local_clock_used(date):
    info = read({"Retry-After": "Sun, 06 Nov 1994 08:49:37 GMT", "Date": date}, now=BEFORE_RFC_DATE)
    assert info.retry_after == 23
    (reason,) = info.rejected
    assert reason.startswith("Date: ") and "local clock" in reason


def test_the_date_header_does_not_change_delay_seconds_and_is_not_even_read():
    info = read({"Retry-After": "30", "Date": "not a date"})
    assert (info.retry_after, info.rejected) == (30, ())


# -- X-RateLimit-*: delta, epoch seconds, epoch milliseconds ------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("0", 0, id="delta-zero"),
        pytest.param("30", 30, id="delta"),
        pytest.param("2.5", 2.5, id="delta-fraction"),
        pytest.param(str(NOW_EPOCH + 90), 90, id="epoch-seconds"),
        pytest.param(f"{NOW_EPOCH + 12}.5", 12.5, id="epoch-seconds-fraction"),
        pytest.param(str((NOW_EPOCH + 90) * 1000), 90, id="epoch-milliseconds"),
        pytest.param(str((NOW_EPOCH + 90) * 1000 + 250), 90.25, id="epoch-milliseconds-odd"),
        pytest.param(f"{(NOW_EPOCH + 90) * 1000}.5", 90.0005, id="epoch-milliseconds-fraction"),
        pytest.param(str(NOW_EPOCH - 1), 0, id="epoch-seconds-just-past"),
        pytest.param(str((NOW_EPOCH - 86400) * 1000), 0, id="epoch-milliseconds-a-day-ago"),
        pytest.param(str(EPOCH_SECONDS_FROM), 0, id="the-first-epoch-second-2001"),
        pytest.param(str(EPOCH_MILLISECONDS_FROM), 0, id="the-first-epoch-millisecond-2001"),
    ],
)
def test_x_ratelimit_reset_is_read_as_delta_epoch_seconds_or_epoch_milliseconds(value, seconds):
    info = read({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": value})
    assert info.reset_after == pytest.approx(seconds, abs=1e-6)
    assert (info.remaining, info.source, info.rejected) == (0, "X-RateLimit-Reset", ())
    assert info.wait_seconds() == info.reset_after


def test_the_headline_millisecond_reset_on_a_200_is_a_ninety_second_block_not_the_year_58887():
    # The finding: X-RateLimit-Remaining: 0 with the reset in epoch milliseconds on a 200.
    info = read({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str((NOW_EPOCH + 90) * 1000)}, status=200)
    assert info.quota_exhausted
    assert info.reset_after == 90
    assert info.wait_seconds() == 90


@pytest.mark.parametrize(
    ("value", "distance"),
    [
        pytest.param(str(EPOCH_SECONDS_FROM - 1), "32 years", id="largest-delta-is-32-years"),
        pytest.param(str(EPOCH_MILLISECONDS_FROM - 1), "31,634 years", id="largest-epoch-second-is-year-33658"),
        pytest.param(str(1_700_000_000_000_000), "53,815 years", id="epoch-microseconds"),
        pytest.param(str(NOW_EPOCH + 8 * 86400), "8 days", id="epoch-eight-days-ahead"),
        pytest.param("9" * 40, "endlessly far", id="forty-digits"),
    ],
)
def test_an_x_ratelimit_reset_beyond_seven_days_is_rejected_with_how_far_it_was(value, distance):
    info = read({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": value})
    assert info.reset_after is None
    assert info.remaining == 0
    assert info.wait_seconds() is None
    (reason,) = info.rejected
    assert reason.startswith("X-RateLimit-Reset: ")
    assert f"is {distance} away (beyond 7 days)" in reason


@pytest.mark.parametrize(
    "skew",
    [timedelta(minutes=5), timedelta(minutes=-5), timedelta(days=-300), timedelta(days=300)],
    ids=["local-ahead", "local-behind", "local-far-behind", "local-far-ahead"],
)
@pytest.mark.parametrize("unit", [1, 1000], ids=["epoch-seconds", "epoch-milliseconds"])
def test_an_epoch_reset_is_measured_against_the_responses_date(skew, unit):
    # The server's clock says NOW and resets 90 s later; ours is off by `skew`.
    headers = {
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str((NOW_EPOCH + 90) * unit),
        "Date": http_date(NOW),
    }
    info = read(headers, now=NOW + skew)
    assert (info.reset_after, info.rejected) == (90, ())


def test_an_epoch_reset_without_a_date_header_is_measured_against_now(local_time_zone):
    now_elsewhere = NOW.astimezone(timezone(timedelta(hours=-11)))
    assert read({"X-RateLimit-Reset": str(NOW_EPOCH + 90)}, now=now_elsewhere).reset_after == 90


def test_a_delta_reset_ignores_the_date_header():
    info = read({"X-RateLimit-Reset": "30", "Date": http_date(NOW - timedelta(days=30))})
    assert info.reset_after == 30


def test_an_empty_x_ratelimit_reset_is_rejected_as_empty():
    assert read({"X-RateLimit-Reset": " "}).rejected == ("X-RateLimit-Reset: ' ' is empty",)


@pytest.mark.parametrize("value", ["soon", "-30", "+30", "1e9", "0x10", "٤٢", "1.", ".5", "NaN", "Infinity"])
def test_a_malformed_x_ratelimit_reset_is_rejected_with_a_reason(value):
    info = read({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": value})
    assert (info.reset_after, info.remaining) == (None, 0)
    (reason,) = info.rejected
    assert reason.startswith("X-RateLimit-Reset: ") and "is not a number" in reason


@pytest.mark.parametrize(
    ("value", "remaining"),
    [("0", 0), (" 0 ", 0), ("4999", 4999), ("0, 0", 0), ("5, 0", 0), ("10, 10;w=1", 10)],
)
def test_x_ratelimit_remaining_is_the_fewest_of_its_values(value, remaining):
    info = read({"X-RateLimit-Remaining": value})
    assert (info.remaining, info.rejected) == (remaining, ())


def test_an_unreadable_remaining_count_does_not_hide_a_valid_reset():
    info = read({"X-RateLimit-Remaining": "lots", "X-RateLimit-Reset": "30"})
    assert (info.remaining, info.reset_after, info.source) == (None, 30, "X-RateLimit-Reset")
    assert info.rejected == ("X-RateLimit-Remaining: 'lots' is not a count",)


def test_x_ratelimit_limit_is_read_alongside_and_an_unreadable_one_is_only_listed():
    assert read({"X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "4999"}).limit == 5000
    info = read({"X-RateLimit-Limit": "many", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "5"})
    assert (info.limit, info.remaining, info.reset_after) == (None, 0, 5)
    assert info.rejected == ("X-RateLimit-Limit: 'many' is not a count",)


def test_the_x_ratelimit_limit_alone_is_not_a_quota_reading():
    assert read({"X-RateLimit-Limit": "60"}) == RateLimitInfo(rate_limit_status=True)


# -- RateLimit / RateLimit-Policy: the structured fields ------------------------------------------


def test_several_named_policies_the_spent_one_wins_with_its_own_limit_and_window():
    info = read(
        {
            "RateLimit": '"default";r=0;t=30, "burst";r=5;t=1',
            "RateLimit-Policy": '"default";q=100;w=60, "burst";q=10;w=1',
        }
    )
    assert (info.remaining, info.reset_after, info.source) == (0, 30, "RateLimit")
    assert (info.limit, info.window) == (100, 60)
    assert info.interval == pytest.approx(0.6)  # default: 60 s / 100, slower than burst's 1 s / 10
    assert info.wait_seconds() == 30
    assert info.rejected == ()


@pytest.mark.parametrize(
    ("value", "remaining", "reset"),
    [
        pytest.param('"default";r=0;t=30', 0, 30, id="draft-example"),
        pytest.param('"default"; r=0; t=30', 0, 30, id="whitespace-around-parameters"),
        pytest.param('"default";R=0;T=30', 0, 30, id="parameter-names-any-case"),
        pytest.param('"burst";r=0;t=10, "daily";r=5;t=60', 0, 10, id="the-spent-policy-not-the-longer-reset"),
        pytest.param('"burst";r=0;t=10, "daily";r=0;t=60', 0, 60, id="two-spent-the-longest-reset"),
        pytest.param('"a";r=7;t=10, "b";r=3;t=20', 3, 20, id="the-fewest-remaining"),
        pytest.param('"a";r=3;t=10, "b";r=3;t=20', 3, 20, id="as-few-remaining-the-later-reset"),
        pytest.param('"default";t=30', None, 30, id="remaining-not-stated"),
        pytest.param('"a";t=30, "b";t=50', None, 50, id="remaining-never-stated-the-latest-reset"),
        pytest.param('"default";r=0', 0, None, id="reset-not-stated"),
        pytest.param('"a,b;c";r=0;t=5', 0, 5, id="a-name-with-a-comma-and-a-semicolon"),
        pytest.param('"default";r=0;t=30;pk=:cHJvamVjdC0xMjM=:', 0, 30, id="partition-key-ignored"),
        pytest.param("default;r=0;t=30", 0, 30, id="token-name"),
    ],
)
def test_the_structured_ratelimit_field_the_most_restrictive_policy_wins(value, remaining, reset):
    info = read({"RateLimit": value})
    assert (info.remaining, info.reset_after, info.rejected) == (remaining, reset, ())
    assert info.source == ("RateLimit" if reset is not None else None)


def test_a_structured_field_with_quota_left_asks_no_wait_but_keeps_its_reset_and_pace():
    info = read({"RateLimit": '"default";r=5;t=30', "RateLimit-Policy": '"default";q=10;w=60'}, status=200)
    assert (info.remaining, info.reset_after, info.limit, info.window, info.interval) == (5, 30, 10, 60, 6)
    assert info.wait_seconds() is None


def test_the_structured_field_on_a_200_with_no_quota_left_asks_the_wait():
    info = read({"RateLimit": '"default";r=0;t=30'}, status=200)
    assert info.quota_exhausted and info.wait_seconds() == 30


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param('"default";r=0;t=soon', "is not a number of seconds", id="reset-not-a-number"),
        pytest.param('"default";r=-1;t=30', "is not a count", id="negative-remaining"),
        pytest.param(f'"default";r=0;t={TEN_YEARS}', "10 years away (beyond 7 days)", id="ten-year-reset"),
        pytest.param(" , ", "names no policy", id="no-member"),
    ],
)
def test_a_malformed_structured_field_is_rejected_and_the_x_headers_still_read(value, problem):
    info = read({"RateLimit": value, "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "40"})
    assert (info.reset_after, info.source) == (40, "X-RateLimit-Reset")
    (reason,) = info.rejected
    assert reason.startswith("RateLimit: ") and problem in reason


def test_the_draft_07_dictionary_form_of_ratelimit_is_read():
    info = read({"RateLimit": "limit=10, remaining=0, reset=7", "RateLimit-Policy": "10;w=1"})
    assert (info.limit, info.remaining, info.reset_after, info.source) == (10, 0, 7, "RateLimit")
    assert (info.window, info.interval) == (1, 0.1)


@pytest.mark.parametrize(
    ("policy", "interval", "window"),
    [
        pytest.param('"default";q=100;w=60', 0.6, 60, id="named"),
        pytest.param('"a";q=10;w=1, "b";q=100;w=3600', 36, 3600, id="several-named-the-slowest"),
        pytest.param("5;w=5", 1, 5, id="draft-06-form"),
        pytest.param("10;w=1, 50;w=60", 1.2, 60, id="draft-06-several"),
        pytest.param('"default";q=0;w=60', None, None, id="a-quota-of-zero-sets-no-pace"),
        pytest.param('"default";q=10', None, None, id="no-window"),
    ],
)
def test_ratelimit_policy_gives_the_pace_of_the_slowest_policy(policy, interval, window):
    info = read({"RateLimit-Policy": policy}, status=200)
    assert (info.interval, info.window) == (pytest.approx(interval) if interval else None, window)
    assert info.wait_seconds() is None


def test_an_unreadable_policy_member_is_listed_and_the_others_still_count():
    info = read({"RateLimit-Policy": '"a";q=10;w=1, "b";q=x;w=60'}, status=200)
    assert info.interval == 0.1
    assert info.rejected == ('RateLimit-Policy: \'"a";q=10;w=1, "b";q=x;w=60\' is not a count',)


def test_a_ratelimit_policy_window_beyond_seven_days_is_rejected():
    info = read({"RateLimit-Policy": f"1;w={TEN_YEARS}"}, status=200)
    assert info.interval is None
    (reason,) = info.rejected
    assert reason.startswith("RateLimit-Policy: ") and "beyond 7 days" in reason


# -- RateLimit-Limit / -Remaining / -Reset (drafts up to 06) --------------------------------------


def test_the_older_draft_fields_with_a_policy():
    info = read(
        {"RateLimit-Limit": "5", "RateLimit-Remaining": "0", "RateLimit-Reset": "5", "RateLimit-Policy": "5;w=5"}
    )
    assert (info.limit, info.remaining, info.reset_after, info.source) == (5, 0, 5, "RateLimit-Reset")
    assert (info.window, info.interval) == (5, 1)
    assert info.wait_seconds() == 5


def test_the_older_draft_limit_in_list_form_gives_its_first_number():
    info = read({"RateLimit-Limit": "10, 10;w=1, 50;w=60", "RateLimit-Remaining": "3"}, status=200)
    assert (info.limit, info.remaining) == (10, 3)


def test_a_ratelimit_reset_sent_as_an_epoch_is_read_as_one():
    # Against the draft, but some servers do; 10**9 seconds is no plausible delta either way.
    assert read({"RateLimit-Reset": str((NOW_EPOCH + 45) * 1000)}).reset_after == 45


# -- Precedence, source, names --------------------------------------------------------------------


def test_the_structured_field_comes_before_the_older_fields_and_those_before_the_x_fields():
    everything = {
        "RateLimit": '"p";r=0;t=30',
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "40",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "50",
    }
    assert (read(everything).reset_after, read(everything).source) == (30, "RateLimit")
    del everything["RateLimit"]
    assert (read(everything).reset_after, read(everything).source) == (40, "RateLimit-Reset")
    del everything["RateLimit-Reset"], everything["RateLimit-Remaining"]
    assert (read(everything).reset_after, read(everything).source) == (50, "X-RateLimit-Reset")


def test_retry_after_is_the_source_and_the_wait_even_when_a_reset_asks_for_more():
    info = read({"Retry-After": "5", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "50"})
    assert (info.retry_after, info.reset_after, info.source, info.wait_seconds()) == (5, 50, "Retry-After", 5)


def test_a_rejected_retry_after_leaves_the_reset_as_the_wait():
    info = read({"Retry-After": "soon", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
    assert (info.source, info.wait_seconds()) == ("X-RateLimit-Reset", 30)
    assert len(info.rejected) == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "7"},
        {"RETRY-AFTER": "7"},
        {"rEtRy-AfTeR": "7"},
        CaseInsensitiveDict({"Retry-After": "7"}),
        {b"Retry-After": b"7"},
        [("Retry-After", "7")],
    ],
    ids=["lower", "upper", "mixed", "requests-dict", "bytes", "pairs"],
)
def test_headers_are_found_whatever_the_case_the_type_or_the_container(headers):
    assert read(headers).retry_after == 7


# -- wait_seconds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "wait"),
    [
        pytest.param(RateLimitInfo(), None, id="nothing-said"),
        pytest.param(RateLimitInfo(retry_after=0.0), 0.0, id="retry-after-zero-is-an-answer"),
        pytest.param(RateLimitInfo(retry_after=5.0, reset_after=50.0, remaining=0), 5.0, id="retry-after-first"),
        pytest.param(RateLimitInfo(reset_after=50.0, remaining=0), 50.0, id="spent-quota"),
        pytest.param(RateLimitInfo(reset_after=50.0, remaining=3, rate_limit_status=True), None, id="quota-left"),
        pytest.param(RateLimitInfo(reset_after=50.0, rate_limit_status=True), 50.0, id="no-count-rate-limited"),
        pytest.param(RateLimitInfo(reset_after=50.0), None, id="no-count-not-rate-limited"),
        pytest.param(RateLimitInfo(remaining=0), None, id="spent-without-a-reset"),
    ],
)
def test_wait_seconds_is_the_servers_wait_or_none(info, wait):
    assert info.wait_seconds() == wait


@pytest.mark.parametrize(("status", "rate_limited"), [(429, True), (503, True), (403, True), (200, False), (500, False)])
def test_a_reset_without_a_remaining_count_is_a_wait_only_on_a_rate_limit_status(status, rate_limited):
    info = read({"X-RateLimit-Reset": "30"}, status=status)
    assert info.rate_limit_status is rate_limited
    assert info.wait_seconds() == (30 if rate_limited else None)


# -- lower_headers --------------------------------------------------------------------------------


def test_lower_headers_joins_a_field_sent_twice_as_http_does():
    assert lower_headers([("Retry-After", "120"), ("retry-after", "60")]) == {"retry-after": "120, 60"}


def test_lower_headers_reads_bytes_as_latin_1():
    assert lower_headers({b"X-Name": b"caf\xe9"}) == {"x-name": "café"}


@pytest.mark.parametrize(
    "headers",
    [
        HTTPHeaderDict([("Retry-After", "120"), ("Retry-After", "60")]),
        CIMultiDict([("Retry-After", "120"), ("retry-after", "60")]),
    ],
    ids=["urllib3", "aiohttp"],
)
def test_a_retry_after_sent_twice_by_a_real_client_container_gives_the_longer_wait(headers):
    assert read(headers).retry_after == 120


@pytest.mark.parametrize("headers", [None, 42, "Retry-After: 5", object(), [("only-a-name",)]])
def test_lower_headers_of_something_that_is_not_headers_is_empty(headers):
    assert lower_headers(headers) == {}


# -- Never raises ---------------------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {"Retry-After": None},
        {"Retry-After": 5},
        {"Retry-After": 5.5},
        {"Retry-After": Unprintable()},
        {Unprintable(): "5"},
        {"Retry-After": "\x00" * 10},
        {"Retry-After": "9" * 1_000_000},
        {"X-RateLimit-Reset": "1" + "0" * 5000, "X-RateLimit-Remaining": "0"},
        {"RateLimit": '"' * 3001},
        {"RateLimit": ";" * 4000},
        {"RateLimit-Policy": "0;w=0"},
        {"Retry-After": "Mon, 01 Jan 0001 00:00:00 +2359"},
        {"Date": "Fri, 31 Dec 9999 23:59:59 -2359", "X-RateLimit-Reset": str(NOW_EPOCH)},
    ],
)
def test_odd_header_values_never_raise(headers):
    info = read(headers)
    assert isinstance(info, RateLimitInfo)
    assert_bounded(info)


def test_a_huge_value_is_not_read_and_says_why():
    (reason,) = read({"Retry-After": "9" * 1_000_000}).rejected
    assert reason == "Retry-After: a 1,000,000-character value is not read"


def test_a_now_that_is_not_a_datetime_is_a_stated_failure_not_an_exception():
    info = read_rate_limit_headers(429, {"Retry-After": "5"}, now="12:00")  # type: ignore[arg-type]
    assert info.retry_after is None
    assert info.rejected == ("rate-limit headers unreadable: AttributeError",)


# -- Properties -----------------------------------------------------------------------------------

RATE_LIMIT_NAMES = [
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "date",
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


latin_1 = st.binary(max_size=40).map(lambda raw: raw.decode("latin-1"))
numbers = st.one_of(
    st.integers(min_value=-(10**16), max_value=10**30).map(str),
    st.from_regex(r"\A[0-9]{1,20}(\.[0-9]{1,5})?\Z"),
    st.floats().map(str),
)
header_values = st.one_of(
    st.text(max_size=40),
    latin_1,
    st.builds(lambda a, n, b: f"{a}{n}{b}", OWS, numbers, OWS),
    st.lists(numbers, min_size=2, max_size=3).map(", ".join),
    http_dates(),
    st.builds(
        lambda name, r, t: f'"{name}";r={r};t={t}',
        st.sampled_from(["default", "burst", "a,b"]),
        st.one_of(numbers, st.text(max_size=5)),
        st.one_of(numbers, st.text(max_size=5)),
    ),
    st.builds(lambda q, w: f'"default";q={q};w={w}', numbers, numbers),
)
header_names = st.one_of(
    st.sampled_from(RATE_LIMIT_NAMES).flatmap(lambda name: st.sampled_from([name, name.upper(), name.title()])),
    st.text(max_size=20),
    latin_1,
)
nows = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=14)), timezone(timedelta(hours=-11))]),
)


def assert_bounded(info: RateLimitInfo) -> None:
    for seconds in (info.retry_after, info.reset_after, info.window, info.interval, info.wait_seconds()):
        assert seconds is None or (math.isfinite(seconds) and 0 <= seconds <= MAX_HORIZON_SECONDS)
    for count in (info.remaining, info.limit):
        assert count is None or 0 <= count < 10**15


def rejected_names(info: RateLimitInfo) -> set[str]:
    return {reason.split(":", 1)[0].lower() for reason in info.rejected}


@PROPERTY_SETTINGS
@given(
    status=st.integers(min_value=0, max_value=999),
    headers=st.lists(st.tuples(header_names, header_values), max_size=8),
    as_bytes=st.booleans(),
    now=nows,
)
def test_any_headers_give_bounded_times_or_a_stated_rejection_and_never_raise(status, headers, as_bytes, now):
    if as_bytes:
        headers = [(name.encode("utf-8"), value.encode("utf-8")) for name, value in headers]
    info = read_rate_limit_headers(status, headers, now=now)

    assert_bounded(info)
    lowered = lower_headers(headers)
    if "retry-after" in lowered:
        assert (info.retry_after is not None) != ("retry-after" in rejected_names(info))
    quota_fields = {"ratelimit", "ratelimit-reset", "ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-remaining"}
    if quota_fields & lowered.keys() and info.remaining is None and info.reset_after is None:
        # Quota headers were sent and none gave anything: the ones that failed say why.
        assert rejected_names(info) & quota_fields


@PROPERTY_SETTINGS
@given(seconds=st.integers(min_value=0, max_value=MAX_HORIZON_SECONDS), before=OWS, after=OWS)
def test_any_valid_delay_seconds_within_the_horizon_is_read_exactly(seconds, before, after):
    assert read({"Retry-After": f"{before}{seconds}{after}"}).retry_after == seconds


@PROPERTY_SETTINGS
@given(
    ahead=st.integers(min_value=0, max_value=MAX_HORIZON_SECONDS),
    now=st.datetimes(min_value=datetime(2002, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(timezone.utc)),
)
def test_an_epoch_reset_in_seconds_or_milliseconds_is_the_same_wait(ahead, now):
    now = now.replace(microsecond=0)
    epoch = int(now.timestamp()) + ahead
    in_seconds = read({"X-RateLimit-Reset": str(epoch)}, now=now).reset_after
    in_milliseconds = read({"X-RateLimit-Reset": str(epoch * 1000)}, now=now).reset_after
    assert in_seconds == in_milliseconds == ahead


@PROPERTY_SETTINGS
@given(beyond=st.integers(min_value=1, max_value=10**15))
def test_any_delay_beyond_the_horizon_is_rejected(beyond):
    info = read({"Retry-After": str(MAX_HORIZON_SECONDS + beyond)})
    assert info.retry_after is None
    assert rejected_names(info) == {"retry-after"}
