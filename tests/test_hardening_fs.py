"""Principle 6: read-only and odd filesystems work where they can.

A cache holding valid data is used without taking the fetch lock (no lock file is opened for writing,
so a read-only cache works); a cache path that is a file or too long is one line; a cache file changed
in place with its size and mtime kept is not seen by ``fetch`` (which trusts its size-and-mtime stamp)
but is caught by ``protofl data verify``, which hashes every file (as docs/reliability.md says).
"""

import hashlib
import os

import pytest
from _hardening import one_error_line

from protofl.cli import main
from protofl.data import sources
from protofl.data.sources import FileSpec, Source, copy_from_folder, fetch, verify


@pytest.fixture
def local_source(tmp_path, cache):
    """A source fetched by copying one file from a folder, registered for the test."""
    origin = tmp_path / "origin"
    origin.mkdir()
    payload = b"protofl" * 1000
    (origin / "data.bin").write_bytes(payload)
    spec = FileSpec("data.bin", len(payload), hashlib.sha256(payload).hexdigest())
    source = Source("hardening-local", "a local copy", (spec,), fetcher=copy_from_folder(origin))
    sources.register_source(source, replace=True)
    yield source
    sources.SOURCES.pop(source.name, None)


def test_valid_cache_is_used_without_opening_the_lock(local_source, cache):
    folder = fetch(local_source)
    lock = cache / f".{local_source.name}.lock"
    assert lock.exists()  # the first fetch took the lock
    lock.unlink()
    assert fetch(local_source) == folder
    assert not lock.exists()  # the lock file was opened for writing before (a read-only cache failed)


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_cache_with_valid_data_works(local_source, cache):
    folder = fetch(local_source)
    (cache / f".{local_source.name}.lock").unlink()
    modes = {p: p.stat().st_mode for p in [cache, *cache.rglob("*")]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert fetch(local_source) == folder
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_cache_path_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "cachefile"
    path.write_text("x")
    monkeypatch.setenv("PROTOFL_CACHE", str(path))
    assert main(["data", "fetch", "mnist"]) == 2
    one_error_line(capsys.readouterr().err, str(path), "is a file, not a folder")
    assert path.read_text() == "x"


def test_cache_path_too_long_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROTOFL_CACHE", str(tmp_path / ("c" * 300)))
    assert main(["data", "fetch", "mnist"]) == 2
    one_error_line(capsys.readouterr().err, "PROTOFL_CACHE")


def test_cache_file_changed_in_place_is_caught_by_verify(local_source):
    folder = fetch(local_source)
    path = folder / "data.bin"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert fetch(local_source) == folder  # fetch trusts the stamp (documented)
    problems = verify(local_source)  # verify hashes every file
    assert len(problems) == 1 and "data.bin: sha256" in problems[0]
    # Once verify has found it, the stale stamp is gone: the next fetch fetches a good copy again.
    fetch(local_source)
    assert verify(local_source) == []
