"""Where the shared gate lives, behind one small seam: :class:`GateStore`.

The gate's logic is pure (:mod:`network_requests.gate`); a store only keeps one state per
key (a connection id) and applies a *change* to it: ``update(key, change)`` reads the
state, calls ``change(state) -> (result, new_state)``, stores ``new_state`` and returns
``result``, as one atomic step. A store may call ``change`` more than once (a retry after a
conflicting writer), so a change must be pure.

Three stores:

- :class:`VariableGateStore`, the embedded default: an Airflow Variable plus a file lock.
  **Correct on one host only** (LocalExecutor, ``make run``, ``dag.test()``).
- :class:`RedisGateStore`: one Redis hash per gate, every update a compare-and-set done by a
  Lua script on the server. Correct across hosts: what ``docker-compose.yaml`` and
  ``make test-distributed`` use.
- :class:`MemoryGateStore`: this process only, for tests.

:func:`gate_store_from_config` picks one from ``[network_requests] gate_store``
(``variable`` or ``redis``; environment variable ``AIRFLOW__NETWORK_REQUESTS__GATE_STORE``).
docs/distributed.md says why the Variable store is single-host, with the measured reproduction.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from network_requests.gate import STATE_TTL_SECONDS, GateState, damaged_state
from network_requests.rate_limit_headers import MAX_HORIZON_SECONDS

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

CONFIG_SECTION = "network_requests"
#: ``[network_requests] gate_store``: which store holds the gates.
GATE_STORE_OPTION = "gate_store"
GATE_STORES = ("variable", "redis")
#: ``[network_requests] redis_conn_id``: the Airflow Connection of the Redis store.
REDIS_CONN_ID_OPTION = "redis_conn_id"
DEFAULT_REDIS_CONN_ID = "redis_default"

VARIABLE_PREFIX = "network_requests.gate."
REDIS_KEY_PREFIX = "network_requests:gate:"
#: Executors that run every task on the host of the scheduler: the file lock covers them.
SINGLE_HOST_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor"})

_VERIFY_ATTEMPTS = 3
#: Compare-and-set tries of one Redis update before it gives up (see GateContentionError).
CAS_ATTEMPTS = 12
#: Upper bound of the random pause before the n-th retry: n times this.
CAS_BACKOFF_SECONDS = 0.002


class GateStore(Protocol):
    def update(self, key: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        """Apply ``change`` to the stored state atomically and return its result."""

    def read(self, key: str) -> GateState: ...


class GateStoreError(RuntimeError):
    """A gate could not be read or updated. Nothing was stored by the failed call."""


class GateContentionError(GateStoreError):
    """Other writers changed the gate before every one of our compare-and-set tries.

    The store cannot invent a safe result for an arbitrary change, so it raises instead of
    guessing: the caller treats an admission that failed this way as "wait ``retry_after``
    seconds and ask again" (nothing is sent, the gate is not opened), and an observation that
    failed this way as a failed gate update (logged and counted, never a failed try).
    """

    def __init__(self, key: str, attempts: int, retry_after: float = 1.0) -> None:
        self.key, self.attempts, self.retry_after = key, attempts, retry_after
        super().__init__(
            f"shared gate {key!r}: {attempts} compare-and-set tries all lost to other writers; "
            f"nothing was changed, ask again in {retry_after:g} s"
        )


class GateStoreUnavailableError(GateStoreError):
    """The store's engine did not answer (Redis down, refused, timed out, wrong password)."""


def variable_key(conn_id: str) -> str:
    """The Variable holding the gate of ``conn_id`` (shown in Admin → Variables)."""
    return VARIABLE_PREFIX + variable_suffix(conn_id)


def variable_suffix(key: str) -> str:
    """``key`` as a Variable name's last part: itself when it is made of ``[A-Za-z0-9_.-]``
    only, else those characters with ``_`` for the others, ``~`` and a digest of ``key``.

    One name per key: ``key:github-token`` (an explicit ``gate_key``) and the Connection
    ``key_github-token`` must not share a gate (nor ``a b`` and ``a_b``). ``~`` cannot occur
    in a plain key, and a URL carries it as it is (the execution API names Variables in paths).
    """
    if re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}~{digest}"


_damage_logged: set[tuple[str, str]] = set()


def decode(where: str, raw: str | None, now: float, *, unreadable: str | None = None) -> GateState:
    """The state stored at ``where`` (a Variable or Redis key, for the log). A damaged one (or
    ``unreadable``: why the store could not even get a value) is a conservative block, logged
    once per process."""
    state = GateState.from_json(raw, now=now) if unreadable is None else damaged_state(unreadable, now=now)
    if state.damaged and (where, state.damaged) not in _damage_logged:
        if len(_damage_logged) > 1000:
            _damage_logged.clear()
        _damage_logged.add((where, state.damaged))
        log.warning("Shared gate %s was unreadable (%s): holding requests back briefly", where, state.damaged)
    return state


