"""The "Rate limits" page, mounted by the plugin on Airflow's real API server app (in-process).

Checks login like the rest of the UI, what it shows, and that nothing it shows can inject
markup: every value on the page comes from Variables that task code (and whoever can edit
Variables) writes.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from network_requests.gate import DAMAGED_STATE_BLOCK_SECONDS, HORIZON_SECONDS, GateState
from network_requests.ui import view
from tests.integration_airflow.airflow_helpers import api_client, delete_variable, set_variable, token

pytestmark = pytest.mark.usefixtures("airflow_db")

PAGE = "/network-requests/"
EVIL = '<script>alert("x")</script>"><img src=x onerror=alert(1)>'


def cookie(jwt: str) -> dict[str, str]:
    """The session cookie the UI's login sets (``_token``), as a browser sends it."""
    return {"Cookie": f"_token={jwt}"}


def section_of(html: str, conn: str) -> str:
    start = html.index(f'data-conn="{conn}"')
    end = html.find('<section class="connection"', start)
    return html[start : end if end != -1 else len(html)]


@pytest.fixture
def stored_state():
    """A blocked gate with queued tickets and three waits, one with hostile text everywhere."""
    now = time.time()
    gate = GateState(
        blocked_until=now + 40,
        remaining=0,
        limit=5,
        reset_at=now + 40,
        interval=1.5,
        tickets={"dag|run|fetch|0": now + 40, "dag|run|fetch|1": now + 41.5, EVIL: now + 43},
        updated_at=now - 2,
        origin="http://127.0.0.1:8090",
    )
    waits = [
        {"at": now - 120, "until": now - 110, "seconds": 10, "source": "Retry-After", "mode": "reschedule",
         "task": "periodic.fetch[0]", "url": "http://127.0.0.1:8090/api/users"},
        {"at": now - 60, "until": now + 40, "seconds": 100, "source": "X-RateLimit-Reset", "mode": "reschedule",
         "task": "periodic.fetch[1]", "url": "http://127.0.0.1:8090/api/orders"},
        {"at": now - 5, "until": now + 40, "seconds": 45, "source": EVIL, "mode": EVIL, "task": EVIL, "url": EVIL},
    ]
    keys = {"network_requests.gate.page_api": gate.to_json(), "network_requests.waits.page_api": json.dumps(waits)}
    for key, value in keys.items():
        set_variable(key, value)
    yield gate, waits
    for key in keys:
        delete_variable(key)


