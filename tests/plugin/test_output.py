"""Writing a response body atomically (network_requests.output): a reader sees the old file or the new one."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from network_requests import output
from network_requests.output import is_local, local_path, write_atomically


def leftovers(directory: Path) -> list[str]:
    """Temporary files a write left behind."""
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".partial"))


# -- Writing -------------------------------------------------------------------------------------


def test_write_atomically_to_a_plain_path_writes_exactly_the_bytes(tmp_path):
    body = bytes(range(256)) * 64 + b"\r\n\x00end"
    target = tmp_path / "out.bin"

    written = write_atomically(str(target), body)

    assert written == str(target)
    assert target.read_bytes() == body
    assert leftovers(tmp_path) == []


def test_write_atomically_to_a_file_uri_writes_exactly_the_bytes(tmp_path):
    body = b'{"users": [1, 2]}'
    target = tmp_path / "out.json"

    written = write_atomically(target.as_uri(), body)

    assert written == str(target)
    assert target.read_bytes() == body
    assert leftovers(tmp_path) == []


def test_write_atomically_to_a_file_uri_decodes_percent_escapes(tmp_path):
    target = tmp_path / "with space" / "r\N{LATIN SMALL LETTER E WITH ACUTE}sum\N{LATIN SMALL LETTER E WITH ACUTE}.json"
    uri = target.as_uri()
    assert "%20" in uri

    assert write_atomically(uri, b"{}") == str(target)
    assert target.read_bytes() == b"{}"


def test_write_atomically_writes_an_empty_body(tmp_path):
    target = tmp_path / "empty"
    write_atomically(str(target), b"")
    assert target.exists()
    assert target.read_bytes() == b""


def test_write_atomically_creates_missing_parent_directories(tmp_path):
    target = tmp_path / "a" / "b" / "c" / "out.json"

    write_atomically(str(target), b"{}")

    assert target.read_bytes() == b"{}"
    assert leftovers(target.parent) == []


def test_write_atomically_creates_parent_directories_for_a_file_uri(tmp_path):
    target = tmp_path / "x" / "y" / "out.json"
    write_atomically(target.as_uri(), b"[]")
    assert target.read_bytes() == b"[]"


def test_write_atomically_overwrites_an_existing_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(b"an older, longer body that must disappear entirely")

    write_atomically(str(target), b"new")

    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_rerunning_the_same_write_is_idempotent(tmp_path):
    target = tmp_path / "out.json"
    for _ in range(3):
        assert write_atomically(str(target), b'{"n": 1}') == str(target)
    assert target.read_bytes() == b'{"n": 1}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.json"]


def test_the_written_file_is_readable_by_others_like_a_normal_file(tmp_path):
    target = tmp_path / "out.json"
    write_atomically(str(target), b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_write_atomically_leaves_other_files_in_the_directory_alone(tmp_path):
    (tmp_path / "neighbour.json").write_bytes(b"keep")
    write_atomically(str(tmp_path / "out.json"), b"{}")
    assert (tmp_path / "neighbour.json").read_bytes() == b"keep"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["neighbour.json", "out.json"]


# -- How the write is made atomic ------------------------------------------------------------------


def test_the_body_is_written_to_a_temporary_file_in_the_same_directory_then_renamed(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    body = b"x" * 100_000
    renames = []
    real_replace = os.replace

    def spying_replace(source, destination):
        source, destination = Path(source), Path(destination)
        # At the moment of the rename the whole body is in the temporary file, the target still old.
        renames.append((source, destination, source.read_bytes() == body, destination.read_bytes()))
        real_replace(source, destination)

    monkeypatch.setattr(output.os, "replace", spying_replace)
    write_atomically(str(target), body)

    assert len(renames) == 1
    source, destination, source_complete, target_before = renames[0]
    assert destination == target
    assert source.parent == target.parent  # same file system, so the rename is atomic
    assert source.name.startswith(".out.json.")
    assert source.name.endswith(".partial")
    assert source_complete
    assert target_before == b"old"
    assert not source.exists()
    assert target.read_bytes() == body


def test_a_concurrent_reader_only_ever_sees_a_whole_old_or_whole_new_file(tmp_path):
    target = tmp_path / "out.bin"
    bodies = [b"A" * 300_000, b"B" * 200_000 + b"end", b"C" * 100]
    write_atomically(str(target), bodies[0])
    seen: set[bytes] = set()
    torn: list[int] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            content = target.read_bytes()  # the target always exists: os.replace never removes it first
            if content not in bodies:
                torn.append(len(content))
            seen.add(content[:1])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for index in range(60):
            write_atomically(str(target), bodies[index % len(bodies)])
    finally:
        stop.set()
        thread.join(timeout=10)

    assert torn == []
    assert len(seen) >= 2, "the reader should have seen more than one version"
    assert leftovers(tmp_path) == []


# -- Failures ------------------------------------------------------------------------------------


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(b"old and intact")

    def failing_replace(source, destination):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(output.os, "replace", failing_replace)
    with pytest.raises(OSError, match="cross-device"):
        write_atomically(str(target), b"new")

    assert target.read_bytes() == b"old and intact"
    assert leftovers(tmp_path) == []


class _HalfWritingStream:
    """Wraps the temporary file: writes half the body, then the disk is full."""

    def __init__(self, stream):
        self._stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._stream.close()
        return False

    def write(self, data):
        self._stream.write(data[: len(data) // 2])
        self._stream.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def test_a_write_failing_half_way_keeps_the_old_file_and_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(b"old and intact")
    real_fdopen = os.fdopen
    opened = []

    def half_writing_fdopen(fd, *args, **kwargs):
        stream = real_fdopen(fd, *args, **kwargs)
        opened.append(stream.name)
        return _HalfWritingStream(stream)

    monkeypatch.setattr(output.os, "fdopen", half_writing_fdopen)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(str(target), b"n" * 10_000)

    assert opened, "the write should have gone through os.fdopen"
    assert target.read_bytes() == b"old and intact"
    assert leftovers(tmp_path) == []


def test_a_failing_fsync_keeps_the_old_file_and_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(b"old and intact")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(output.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_atomically(str(target), b"new")

    assert target.read_bytes() == b"old and intact"
    assert leftovers(tmp_path) == []


def test_an_interrupted_write_keeps_the_old_file_and_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(b"old and intact")

    def interrupted_replace(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(output.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(target), b"new")

    assert target.read_bytes() == b"old and intact"
    assert leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_no_target_at_all(tmp_path, monkeypatch):
    target = tmp_path / "out.json"

    def failing_replace(source, destination):
        raise OSError("boom")

    monkeypatch.setattr(output.os, "replace", failing_replace)

    with pytest.raises(OSError, match="boom"):
        write_atomically(str(target), b"new")

    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_writing_over_a_directory_fails_and_leaves_it_and_no_temporary_file(tmp_path):
    target = tmp_path / "out.json"
    target.mkdir()
    (target / "inside").write_bytes(b"keep")

    with pytest.raises(OSError):
        write_atomically(str(target), b"new")

    assert (target / "inside").read_bytes() == b"keep"
    assert leftovers(tmp_path) == []


def test_the_directory_is_synced_after_the_rename_but_a_refusal_to_sync_is_harmless(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    real_fsync = os.fsync
    synced_directories = []

    def fsync_refusing_directories(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_directories.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(output.os, "fsync", fsync_refusing_directories)
    write_atomically(str(target), b"{}")

    assert synced_directories
    assert target.read_bytes() == b"{}"


# -- Local or object storage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("/data/out.json", True),
        ("data/out.json", True),
        ("file:///data/out.json", True),
        ("s3://bucket/out.json", False),
        ("gs://bucket/out.json", False),
        ("abfs://container/out.json", False),
    ],
)
def test_is_local_tells_a_local_path_from_object_storage(path, local):
    assert is_local(path) is local


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/data/out.json", Path("/data/out.json")),
        ("data/out.json", Path("data/out.json")),
        ("file:///data/out.json", Path("/data/out.json")),
        ("file://localhost/data/out.json", Path("/data/out.json")),
        ("file:///data/with%20space.json", Path("/data/with space.json")),
    ],
)
def test_local_path_reads_a_plain_path_or_a_file_uri(path, expected):
    assert local_path(path) == expected


def test_object_storage_paths_are_written_in_one_put_through_object_storage(monkeypatch):
    calls = []
    monkeypatch.setattr(output, "_write_object_storage", lambda uri, body: calls.append((uri, body)) or uri)
    monkeypatch.setattr(output, "_write_local", lambda *args: pytest.fail("an s3:// URI must not be written locally"))

    assert write_atomically("s3://bucket/out.json", b"{}") == "s3://bucket/out.json"
    assert calls == [("s3://bucket/out.json", b"{}")]