class MemoryGateStore:
    """A store in this process only: for tests and for a single-process runner."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._states: dict[str, str] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def read(self, key: str) -> GateState:
        return decode(key, self._states.get(key), self._clock())

    def update(self, key: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        with self._lock:
            result, new_state = change(self.read(key))
            self._states[key] = new_state.to_json()
            return result


# -- the Variable store: one host ------------------------------------------------------------


@contextlib.contextmanager
def host_lock(name: str, kind: str = "gate") -> Iterator[None]:
    """Serialise a read-modify-write of ``name`` between the processes of this host.

    The lock file lives in ``tempfile.gettempdir()``: processes with another ``TMPDIR`` (or
    another container, or another machine) do not see it.
    """
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"network-requests-{kind}-{digest}.lock")
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _host_lock(conn_id: str) -> contextlib.AbstractContextManager[None]:
    return host_lock(conn_id, "gate")


def fresh_variable(key: str) -> str | None:
    """The Variable's stored value (``None`` when there is none), as the API server has it now.

    In a task process, a trigger or ``dag.test()`` it is one ``GetVariable`` message to the
    supervisor, the message ``Variable.get`` sends, without ``Variable.get``'s extras: its
    secrets cache ([secrets] use_cache, which could answer with an old gate), the secrets
    backends (a gate Variable is only ever written to the metadata database), and the
    ``MaskSecret`` message it sends after every read. A gate holds no secret, and in the
    triggerer each message from a trigger costs a turn of the triggerer's main loop, which
    queries the database for triggers to assign and clean up (measured: docs/batch.md).
    Unlike ``Variable.get(default=None)``, an execution API that fails to answer raises
    :class:`GateStoreError` instead of reading as "no gate yet".
    """
    try:
        from airflow.sdk.exceptions import ErrorType
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.comms import ErrorResponse, GetVariable, VariableResult
    except ImportError:  # another Task SDK: its public API
        return _variable_through_the_sdk(key)
    comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    if comms is None:  # not in a task, a trigger or dag.test() (the API server's UI plugin)
        return _variable_through_the_sdk(key)
    answer = comms.send(GetVariable(key=key))
    if isinstance(answer, VariableResult):
        return answer.value
    if isinstance(answer, ErrorResponse) and answer.error == ErrorType.VARIABLE_NOT_FOUND:
        return None
    problem = answer.error.value if isinstance(answer, ErrorResponse) else type(answer).__name__
    raise GateStoreError(f"Variable {key!r} could not be read through the execution API: {problem}")


def _variable_through_the_sdk(key: str) -> str | None:
    from airflow.sdk import Variable

    try:
        from airflow.sdk.execution_time.cache import SecretCache

        SecretCache.invalidate_variable(key)
    except Exception:  # the cache is an optimisation; an old SDK without it is fine
        pass
    return Variable.get(key, default=None)


def configured(option: str, fallback: str) -> str:
    """``[network_requests] <option>`` (or ``AIRFLOW__NETWORK_REQUESTS__<OPTION>``).

    Read with the Task SDK's configuration, which answers the same in a task process, in the
    triggerer and in the API server.
    """
    from airflow.sdk.configuration import conf

    return str(conf.get(CONFIG_SECTION, option, fallback=fallback))


def configured_executors() -> list[str]:
    """The class names of ``[core] executor`` (a comma list in Airflow 3, entries may be
    ``alias:module.Class``)."""
    from airflow.sdk.configuration import conf

    raw = str(conf.get("core", "executor", fallback="LocalExecutor") or "LocalExecutor")
    return [entry.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1] for entry in raw.split(",") if entry.strip()]


_executor_warned = False


def warn_unless_single_host_executor() -> None:
    """Once per process: say loudly that the Variable store under a multi-host executor can
    let a request out before the time a server asked for."""
    global _executor_warned
    if _executor_warned:
        return
    _executor_warned = True
    try:
        executors = configured_executors()
    except Exception:  # configuration unreadable: nothing to say, the default is LocalExecutor
        return
    others = [name for name in executors if name not in SINGLE_HOST_EXECUTORS]
    if others:
        log.warning(
            "The shared rate-limit gate is kept in Airflow Variables ([network_requests] gate_store = "
            "variable), which is safe on one host only, but [core] executor is %s: tasks and the "
            "triggerer on other hosts or containers can overwrite each other's gate and send before "
            "a server allowed. Set [network_requests] gate_store = redis (environment variable "
            "AIRFLOW__NETWORK_REQUESTS__GATE_STORE=redis) and a Redis connection "
            "([network_requests] redis_conn_id, default %s); see docs/distributed.md.",
            ", ".join(others),
            DEFAULT_REDIS_CONN_ID,
        )


class VariableGateStore:
    """The gate in an Airflow Variable, read and written through the Task SDK. One host only.

    Each change is a read-modify-write of the Variable: a file lock in ``TMPDIR`` serialises it
    between the processes of one host, and the writer reads the Variable back and redoes its
    change when another writer overwrote it. Neither helps across hosts (or containers, or
    processes with different ``TMPDIR``): the Variable API has no compare-and-set, so a writer
    that read the state before another writer's block was stored writes its stale state over
    that block, and the block is lost. A later task is then let out before the time the server
    asked for (docs/distributed.md has the reproduction). Use it with the LocalExecutor; with
    the CeleryExecutor or any other multi-host executor use :class:`RedisGateStore`. It warns
    once per process when ``[core] executor`` is not a single-host executor.
    """

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        warn_unless_single_host_executor()

    def read(self, key: str) -> GateState:
        name = variable_key(key)
        return decode(name, fresh_variable(name), self._clock())

    def update(self, key: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        from airflow.sdk import Variable

        name = variable_key(key)
        with _host_lock(key):
            raw = fresh_variable(name)
            for _ in range(_VERIFY_ATTEMPTS):
                result, new_state = change(decode(name, raw, self._clock()))
                written = new_state.to_json()
                if written == raw:
                    return result
                Variable.set(name, written, description="Shared rate-limit gate of NetworkRequestOperator")
                raw = fresh_variable(name)
                if raw == written:
                    return result
                log.info("Shared gate %s changed by another worker while updating; redoing the change", name)
            return result

    def clear(self, key: str) -> None:
        from airflow.sdk import Variable

        Variable.delete(variable_key(key))


# -- the Redis store: atomic across hosts ------------------------------------------------------

#: Reads a gate in one step: {type of the key, stored state, its version}. A key of another
#: type than a hash (someone wrote over it) is reported as such, so it reads as damaged.
_READ_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' then return {kind, '', ''} end
local fields = redis.call('HMGET', KEYS[1], 'state', 'version')
return {kind, fields[1] or '', fields[2] or ''}
"""