def test_without_login_the_page_redirects_to_the_login_page_and_the_json_is_refused():
    client = api_client()
    response = client.get(PAGE, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/auth/login?next=%2Fnetwork-requests%2F"
    assert client.get(PAGE + "api/connections").status_code == 401
    forged = client.get(PAGE, headers=cookie("not-a-jwt"), follow_redirects=False)
    assert forged.status_code == 403


def test_logged_in_the_page_shows_the_gate_and_the_timeline(stored_state):
    response = api_client().get(PAGE, headers=cookie(token()))

    assert response.status_code == 200
    html = section_of(response.text, "page_api")  # other tests leave other connections' state
    assert "status-blocked" in html and "blocked until" in html
    assert "1.500 s per request" in html
    assert "<th scope=\"row\">Queued tickets</th><td>3</td>" in html
    assert html.count('<rect class="bar src-') == 3
    assert 'class="bar src-retry-after"' in html and 'class="bar src-reset-header"' in html
    assert "periodic.fetch[1]" in html
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert "<script" not in response.text.lower().replace("&lt;script", "")
    css = api_client().get(PAGE + "static/rate_limits.css")
    assert css.status_code == 200 and "svg.timeline" in css.text


def test_every_stored_value_is_escaped(stored_state):
    html = api_client().get(PAGE, headers=cookie(token())).text

    assert EVIL not in html
    assert "<img" not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html


def test_the_json_api_gives_the_same_data(stored_state):
    gate, waits = stored_state
    response = api_client().get(PAGE + "api/connections", headers={"Authorization": f"Bearer {token()}"})

    assert response.status_code == 200
    (conn,) = [c for c in response.json()["connections"] if c["conn"] == "page_api"]
    assert conn["status"] == "blocked"
    assert conn["gate"]["blocked_until"] == pytest.approx(gate.blocked_until)
    assert [w["task"] for w in conn["recent_waits"]] == [w["task"] for w in waits]


def test_a_user_who_may_not_read_variables_sees_nothing_of_them(stored_state):
    html = api_client().get(PAGE, headers=cookie(token(role=None, username="nobody"))).text

    assert "page_api" not in html
    assert "connection(s) not shown: you may not read their Variables" in html


def test_chart_geometry_is_proportional_to_time():
    waits = [
        {"at": 1000.0, "until": 1010.0, "seconds": 10, "source": "Retry-After", "mode": "reschedule", "task": "a", "url": ""},
        {"at": 1010.0, "until": 1020.0, "seconds": 10, "source": "shared gate", "mode": "reschedule", "task": "b", "url": ""},
    ]
    chart = view.build_chart(waits, now=1020.0)
    first, second = chart.bars
    assert first.x == view.LABEL_WIDTH
    assert first.width == pytest.approx(second.width)
    assert second.x == pytest.approx(first.x + first.width)
    assert [lane.label for lane in chart.lanes] == ["b", "a"], "most recent task first"
    assert (first.css, second.css) == ("retry-after", "shared-gate")
    assert view.build_chart([], now=0) is None


# -- any stored state renders (issue 10) ---------------------------------------------------------

#: X-RateLimit-Reset in epoch milliseconds taken for seconds: the year 58,887.
YEAR_58887 = 1_700_000_000_000.0
#: A secret in a query string and in user info: the page shows neither.
SECRET_URL = "http://user:hunter2@127.0.0.1:8090/api/orders?api_key=SECRET-VALUE&page=2"


@pytest.fixture
def damaged_states():
    """Gates no writer of the plugin would store, as a hand edit or a bug could leave them."""
    now = time.time()
    valid_block = now + 600
    gates = {
        "broken_json": '{"blocked_until": ',
        "far_future": json.dumps({"blocked_until": YEAR_58887, "updated_at": now, "origin": "http://127.0.0.1:8090"}),
        "wrong_types": json.dumps(
            {"blocked_until": valid_block, "remaining": "many", "tickets": [1, 2], "origin": "http://127.0.0.1:8090"}
        ),
        "not_an_object": "[1, 2, 3]",
        "nan_and_huge": '{"blocked_until": NaN, "limit": 1' + "0" * 400 + "}",
    }
    waits = (
        '[{"at": 1' + "0" * 400 + ', "until": 1, "seconds": 1, "source": "Retry-After", "mode": "defer", '
        '"task": "t", "url": ""}]'
    )
    odd_waits = json.dumps(
        [
            {"at": now - 30, "until": YEAR_58887, "seconds": 1e12, "source": "Retry-After", "mode": "defer",
             "task": "far", "url": ""},
            {"at": now - 20, "until": now - 10, "seconds": 10, "source": "shared gate", "mode": "reschedule",
             "task": "fine", "url": SECRET_URL},
        ]
    ).replace('"seconds": 1000000000000.0', '"seconds": NaN')
    keys = {f"network_requests.gate.{conn}": raw for conn, raw in gates.items()}
    keys["network_requests.waits.broken_json"] = waits
    keys["network_requests.waits.wrong_types"] = odd_waits
    for key, value in keys.items():
        set_variable(key, value)
    yield now, valid_block
    for key in keys:
        delete_variable(key)


def test_the_page_renders_every_damaged_state_as_a_conservative_block(damaged_states):
    now, valid_block = damaged_states
    response = api_client().get(PAGE, headers=cookie(token()))

    assert response.status_code == 200
    for conn in ("broken_json", "far_future", "wrong_types", "not_an_object", "nan_and_huge"):
        html = section_of(response.text, conn)
        assert "status-damaged" in html, conn
        assert "The stored gate state is damaged" in html, conn
    # The year-58,887 time (no datetime can even hold it: the page answered 500) is named as
    # damage; tasks wait for the conservative block, not until then.
    with pytest.raises((OverflowError, ValueError)):
        datetime.fromtimestamp(YEAR_58887, timezone.utc)
    far = section_of(response.text, "far_future")
    assert "beyond the horizon" in far
    assert "(in 30 s), then one request goes first" in far
    # One bad field keeps the valid block: it is what the page says tasks wait for.
    wrong = section_of(response.text, "wrong_types")
    assert view.utc(valid_block) in wrong
    assert "remaining: &#39;many&#39; is not a number" in wrong


def test_stored_waits_with_impossible_times_are_counted_not_drawn_and_urls_are_redacted(damaged_states):
    response = api_client().get(PAGE, headers=cookie(token()))

    assert response.status_code == 200
    assert "1 stored wait(s) not shown" in section_of(response.text, "broken_json")
    wrong = section_of(response.text, "wrong_types")
    assert "1 stored wait(s) not shown" in wrong
    assert wrong.count('<rect class="bar src-') == 1
    assert "hunter2" not in response.text and "SECRET-VALUE" not in response.text
    assert "127.0.0.1:8090/api/orders?api_key=***&amp;page=2" in wrong


def test_the_json_api_answers_for_damaged_states_too(damaged_states):
    now, valid_block = damaged_states
    response = api_client().get(PAGE + "api/connections", headers={"Authorization": f"Bearer {token()}"})

    assert response.status_code == 200
    connections = {c["conn"]: c for c in response.json()["connections"]}
    assert connections["wrong_types"]["damaged"].startswith("remaining:")
    assert connections["wrong_types"]["gate"]["blocked_until"] == pytest.approx(valid_block)
    year = connections["far_future"]
    assert year["status"] == "damaged"
    conservative_block = year["gate"]["blocked_until"]
    assert now + DAMAGED_STATE_BLOCK_SECONDS <= conservative_block <= time.time() + DAMAGED_STATE_BLOCK_SECONDS
    assert [w["task"] for w in connections["wrong_types"]["recent_waits"]] == ["fine"]
    assert "hunter2" not in response.text and "SECRET-VALUE" not in response.text


_ANY_VALUE = (
    st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.sampled_from([YEAR_58887, 1e300, -1.0])
    | st.text(max_size=8)
    | st.none()
    | st.booleans()
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.floats() | st.text(max_size=3), max_size=2)
)
_GATE_FIELDS = list(GateState.__dataclass_fields__)
_WAIT_FIELDS = ["at", "until", "seconds", "source", "mode", "task", "url"]


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gate_raw=st.none()
    | st.text(max_size=60)
    | st.builds(
        json.dumps, st.dictionaries(st.sampled_from(_GATE_FIELDS) | st.text(max_size=5), _ANY_VALUE, max_size=6)
    ),
    waits_raw=st.none()
    | st.text(max_size=60)
    | st.builds(
        json.dumps,
        st.lists(st.dictionaries(st.sampled_from(_WAIT_FIELDS), _ANY_VALUE, max_size=7) | _ANY_VALUE, max_size=4),
    ),
)
def test_any_stored_values_give_a_view_and_strict_json(gate_raw, waits_raw):
    now = time.time()
    item = view.connection_view("any", gate_raw, waits_raw, now)

    # The JSON API's encoder refuses NaN and infinities (a 500): none may reach it.
    json.dumps(view.as_json(item), allow_nan=False)
    assert item.status in {"open", "blocked", "queued", "damaged"}
    assert item.state["blocked_until"] <= now + HORIZON_SECONDS
    if item.damaged:
        assert item.state["blocked_until"] >= now + DAMAGED_STATE_BLOCK_SECONDS
    for wait in item.recent_waits:
        assert all(math.isfinite(wait[name]) for name in ("at", "until", "seconds"))
        datetime.fromtimestamp(wait["until"], timezone.utc)  # drawable


