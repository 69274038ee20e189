"""Writing a response body to ``output_path`` so no reader ever sees half of it.

Local paths (and ``file://`` URIs) are written to a temporary file in the same
directory, flushed to disk, then renamed over the target: a rename within one
file system is atomic, so a reader sees the old file or the whole new one, and a
writer killed half-way leaves only a ``.*.partial`` file, never a truncated target.
Object stores (``s3://``, ``gs://``, ...) get the body in a single put through
Airflow's ``ObjectStoragePath``, which is atomic on those stores.

Re-running a task writes the same path again and replaces its own earlier file,
so a retried or cleared task is idempotent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit


def is_local(path: str) -> bool:
    """A plain path or a ``file://`` URI."""
    scheme = urlsplit(path).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(path: str) -> Path:
    """The file system path of a plain path or a ``file://`` URI."""
    parts = urlsplit(path)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            # file://data/out.json names host "data"; silently writing /out.json would surprise.
            raise ValueError(f"{path!r}: a file:// URI needs an absolute path (file:///...), not host {parts.netloc!r}")
        return Path(unquote(parts.path))
    return Path(path)


def write_atomically(path: str, body: bytes) -> str:
    """Write ``body`` to ``path`` (local or object storage) in one visible step; return the path written."""
    if is_local(path):
        return str(_write_local(local_path(path), body))
    return _write_object_storage(path, body)


def _write_local(target: Path, body: bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(body)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return target


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable across a power cut; not all systems allow it.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_object_storage(uri: str, body: bytes) -> str:
    from airflow.sdk import ObjectStoragePath

    target = ObjectStoragePath(uri)
    # write_bytes opens, writes and closes once: one PUT on S3/GCS/Azure.
    target.write_bytes(body)
    return str(target)
