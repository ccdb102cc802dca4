"""Principle 3, fuzzed: thousands of mutants of each loader's file, no crash but the typed error.

Each loader (IDX plain and gzip, CIFAR batches, checkpoints, summary.json for the report) gets mutants
of a valid file of its kind (tests/_fuzz.py). Every mutant must load or raise the loader's typed error
naming the file; any other exception is a crash. The set runs in a fresh process under an address-space
limit (``resource.setrlimit``: an allocation past it is a MemoryError, which no loader turns into its
typed error), and the growth of that process's peak resident memory over the loop must stay under a
limit. The default set (1,500 mutants a loader) runs in seconds; the ``slow`` set runs 20,000 a loader
with other seeds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TARGETS = ["idx-plain", "idx-gzip", "cifar", "checkpoint", "summary"]
#: Peak memory a mutant set may add to its process (the valid files are a few kB).
PEAK_GROWTH_LIMIT_MB = 64


def run_fuzz(target: str, count: int, seed: int, folder: Path, *extra: str) -> dict:
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parent / "src")}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(here / "_fuzz.py"), target, str(count), str(seed), str(folder), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The interpreter reports some memory errors only on stderr (e.g. a buffer freed while exported).
    assert "Error" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check(report: dict, count: int) -> None:
    assert report["crash_count"] == 0, report["crashes"]
    assert report["loaded"] + report["refused"] == count
    assert report["refused"] > count // 2  # the mutants do reach the checks
    assert report["peak_growth_mb"] < PEAK_GROWTH_LIMIT_MB, report


@pytest.mark.parametrize("target", TARGETS)
def test_loader_fuzz(target, tmp_path):
    report = run_fuzz(target, 1500, 0, tmp_path)
    check(report, 1500)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("seed", [1, 2])
def test_loader_fuzz_large(target, seed, tmp_path):
    report = run_fuzz(target, 20_000, seed, tmp_path)
    check(report, 20_000)


@pytest.mark.slow
def test_report_fuzz_with_plots(tmp_path):
    """The whole comparison, learning curves drawn, on fewer mutants (a plot takes 0.1 s)."""
    report = run_fuzz("summary", 300, 3, tmp_path, "--plot")
    check(report, 300)
