"""Bench probe: log every Variable request the execution API serves in this process.

Why: the shared gate's Variable store costs one execution-API request per Variable read or
write, and ``make bench-scale`` counts them per benchmark request. Task processes reach the
execution API of the API server, but the triggerer serves its triggers' Variable reads and
writes through an execution API inside its own process (Airflow's ``InProcessExecutionAPI``),
which no access log sees. Both run the same route module,
``airflow.api_fastapi.execution_api.routes.variables``, so the probe wraps that module's
``Variable`` (the model its routes call at each request) and appends one line per call,
``GET <key>``, ``PUT <key>`` or ``DELETE <key>``, to the file named by
``BENCH_VARIABLE_REQUEST_LOG``.

How it is loaded: Airflow imports a module named ``airflow_local_settings`` at start-up in
every component (``airflow.settings.import_local_settings``). ``bench/run_scale.py`` puts
this folder on the ``PYTHONPATH`` of the API server and the triggerer only, and sets
``BENCH_VARIABLE_REQUEST_LOG`` for them; anywhere else this module is never imported, and
without the variable it does nothing. It defines no cluster policy (``__all__`` is empty, so
``airflow.settings`` takes nothing from it) and imports nothing from Airflow: the route
module is wrapped when Airflow itself imports it, by an import hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

__all__: list[str] = []  # nothing for airflow.settings to take over

LOG_ENV = "BENCH_VARIABLE_REQUEST_LOG"
ROUTES_MODULE = "airflow.api_fastapi.execution_api.routes.variables"


def record(log_path: str, method: str, key: Any) -> None:
    """Append ``"<method> <key>\\n"``: one small O_APPEND write, so the lines of concurrent
    writers (API server workers, threads) never mix."""
    line = f"{method} {key}\n".encode("utf-8", "replace")
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class CountedVariable:
    """Stands in for the route module's ``Variable``: records get/set/delete, then does them."""

    def __init__(self, model: Any, log_path: str) -> None:
        self._model = model
        self._log_path = log_path

    def __getattr__(self, name: str) -> Any:  # columns, queries: the model's own
        return getattr(self._model, name)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        record(self._log_path, "GET", kwargs.get("key", args[0] if args else None))
        return self._model.get(*args, **kwargs)

    def set(self, *args: Any, **kwargs: Any) -> Any:
        record(self._log_path, "PUT", kwargs.get("key", args[0] if args else None))
        return self._model.set(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        record(self._log_path, "DELETE", kwargs.get("key", args[0] if args else None))
        return self._model.delete(*args, **kwargs)


class _WrappingLoader(importlib.abc.Loader):
    """Runs the real loader, then puts :class:`CountedVariable` in place of ``Variable``."""

    def __init__(self, inner: importlib.abc.Loader, log_path: str) -> None:
        self._inner = inner
        self._log_path = log_path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        module.Variable = CountedVariable(module.Variable, self._log_path)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks
        return getattr(self._inner, name)


class WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds ``module_name`` with the other finders and wraps its loader."""

    def __init__(self, module_name: str, log_path: str) -> None:
        self.module_name = module_name
        self.log_path = log_path

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module_name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _WrappingLoader(spec.loader, self.log_path)
                return spec
        return None


def install(log_path: str, module_name: str = ROUTES_MODULE) -> None:
    """Count ``module_name``'s Variable calls into ``log_path`` (now if it is loaded already)."""
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        if not isinstance(loaded.Variable, CountedVariable):
            loaded.Variable = CountedVariable(loaded.Variable, log_path)
        return
    if not any(isinstance(f, WrapOnImport) and f.module_name == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, WrapOnImport(module_name, log_path))


if os.environ.get(LOG_ENV):
    install(os.environ[LOG_ENV])