#: Stores a new state only if the gate's version is still the one the change was computed
#: from; sets the key's own expiry. ARGV: expected version ('' = no key, '!<type>' = a key of
#: another type), new state, new version, expiry in milliseconds. Returns 1 if written, else 0.
_COMPARE_AND_SET_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local current = ''
if kind == 'hash' then
  current = redis.call('HGET', KEYS[1], 'version') or ''
elseif kind ~= 'none' then
  current = '!' .. kind
end
if current ~= ARGV[1] then return 0 end
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'version', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


def expiry_seconds(state: GateState, now: float) -> float:
    """How long Redis keeps a stored state: until its latest time (bounded) plus the gate's TTL."""
    ahead = min(max(state.horizon - now, 0.0), float(MAX_HORIZON_SECONDS))
    return ahead + STATE_TTL_SECONDS


class RedisGateStore:
    """Every gate in one Redis hash (``state``, ``version``) at ``network_requests:gate:<key>``.

    An update reads the state and its version, applies the pure change in Python, and stores
    the result with a Lua compare-and-set that writes only if the version is unchanged; a lost
    race is retried on the fresh state (up to :data:`CAS_ATTEMPTS` times, with a short random
    pause), then :class:`GateContentionError` is raised. The gate's logic stays in
    :mod:`network_requests.gate`: the scripts only compare versions and store. Each write sets
    the key's expiry from the state's horizon plus ``gate.STATE_TTL_SECONDS``, so Redis forgets
    an idle gate by itself.

    Redis is reached through the Airflow Connection ``redis_conn_id`` with the Redis provider's
    ``RedisHook`` (host, port, password, ``{"db": n}`` and SSL options in the extra), built on
    first use (never at DAG parse time). redis-py's default 5 s socket timeouts apply. Errors of
    the engine are raised as :class:`GateStoreUnavailableError`.
    """

    def __init__(
        self,
        redis_conn_id: str = DEFAULT_REDIS_CONN_ID,
        *,
        client: Any = None,
        key_prefix: str = REDIS_KEY_PREFIX,
        clock: Clock = time.time,
        attempts: int = CAS_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        self.redis_conn_id = redis_conn_id
        self.key_prefix = key_prefix
        self._client = client
        self._clock = clock
        self._attempts = max(int(attempts), 1)
        self._sleep = sleep
        self._random_fraction = random_fraction
        self._scripts: tuple[Any, Any] | None = None
        self._setup_lock = threading.Lock()

    def redis_key(self, key: str) -> str:
        return self.key_prefix + key

    @property
    def client(self) -> Any:
        """The redis-py client (from the Connection, on first use)."""
        with self._setup_lock:
            if self._client is None:
                from airflow.providers.redis.hooks.redis import RedisHook

                self._client = RedisHook(redis_conn_id=self.redis_conn_id).get_conn()
            return self._client

    def _registered(self) -> tuple[Any, Any]:
        if self._scripts is None:
            client = self.client
            self._scripts = (client.register_script(_READ_SCRIPT), client.register_script(_COMPARE_AND_SET_SCRIPT))
        return self._scripts

    def _stored(self, key: str, now: float) -> tuple[GateState, str | None, str]:
        """(state, raw state or None, version) of the gate, read in one server-side step."""
        read_script, _ = self._registered()
        kind, raw, version = (_text(item) for item in read_script(keys=[self.redis_key(key)]))
        if kind == "none":
            return GateState(), None, ""
        if kind != "hash":
            # Not written by this store: a conservative block, replaced by the next update.
            state = decode(self.redis_key(key), None, now, unreadable=f"a Redis {kind} where a gate hash belongs")
            return state, None, f"!{kind}"
        return decode(self.redis_key(key), raw or None, now), raw or None, version

    def read(self, key: str) -> GateState:
        with self._errors_as_unavailable(key):
            return self._stored(key, self._clock())[0]

    def update(self, key: str, change: Callable[[GateState], tuple[T, GateState]]) -> T:
        with self._errors_as_unavailable(key):
            _, compare_and_set = self._registered()
            for attempt in range(self._attempts):
                if attempt:
                    self._sleep(self._random_fraction() * CAS_BACKOFF_SECONDS * attempt)
                now = self._clock()
                state, raw, version = self._stored(key, now)
                result, new_state = change(state)
                written = new_state.to_json()
                if written == raw:
                    return result  # nothing to store: the result holds as of that read
                expiry_ms = max(int(expiry_seconds(new_state, now) * 1000), 1)
                new_version = secrets.token_hex(8)
                args = [version, written, new_version, expiry_ms]
                if compare_and_set(keys=[self.redis_key(key)], args=args) == 1:
                    return result
                log.debug("Shared gate %s changed by another writer; redoing the change (try %d)", key, attempt + 1)
        raise GateContentionError(key, self._attempts)

    def states(self) -> dict[str, str]:
        """``{key: stored state JSON}`` of every gate under this store's prefix (for the UI)."""
        with self._errors_as_unavailable("*"):
            pattern = _glob_escape(self.key_prefix) + "*"
            found = {}
            for redis_key in self.client.scan_iter(match=pattern, count=500):
                key = _text(redis_key)[len(self.key_prefix) :]
                _state, raw, _version = self._stored(key, self._clock())
                if raw is not None:
                    found[key] = raw
            return dict(sorted(found.items()))

    def clear(self, key: str) -> None:
        with self._errors_as_unavailable(key):
            self.client.delete(self.redis_key(key))

    @contextlib.contextmanager
    def _errors_as_unavailable(self, key: str) -> Iterator[None]:
        from redis.exceptions import RedisError

        try:
            yield
        except RedisError as error:
            # redis-py's messages name host and port, never the password.
            raise GateStoreUnavailableError(
                f"shared gate {key!r}: Redis of connection {self.redis_conn_id!r} failed: "
                f"{type(error).__name__}: {error}"
            ) from error


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def gate_store_from_config() -> GateStore:
    """The store ``[network_requests] gate_store`` names: ``variable`` (default) or ``redis``.

    An unknown name raises ``ValueError`` naming the option and the allowed values, rather
    than silently falling back to the single-host store.
    """
    name = configured(GATE_STORE_OPTION, "variable").strip().lower()
    if name == "variable":
        return VariableGateStore()
    if name == "redis":
        return RedisGateStore(configured(REDIS_CONN_ID_OPTION, DEFAULT_REDIS_CONN_ID).strip() or DEFAULT_REDIS_CONN_ID)
    raise ValueError(
        f"[{CONFIG_SECTION}] {GATE_STORE_OPTION} = {name!r} is not a gate store: use one of "
        f"{', '.join(GATE_STORES)} (environment variable AIRFLOW__NETWORK_REQUESTS__GATE_STORE)"
    )