# -- gates in Redis ([network_requests] gate_store = redis) --------------------------------------


@pytest.fixture
def redis_gates(monkeypatch):
    """The page's gate store is a real RedisGateStore on 127.0.0.1:6379, under a key prefix of
    this test only; a sound blocked gate and a damaged one are stored in it."""
    import uuid

    import redis

    from network_requests.gate import observe
    from network_requests.gate_store import RedisGateStore
    from network_requests.rate_limit_headers import RateLimitInfo
    from network_requests.ui import app

    client = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({error})")
    prefix = f"test_rate_limits_page:{uuid.uuid4().hex}:"
    store = RedisGateStore("unused", client=client, key_prefix=prefix)
    now = time.time()

    def blocked_for_two_minutes(state):
        return None, observe(state, RateLimitInfo(), now=now, rate_limited_until=now + 120)

    store.update("redis_api", blocked_for_two_minutes)
    client.hset(prefix + "redis_damaged", mapping={"state": '{"remaining": "many"', "version": "x"})
    monkeypatch.setattr(app, "gate_store_for_page", lambda: store)
    yield now
    client.delete(*client.scan_iter(match=prefix + "*"))


def test_with_the_redis_store_the_page_shows_its_gates_damaged_ones_too(redis_gates):
    now = redis_gates
    response = api_client().get(PAGE, headers=cookie(token()))

    assert response.status_code == 200
    sound = section_of(response.text, "redis_api")
    assert "status-blocked" in sound and view.utc(now + 120) in sound
    assert "status-damaged" in section_of(response.text, "redis_damaged")
    assert 'id="gate-store-problem"' not in response.text


def test_a_redis_store_that_cannot_be_reached_is_a_notice_not_a_500(monkeypatch, stored_state):
    import redis

    from network_requests.gate_store import RedisGateStore
    from network_requests.ui import app

    # Port 1 on the loopback: nothing listens there, the connection is refused at once.
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=2)
    with pytest.raises(redis.ConnectionError):
        unreachable.ping()
    monkeypatch.setattr(app, "gate_store_for_page", lambda: RedisGateStore("unused", client=unreachable))

    response = api_client().get(PAGE, headers=cookie(token()))
    assert response.status_code == 200
    assert 'id="gate-store-problem"' in response.text
    assert "page_api" in response.text  # the Variables (the wait history, here) are still shown
    api = api_client().get(PAGE + "api/connections", headers={"Authorization": f"Bearer {token()}"})
    assert api.status_code == 200 and api.json()["gate_store_problem"]
