"""Declared rate limits and gate keys (network_requests.configured_limits): parsing, the
error a user sees for each mistake, and the gate key rule."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from network_requests.configured_limits import (
    MAX_LIMITS,
    MAX_PER_SECONDS,
    SHARED_KEY_PREFIX,
    ConfiguredLimit,
    GateKey,
    declared_limits,
    describe_limits,
    limits_from_extra,
    parse_duration,
    parse_limits,
    resolve_gate_key,
)


class TestDurations:
    @pytest.mark.parametrize(
        "text, seconds",
        [
            ("1s", 1.0),
            ("500ms", 0.5),
            ("1m", 60.0),
            ("1h", 3600.0),
            ("1d", 86400.0),
            ("1.5s", 1.5),
            (" 30s ", 30.0),
            ("7d", 7 * 86400.0),
            (60, 60.0),
            (0.25, 0.25),
        ],
    )
    def test_a_duration_is_a_number_with_a_unit_or_seconds(self, text, seconds):
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize(
        "value",
        ["1 hour", "1H", "h", "1", "-1s", "1e3s", "", "1s1m", "∞s", True, None, [1], float("nan"), float("inf")],
    )
    def test_anything_else_is_refused_naming_the_field_the_value_and_the_rule(self, value):
        with pytest.raises(ValueError) as error:
            parse_duration(value, field="rate_limit.per")
        message = str(error.value)
        assert message.startswith("rate_limit.per: ")
        assert repr(value)[:20] in message
        assert "'1h'" in message or "from" in message

    @pytest.mark.parametrize("value", [0, "0s", "0.0001s", "8d", MAX_PER_SECONDS + 1])
    def test_a_duration_beyond_what_the_gate_can_hold_is_refused_with_its_range(self, value):
        with pytest.raises(ValueError, match=r"^per: .* is not a duration from 1ms to 7d \(the gate's horizon\)$"):
            parse_duration(value)

    def test_the_error_for_a_duration_in_words_reads_as_the_issue_shows_it(self):
        with pytest.raises(ValueError) as error:
            parse_limits({"requests": 5000, "per": "1 hour"})
        assert str(error.value) == "rate_limit.per: '1 hour' is not a duration like '1h', '30s', '500ms' or 60"


class TestParseLimits:
    def test_one_limit_with_its_burst(self):
        assert parse_limits({"requests": 5000, "per": "1h", "burst": 100}) == (ConfiguredLimit(5000, 3600.0, 100),)

    def test_burst_defaults_to_requests_so_a_whole_quota_may_go_at_once(self):
        (limit,) = parse_limits({"requests": 10, "per": "1s"})
        assert limit.burst == 10
        assert limit.windows == ((10, 1.0),)

    def test_a_burst_below_requests_adds_a_shorter_window(self):
        (limit,) = parse_limits({"requests": 5000, "per": "1h", "burst": 100})
        assert limit.interval == 0.72
        assert limit.windows == ((5000, 3600.0), (100, pytest.approx(72.0)))

    def test_burst_one_spaces_requests_evenly(self):
        (limit,) = parse_limits({"requests": 10, "per": "1s", "burst": 1})
        assert limit.windows == ((10, 1.0), (1, 0.1))

    def test_several_limits_at_once(self):
        limits = parse_limits([{"requests": 10, "per": "1s"}, {"requests": 5000, "per": "1h"}])
        assert limits == (ConfiguredLimit(10, 1.0, 10), ConfiguredLimit(5000, 3600.0, 5000))
        assert describe_limits(limits) == "10 per 1s; 5000 per 1h"

    def test_a_json_text_is_read_as_what_it_holds(self):
        assert parse_limits('{"requests": 2, "per": 60}') == (ConfiguredLimit(2, 60.0, 2),)

    @pytest.mark.parametrize("nothing", [None, [], ()])
    def test_nothing_declared_is_no_limit(self, nothing):
        assert parse_limits(nothing) == ()

    def test_limit_objects_pass_through(self):
        limit = ConfiguredLimit(3, 1.0, 1)
        assert parse_limits([limit]) == (limit,)

    def test_a_whole_float_count_is_accepted(self):
        # JSON from some tools writes 5000.0.
        assert parse_limits({"requests": 5000.0, "per": "1h"})[0].requests == 5000

    @pytest.mark.parametrize(
        "declaration, message",
        [
            ({"requests": 0, "per": "1s"}, "rate_limit.requests: 0 is not a whole number from 1 to 1,000,000,000"),
            ({"requests": 1.5, "per": "1s"}, "rate_limit.requests: 1.5 is not a whole number from 1"),
            ({"requests": "10", "per": "1s"}, "rate_limit.requests: '10' is not a whole number from 1"),
            ({"requests": True, "per": "1s"}, "rate_limit.requests: True is not a whole number"),
            ({"requests": 10**10, "per": "1s"}, "rate_limit.requests: 10000000000 is not a whole number"),
            ({"per": "1s"}, "rate_limit.requests is missing (a limit needs requests and per)"),
            ({"requests": 10}, "rate_limit.per is missing"),
            ({"requests": 10, "per": "1s", "burst": 11}, "rate_limit.burst: 11 is not a whole number from 1 to requests"),
            ({"requests": 10, "per": "1s", "burst": 0}, "rate_limit.burst: 0 is not a whole number from 1 to requests"),
            ({"request": 10, "per": "1s"}, "rate_limit: unknown field 'request' (the fields are requests, per, burst)"),
            ("not json", "rate_limit: 'not json' is not JSON"),
            (42, "rate_limit: 42 is not a limit; expected an object like"),
            ([{"requests": 1, "per": "1s"}, "1/s"], "rate_limit[1]: '1/s' is not an object like"),
            ([{"requests": 1, "per": "1s"}, {"requests": 2, "per": "x"}], "rate_limit[1].per: 'x' is not a duration"),
            ([{"requests": 1, "per": 1}] * (MAX_LIMITS + 1), f"rate_limit: {MAX_LIMITS + 1} limits; at most"),
        ],
    )
    def test_each_mistake_is_a_value_error_naming_the_field_the_value_and_the_rule(self, declaration, message):
        with pytest.raises(ValueError) as error:
            parse_limits(declaration)
        assert str(error.value).startswith(message)

    def test_a_limit_built_directly_is_checked_by_the_same_rules(self):
        with pytest.raises(ValueError, match="burst: 5 is not a whole number from 1 to requests \\(2\\)"):
            ConfiguredLimit(2, 1.0, 5)

    def test_describe_names_the_burst_only_when_it_is_not_the_whole_quota(self):
        assert ConfiguredLimit(5000, 3600.0, 100).describe() == "5000 per 1h, burst 100"
        assert ConfiguredLimit(2, 0.5, 2).describe() == "2 per 500ms"
        assert ConfiguredLimit(7, 90.0, 7).describe() == "7 per 90s"


@given(
    requests=st.integers(1, 10**9),
    per=st.floats(min_value=0.001, max_value=MAX_PER_SECONDS, allow_nan=False),
    burst_fraction=st.floats(0, 1),
)
def test_a_limits_key_reads_back_as_the_same_limit(requests, per, burst_fraction):
    limit = ConfiguredLimit(requests, per, max(1, round(requests * burst_fraction)))
    assert ConfiguredLimit.from_key(limit.key) == limit


@pytest.mark.parametrize(
    "key", ["", "1/2", "a/1.0/1", "1/1.0/b", "0/1.0/1", "1/nan/1", "1/inf/1", "2/1.0/3", "1/1.0/1/1"]
)
def test_a_stored_key_that_describes_no_limit_is_refused(key):
    with pytest.raises(ValueError):
        ConfiguredLimit.from_key(key)


class TestConnectionAndOperator:
    EXTRA = {"rate_limit": {"requests": 10, "per": "1s"}, "timeout": 5}

    def test_the_connections_extra_declares_limits_under_rate_limit(self):
        assert limits_from_extra(self.EXTRA) == (ConfiguredLimit(10, 1.0, 10),)
        assert limits_from_extra(json.dumps(self.EXTRA)) == (ConfiguredLimit(10, 1.0, 10),)

    @pytest.mark.parametrize("extra", [None, "", {}, {"timeout": 5}, "[1, 2]", "{broken"])
    def test_an_extra_without_a_declaration_declares_no_limit(self, extra):
        assert limits_from_extra(extra) == ()

    def test_a_bad_declaration_in_the_extra_is_an_error_not_silence(self):
        with pytest.raises(ValueError, match="rate_limit.per"):
            limits_from_extra({"rate_limit": {"requests": 10, "per": "fast"}})

    def test_the_operators_argument_replaces_the_connections_limits(self):
        assert declared_limits({"requests": 1, "per": "1m"}, self.EXTRA) == (ConfiguredLimit(1, 60.0, 1),)

    def test_an_empty_argument_declares_no_limit_even_if_the_connection_does(self):
        assert declared_limits([], self.EXTRA) == ()

    def test_no_argument_takes_the_connections_limits(self):
        assert declared_limits(None, self.EXTRA) == (ConfiguredLimit(10, 1.0, 10),)


class TestGateKey:
    def test_by_default_a_request_counts_against_its_connections_own_gate_with_the_origin_checked(self):
        assert resolve_gate_key("github") == GateKey("github", checks_origin=True)

    @pytest.mark.parametrize("blank", ["", "   "])
    def test_a_blank_rendered_key_is_the_default(self, blank):
        assert resolve_gate_key("github", blank) == GateKey("github", checks_origin=True)

    def test_an_explicit_key_is_shared_across_connections_without_an_origin_check(self):
        api = resolve_gate_key("github_api", "github-token-1")
        uploads = resolve_gate_key("github_uploads", "github-token-1")
        assert api == uploads == GateKey(SHARED_KEY_PREFIX + "github-token-1", checks_origin=False)

    def test_an_explicit_key_equal_to_a_connection_id_does_not_take_over_that_connections_gate(self):
        # Otherwise the Connection's own requests (origin checked) and the shared ones (not)
        # would reset each other's state whenever their base URLs differ.
        assert resolve_gate_key("other", "github").name != resolve_gate_key("github").name

    def test_a_per_route_key_splits_one_connection_into_quotas(self):
        assert resolve_gate_key("api", "api:search") != resolve_gate_key("api", "api:core")

    @pytest.mark.parametrize(
        "key, message",
        [
            ("x" * 201, "is longer than 200 characters"),
            ("a\nb", "contains a control character"),
            (7, "is not a string"),
        ],
    )
    def test_an_unusable_key_is_refused(self, key, message):
        with pytest.raises(ValueError, match=f"^gate_key: .*{message}"):
            resolve_gate_key("api", key)
