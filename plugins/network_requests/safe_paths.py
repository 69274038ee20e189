"""Keep a rendered ``output_path`` inside a data folder: pure path checks, nothing is written.

``output_path`` is templated, and templates see what anyone who may trigger a DAG sends
(``params``, ``dag_run.conf``) and the run id. Without a check, a value such as
``../../etc/cron.d/x`` in a conf, or a symlink in the data folder, makes the task write
wherever that leads. ``checked_output_path(path, root)`` returns ``path`` unchanged when the
place a write would land on is inside ``root``, and raises ``UnsafeOutputPathError`` otherwise:

- local paths and ``file://`` URIs are made absolute (relative to the working directory, as a
  write would be), ``..`` is applied and every symlink that exists is followed, for the path
  and for the root alike (``os.path.realpath``); the result must be strictly below the root;
- object-storage URIs (``s3://``, ``gs://``, ...) must have the root's scheme and bucket, and
  their key, percent-decoded and with ``..`` applied, must be strictly below the root's key;
  a local root never admits an object-storage path, nor the reverse.

``root=None`` checks nothing (the operator's default, so existing DAGs keep working).

A symlink created between the check and the write could still redirect it; the data folder
should not be writable by whoever controls the templates' inputs.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import unquote, urlsplit

from network_requests.output import is_local, local_path
from network_requests.paths import DATA_DIR_ENV

__all__ = ["UnsafeOutputPathError", "checked_output_path", "default_output_root", "resolve_local"]


class UnsafeOutputPathError(ValueError):
    """An ``output_path`` that would be written outside the allowed folder."""


def default_output_root() -> str | None:
    """``$NETWORK_REQUESTS_DATA_DIR`` when set (where this project's DAGs write), else ``None``."""
    return os.environ.get(DATA_DIR_ENV) or None


def resolve_local(path: str | os.PathLike[str]) -> Path:
    """The absolute location, with ``..`` applied and existing symlinks followed, that ``path``
    (a plain path or a ``file://`` URI) names."""
    raw = local_path(os.fspath(path)) if isinstance(path, str) else Path(path)
    if "\0" in str(raw):
        raise UnsafeOutputPathError(f"output_path {str(path)!r} contains a NUL byte")
    return Path(os.path.realpath(os.path.abspath(raw)))


def _inside(child: Path, root: Path) -> bool:
    return child != root and root in child.parents


def _object_key(parts) -> str:
    return posixpath.normpath("/" + unquote(parts.path).lstrip("/"))


def checked_output_path(path: str, root: str | os.PathLike[str] | None) -> str:
    """``path`` when a write to it stays strictly inside ``root``; ``UnsafeOutputPathError`` otherwise."""
    if root is None or root == "":
        return path
    if not isinstance(path, str) or not path:
        raise UnsafeOutputPathError(f"output_path must be a non-empty string, got {path!r}")
    root_text = os.fspath(root)
    if is_local(root_text):
        if not is_local(path):
            raise UnsafeOutputPathError(
                f"output_path {path!r} is not a local path, but the data folder is {root_text!r}"
            )
        try:
            target, base = resolve_local(path), resolve_local(root_text)
        except ValueError as error:  # a bad file:// URI
            raise UnsafeOutputPathError(str(error)) from None
        if not _inside(target, base):
            raise UnsafeOutputPathError(
                f"output_path {path!r} resolves to {str(target)!r}, outside the data folder {str(base)!r} "
                "(after '..' and symlinks); refusing to write there"
            )
        return path
    if is_local(path):
        raise UnsafeOutputPathError(f"output_path {path!r} is a local path, but the data folder is {root_text!r}")
    target_parts, root_parts = urlsplit(path), urlsplit(root_text)
    if (target_parts.scheme.lower(), target_parts.netloc) != (root_parts.scheme.lower(), root_parts.netloc):
        raise UnsafeOutputPathError(
            f"output_path {path!r} is not in {root_parts.scheme}://{root_parts.netloc}, the data folder's bucket"
        )
    key, root_key = _object_key(target_parts), _object_key(root_parts)
    if not (key.startswith(root_key.rstrip("/") + "/") and key != root_key):
        raise UnsafeOutputPathError(
            f"output_path {path!r} resolves to key {key!r}, outside the data folder {root_text!r}; refusing to write there"
        )
    return path
