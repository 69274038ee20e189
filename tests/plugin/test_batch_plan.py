"""The pure parts of the batch mode (network_requests.batch_plan): what a list of requests
becomes, what a run still sends, when an item is tried again, and what the batch came to."""

from __future__ import annotations

from datetime import timedelta

import pytest

from network_requests.batch_plan import (
    FAILED,
    MAX_FAILED_IN_SUMMARY,
    OK,
    allowed_failures,
    default_output_name,
    failure_message,
    item_retry_delay,
    items_left,
    plan_batch,
    summarize,
    too_many_failures,
)
from network_requests.rate_limit import Backoff

# -- plan_batch ----------------------------------------------------------------------------------


def test_an_endpoint_or_a_dict_becomes_an_item_with_the_defaults_filled_in():
    items = plan_batch(["/a", {"endpoint": "/b", "method": "post", "data": {"x": 1}, "headers": {"X-Own": "1"}}],
                       method="GET", headers={"Accept": "application/json"})

    assert [(i.index, i.endpoint, i.method) for i in items] == [(0, "/a", "GET"), (1, "/b", "POST")]
    assert items[0].headers == {"Accept": "application/json"}
    assert items[1].headers == {"Accept": "application/json", "X-Own": "1"}
    assert items[1].data == {"x": 1}


def test_an_items_key_depends_on_what_it_sends_not_on_its_place_in_the_list():
    forward = plan_batch(["/a", "/b", {"endpoint": "/c", "method": "POST", "data": "1"}])
    backward = plan_batch([{"endpoint": "/c", "method": "POST", "data": "1"}, "/b", "/a"])

    assert {i.endpoint: i.key for i in forward} == {i.endpoint: i.key for i in backward}
    assert len({i.key for i in forward}) == 3


def test_another_body_is_another_item():
    one, two = plan_batch([{"endpoint": "/c", "method": "POST", "data": "1"}, {"endpoint": "/c", "method": "POST", "data": "2"}],
                          write_bodies=False)

    assert one.key != two.key


def test_output_names_are_made_from_the_endpoint_unless_given():
    items = plan_batch(["/api/items/42?full=1", {"endpoint": "/x", "output": "sub/x.json"}, {"endpoint": "/y", "method": "POST"}])

    assert [i.output for i in items] == ["api_items_42_full_1", "sub/x.json", "POST_y"]


def test_made_names_that_collide_get_a_suffix_from_their_request():
    first, second = plan_batch(["/a/b", "/a_b"])

    assert first.output != second.output
    assert first.output.startswith("a_b-") and second.output.startswith("a_b-")


def test_two_requests_given_the_same_output_are_not_a_batch():
    with pytest.raises(ValueError, match="same output"):
        plan_batch([{"endpoint": "/a", "output": "x.json"}, {"endpoint": "/b", "output": "x.json"}])


def test_the_same_request_twice_is_not_a_batch():
    with pytest.raises(ValueError, match=r"requests\[2\] repeats requests\[0\]"):
        plan_batch(["/a", "/b", "/a"], write_bodies=False)


@pytest.mark.parametrize("requests", ["/a", {"endpoint": "/a"}, [42], [{"path": "/a"}], [{"endpoint": "/a", "body": 1}]],
                         ids=["a_string", "a_dict", "not_an_endpoint", "no_endpoint", "unknown_key"])
def test_a_list_that_is_not_a_batch_is_refused_before_anything_is_sent(requests):
    with pytest.raises(ValueError):
        plan_batch(requests)


def test_no_requests_is_an_empty_batch():
    assert plan_batch(None) == () and plan_batch([]) == ()


@pytest.mark.parametrize("endpoint", ["http://evil.example/x", "//evil.example/x", "/a/../../etc", "/a\r\nX: 1"],
                         ids=["full_url", "protocol_relative", "dot_dot", "crlf"])
def test_an_endpoint_that_could_leave_the_connections_host_is_refused_and_the_rest_goes_on(endpoint):
    refused, fine = plan_batch([endpoint, "/fine"])

    assert refused.refused and not fine.refused


@pytest.mark.parametrize("output", ["/etc/passwd", "../x", "a/../../x", "a//b", "C:/x", "a\\b", ""],
                         ids=["absolute", "dot_dot", "inner_dot_dot", "empty_part", "drive", "backslash", "empty"])
def test_an_output_name_that_could_leave_the_output_folder_is_refused(output):
    (item,) = plan_batch([{"endpoint": "/a", "output": output}])

    assert item.refused and "output" in item.refused


def test_without_bodies_written_an_item_has_no_output_name():
    (item,) = plan_batch(["/a"], write_bodies=False)

    assert item.output is None and item.refused is None


