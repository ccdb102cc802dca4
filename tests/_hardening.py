"""Helpers shared by the hardening tests (one test module per reliability principle)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

#: A quick real run: OptDigits (bundled with scikit-learn), 2 clients, 1 round.
QUICK = [
    "--set",
    "data.dataset=optdigits",
    "--set",
    "partition.num_clients=2",
    "--set",
    "federation.rounds=1",
    "--set",
    "federation.progress=false",
    "--set",
    "model.feature_dim=16",
]


def tree_hash(path: Path) -> str:
    """A digest of everything under ``path`` (names, bytes, modes; a file's own bytes and mode)."""
    path = Path(path)
    h = hashlib.sha256()
    if not path.exists():
        return "missing"
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for item in items:
        st = item.lstat()
        h.update(f"{item.relative_to(path) if item != path else '.'}:{st.st_mode}".encode())
        if item.is_file():
            h.update(item.read_bytes())
    return h.hexdigest()


def one_error_line(err: str, *needles: str) -> str:
    """The single line of stderr; asserts there is one, with no traceback, containing every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(("error:", "interrupted")), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``protofl ARGS`` in a fresh process, with this checkout's sources first on the path."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    full_env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "protofl.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )
