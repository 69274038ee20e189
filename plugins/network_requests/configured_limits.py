"""Rate limits a user declares for an API, and the name of the quota its requests count against.

Many APIs send no rate-limit headers (a bare 429, or nothing until the client is banned), so
their limits are declared: in a Connection's ``extra``, or as an operator argument that
replaces the Connection's::

    {"rate_limit": {"requests": 5000, "per": "1h", "burst": 100}}
    {"rate_limit": [{"requests": 10, "per": "1s"}, {"requests": 5000, "per": "1h"}]}

What ``{"requests": N, "per": P, "burst": B}`` means, exactly (the shared gate,
:mod:`network_requests.gate`, enforces it together with what the server's headers say: the
stricter wins):

- **never more than N requests in any P seconds.** A sliding window: it holds for a server
  counting fixed windows wherever their boundaries fall (a token bucket "N per P" that lets
  a full window go at once could put 2N into one fixed window straddling a boundary), and
  for a server keeping a sliding log;
- **never more than B of them in any B x P/N seconds**, so at most B at once. A server's
  token bucket holding B tokens, refilled at N per P, accepts every such sequence.
- ``burst`` defaults to N: the whole quota may go at once, as soon as it is free. That is
  what a user of "5,000 per hour" expects (a batch of 100 does not take 72 s), and what a
  fixed-window server allows. Declare ``"burst": 1`` for an API that wants requests evenly
  spaced (P/N apart), or the server's bucket size if it is smaller than N.

A request counts from when the gate lets it go until P seconds after its answer came back,
so jitter between the gate and the server can't bring two requests closer than the limit.

``per`` is ``"500ms"``, ``"30s"``, ``"1m"``, ``"1h"``, ``"1d"`` or a number of seconds, at
most 7 days (the gate's horizon). Anything else is a :class:`ValueError` that names the
field, the value and the rule, when the task starts (never at DAG parsing).

The *gate key* names the quota. By default it is the Connection id, and the gate checks
that the stored state is about the Connection's own API (a Connection pointed elsewhere
starts afresh). An explicit ``gate_key`` names a quota shared on purpose (one GitHub token
used through two Connections, or one API split per route): no such check, since the
Connections sharing it may have different base URLs. See :func:`resolve_gate_key`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from network_requests.rate_limit_headers import MAX_HORIZON_SECONDS

#: The key of a Connection's extra that declares its limits.
EXTRA_KEY = "rate_limit"
#: The fields of one declared limit.
FIELDS = ("requests", "per", "burst")
#: Larger counts are no real quota; the gate caps its counts at the same figure.
MAX_REQUESTS = 10**9
#: Shorter windows are below what the gate, a store round trip and a clock can tell apart.
MIN_PER_SECONDS = 0.001
#: The gate stores and believes no time further away than the header reader's horizon.
MAX_PER_SECONDS = float(MAX_HORIZON_SECONDS)
#: More limits than this on one quota is a mistake, and each costs the gate a log.
MAX_LIMITS = 8
#: Gate keys are stored as Variable names and Redis keys, and shown in the UI.
MAX_GATE_KEY_LENGTH = 200
#: What an explicit gate key is stored under: never the same as a Connection id's gate,
#: whose origin is checked (see resolve_gate_key).
SHARED_KEY_PREFIX = "key:"

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*")
_DURATION_RULE = "is not a duration like '1h', '30s', '500ms' or 60"


@dataclass(frozen=True)
class ConfiguredLimit:
    """At most ``requests`` requests in any ``per_seconds``, at most ``burst`` of them in any
    ``burst * interval`` (see the module docstring)."""

    requests: int
    per_seconds: float
    burst: int

    def __post_init__(self) -> None:
        # Built directly (not parsed): the same rules, so the gate never sees a bad limit.
        _check_requests("requests", self.requests)
        _check_per("per", self.per_seconds)
        _check_burst("burst", self.burst, self.requests)

    @property
    def interval(self) -> float:
        """The average spacing the limit allows: ``per / requests`` seconds."""
        return self.per_seconds / self.requests

    @property
    def windows(self) -> tuple[tuple[int, float], ...]:
        """``(at most, seconds)`` pairs the gate enforces as sliding windows."""
        whole = (self.requests, self.per_seconds)
        if self.burst >= self.requests:
            return (whole,)
        return (whole, (self.burst, self.burst * self.interval))

    @property
    def key(self) -> str:
        """The limit as the gate stores it (``"10/1.0/10"``): read back by :meth:`from_key`."""
        return f"{self.requests}/{self.per_seconds!r}/{self.burst}"

    @classmethod
    def from_key(cls, key: str) -> ConfiguredLimit:
        """The limit :attr:`key` describes; ``ValueError`` if it describes none."""
        parts = key.split("/")
        if len(parts) != 3:
            raise ValueError(f"{key!r} is not 'requests/per/burst'")
        requests, per, burst = parts
        if not (requests.isdigit() and burst.isdigit()):
            raise ValueError(f"{key!r} is not 'requests/per/burst'")
        return cls(int(requests), float(per), int(burst))

    def describe(self) -> str:
        """For logs and wait reasons: ``"10 per 1s"``, ``"5000 per 1h, burst 100"``."""
        text = f"{self.requests} per {_duration_text(self.per_seconds)}"
        return text if self.burst == self.requests else f"{text}, burst {self.burst}"


def describe_limits(limits: Iterable[ConfiguredLimit]) -> str:
    """``"10 per 1s; 5000 per 1h"`` (for a wait's reason)."""
    return "; ".join(limit.describe() for limit in limits)


def parse_limits(declaration: Any, *, field: str = EXTRA_KEY) -> tuple[ConfiguredLimit, ...]:
    """The limits of one declaration: a mapping, a list of them, a JSON text of either,
    :class:`ConfiguredLimit` objects, or ``None``/``[]`` for none.

    ``field`` names the declaration in error messages (``rate_limit``, ``rate_limit[1]``...).
    Raises ``ValueError`` naming the field, the value and the rule.
    """
    if declaration is None:
        return ()
    if isinstance(declaration, str):
        try:
            declaration = json.loads(declaration)
        except ValueError:
            raise ValueError(
                f"{field}: {_shown(declaration)} is not JSON; expected an object like "
                '{"requests": 10, "per": "1s"} or a list of them'
            ) from None
        return parse_limits(declaration, field=field)
    if isinstance(declaration, (ConfiguredLimit, Mapping)):
        return (_one_limit(declaration, field),)
    if isinstance(declaration, (list, tuple)):
        if len(declaration) > MAX_LIMITS:
            raise ValueError(f"{field}: {len(declaration)} limits; at most {MAX_LIMITS} may be declared")
        return tuple(_one_limit(item, f"{field}[{index}]") for index, item in enumerate(declaration))
    raise ValueError(
        f"{field}: {_shown(declaration)} is not a limit; expected an object like "
        '{"requests": 10, "per": "1s"} or a list of them'
    )


def limits_from_extra(extra: Mapping[str, Any] | str | None) -> tuple[ConfiguredLimit, ...]:
    """The limits a Connection's ``extra`` declares under ``"rate_limit"`` (none if absent)."""
    if extra is None or extra == "":
        return ()
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            return ()  # not JSON: the Connection's own problem, reported where it is read
    if not isinstance(extra, Mapping):
        return ()
    return parse_limits(extra.get(EXTRA_KEY), field=EXTRA_KEY)


def declared_limits(argument: Any, extra: Mapping[str, Any] | str | None) -> tuple[ConfiguredLimit, ...]:
    """The limits a request counts against: the operator's ``rate_limit`` argument when given
    (``[]`` declares none, overriding the Connection), else the Connection's ``extra``."""
    if argument is not None:
        return parse_limits(argument, field=EXTRA_KEY)
    return limits_from_extra(extra)


def parse_duration(value: Any, *, field: str = "per") -> float:
    """Seconds of ``"500ms"``, ``"30s"``, ``"1m"``, ``"1h"``, ``"1d"``, or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: {value!r} {_DURATION_RULE}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"{field}: {_shown(value)} {_DURATION_RULE}")
    _check_per(field, seconds, shown=value)
    return seconds


@dataclass(frozen=True)
class GateKey:
    """Which stored gate a request counts against."""

    #: The store's key.
    name: str
    #: Check that the stored state is about the request's API (``gate.for_origin``): only for
    #: a Connection's own gate. A key shared on purpose spans base URLs, so checking would
    #: throw the state away each time a request of another base URL came (a flip-flop).
    checks_origin: bool


def resolve_gate_key(conn_id: str, gate_key: str | None = None) -> GateKey:
    """The gate of a request to ``conn_id``, named by the operator's ``gate_key`` (rendered).

    No ``gate_key`` (or an empty one): the Connection's own gate, origin checked. An explicit
    key: ``"key:<gate_key>"``, origin not checked, shared by every request naming it, whatever
    its Connection. The prefix keeps the two kinds apart: an explicit key equal to a Connection
    id does not share (and fight over) that Connection's origin-checked gate.
    """
    if gate_key is None or (isinstance(gate_key, str) and not gate_key.strip()):
        return GateKey(conn_id, checks_origin=True)
    if not isinstance(gate_key, str):
        raise ValueError(f"gate_key: {_shown(gate_key)} is not a string")
    if len(gate_key) > MAX_GATE_KEY_LENGTH:
        raise ValueError(f"gate_key: {_shown(gate_key)} is longer than {MAX_GATE_KEY_LENGTH} characters")
    if any(not character.isprintable() for character in gate_key):
        raise ValueError(f"gate_key: {_shown(gate_key)} contains a control character")
    return GateKey(SHARED_KEY_PREFIX + gate_key.strip(), checks_origin=False)


# -- the checks --------------------------------------------------------------------------------


def _one_limit(item: Any, field: str) -> ConfiguredLimit:
    if isinstance(item, ConfiguredLimit):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f'{field}: {_shown(item)} is not an object like {{"requests": 10, "per": "1s"}}')
    unknown = sorted(str(name) for name in item if name not in FIELDS)
    if unknown:
        raise ValueError(f"{field}: unknown field {unknown[0]!r} (the fields are {', '.join(FIELDS)})")
    for name in ("requests", "per"):
        if name not in item:
            raise ValueError(f"{field}.{name} is missing (a limit needs requests and per)")
    requests = _check_requests(f"{field}.requests", item["requests"])
    per = parse_duration(item["per"], field=f"{field}.per")
    burst = _check_burst(f"{field}.burst", item.get("burst", requests), requests)
    return ConfiguredLimit(requests, per, burst)


def _whole_number(field: str, value: Any, rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: {_shown(value)} is not {rule}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{field}: {_shown(value)} is not {rule}")
    return int(value)


def _check_requests(field: str, value: Any) -> int:
    rule = f"a whole number from 1 to {MAX_REQUESTS:,}"
    number = _whole_number(field, value, rule)
    if not 1 <= number <= MAX_REQUESTS:
        raise ValueError(f"{field}: {_shown(value)} is not {rule}")
    return number


def _check_burst(field: str, value: Any, requests: int) -> int:
    rule = f"a whole number from 1 to requests ({requests})"
    number = _whole_number(field, value, rule)
    if not 1 <= number <= requests:
        raise ValueError(f"{field}: {_shown(value)} is not {rule}")
    return number


def _check_per(field: str, seconds: Any, *, shown: Any = None) -> float:
    shown = seconds if shown is None else shown
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ValueError(f"{field}: {_shown(shown)} {_DURATION_RULE}")
    if not MIN_PER_SECONDS <= seconds <= MAX_PER_SECONDS:
        raise ValueError(
            f"{field}: {_shown(shown)} is not a duration from {MIN_PER_SECONDS * 1000:g}ms to "
            f"{MAX_PER_SECONDS / 86400:g}d (the gate's horizon)"
        )
    return float(seconds)


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