def test_an_item_survives_a_json_round_trip():
    (item,) = plan_batch([{"endpoint": "/a", "method": "POST", "data": {"k": [1, 2]}, "headers": {"H": "v"}}])

    assert type(item).from_dict(item.to_dict()) == item


def test_a_made_output_name_keeps_only_safe_characters():
    assert default_output_name("GET", "/a b/ü?x=<1>") == "a_b_x_1"
    assert default_output_name("GET", "/") == "root"


# -- items_left ---------------------------------------------------------------------------------


def _records(**by_key):
    return {key: {"key": key, "status": status, "try": tried} for key, (status, tried) in by_key.items()}


def test_a_run_sends_what_is_not_done_and_not_given_up_on_in_this_try():
    a, b, c, d = plan_batch(["/a", "/b", "/c", "/d"])
    records = _records(**{a.key: (OK, 1), b.key: (FAILED, 2), c.key: (FAILED, 1)})

    assert items_left([a, b, c, d], records, try_number=2) == [c, d], (
        "done: never again; failed in this try: not again in this try; failed in an earlier try: again"
    )


def test_a_request_done_in_an_earlier_try_stays_done():
    (a,) = plan_batch(["/a"])

    assert items_left([a], _records(**{a.key: (OK, 1)}), try_number=5) == []


# -- item_retry_delay -----------------------------------------------------------------------------


def test_a_transient_failure_is_tried_again_after_a_growing_backoff_until_max_tries():
    backoff = Backoff(timedelta(seconds=2), multiplier=2.0, max_delay=timedelta(seconds=5), jitter=0.0)
    delays = [item_retry_delay(tries, max_tries=4, backoff=backoff, rand=lambda: 0.5) for tries in (1, 2, 3, 4)]

    assert delays == [2.0, 4.0, 5.0, None]


# -- allowed_failures, summarize ----------------------------------------------------------------


@pytest.mark.parametrize("allow, total, expected", [(0, 10, 0), (3, 10, 3), (0.1, 10, 1), (0.25, 10, 2), (1.0, 7, 7), (0.0, 5, 0)])
def test_allow_failures_is_a_count_or_a_fraction_of_the_batch(allow, total, expected):
    assert allowed_failures(allow, total) == expected


@pytest.mark.parametrize("allow", [-1, 1.5, float("nan"), "2", True, None])
def test_allow_failures_must_be_a_count_or_a_fraction(allow):
    with pytest.raises(ValueError):
        allowed_failures(allow, 10)


def _summary(items, records, allow=0, try_number=1):
    return summarize(items, records, try_number=try_number, allow_failures=allow, output_folder="/out",
                     checkpoint="/out/.batch/x.jsonl")


def test_the_summary_counts_the_outcomes_and_names_the_failed_requests():
    a, b, c, d = plan_batch(["/a", "/b", "/c", "/d"])
    records = _records(**{a.key: (OK, 1), b.key: (OK, 2), c.key: (FAILED, 2)})

    summary = _summary([a, b, c, d], records, allow=1, try_number=2)

    assert {k: summary[k] for k in ("total", "succeeded", "failed", "not_done", "succeeded_in_earlier_tries")} == {
        "total": 4, "succeeded": 2, "failed": 1, "not_done": 1, "succeeded_in_earlier_tries": 1}
    assert [f["request"] for f in summary["failed_items"]] == ["GET /c"]
    assert too_many_failures(summary), "a request not done fails the batch whatever allow_failures says"


def test_failures_within_the_allowance_do_not_fail_the_batch_and_one_more_does():
    items = plan_batch(["/a", "/b", "/c"])
    records = _records(**{items[0].key: (OK, 1), items[1].key: (FAILED, 1), items[2].key: (OK, 1)})

    assert not too_many_failures(_summary(items, records, allow=1))
    assert too_many_failures(_summary(items, records, allow=0))


def test_the_summary_names_a_bounded_number_of_failed_requests():
    items = plan_batch([f"/{i}" for i in range(MAX_FAILED_IN_SUMMARY + 30)])
    records = {i.key: {"key": i.key, "status": FAILED, "try": 1, "error": "404"} for i in items}

    summary = _summary(items, records)
    message = failure_message(summary)

    assert summary["failed"] == len(items) and len(summary["failed_items"]) == MAX_FAILED_IN_SUMMARY
    assert message.startswith(f"{len(items)} of {len(items)} requests failed (allowed: 0)")
    assert "[0] GET /0: 404" in message and f"and {len(items) - 5} more" in message and "/out/.batch/x.jsonl" in message
