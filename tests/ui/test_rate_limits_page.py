"""The "Rate limits" page, mounted by the plugin on Airflow's real API server app (in-process).

Checks login like the rest of the UI, what it shows, and that nothing it shows can inject
markup: every value on the page comes from Variables that task code (and whoever can edit
Variables) writes.
"""

from __future__ import annotations

import json
import time

import pytest

from network_requests.gate import GateState
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
