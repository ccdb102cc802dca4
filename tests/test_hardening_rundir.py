"""Principle 2: a run folder is protofl's only where protofl made it.

``--out`` must be a new or empty folder, or a run folder being resumed; anything else is refused with one
line and left byte-identical (hashed before and after). A run folder is locked while a process writes
it; ``protofl report --out`` never writes into a run folder; temporary files of interrupted atomic
writes are removed on the next start.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _hardening import QUICK, cli, one_error_line, tree_hash

from protofl.cli import main
from protofl.errors import RunFolderError, RunLockedError
from protofl.rundir import LOCK_NAME, RunFolder, leftover_temporaries


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished quick run (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["run", *QUICK, "--out", str(out)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run.name
    shutil.copytree(run, dest)
    return dest


def _foreign_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("my only copy")
    (folder / "figures").mkdir()
    (folder / "figures" / "fig.png").write_bytes(b"\x89PNG...")
    return folder


@pytest.mark.parametrize(
    "case",
    ["foreign-folder", "file", "finished-run-without-checkpoint", "finished-run-without-metrics", "only-a-config"],
)
def test_out_that_is_not_new_empty_or_resumed_is_refused_and_left_identical(case, tmp_path, capsys, finished_run):
    if case == "foreign-folder":
        out, needle = _foreign_folder(tmp_path), "holds other files"
    elif case == "file":
        out, needle = tmp_path / "notes.txt", "not a folder"
        out.write_text("keep me")
    elif case == "finished-run-without-checkpoint":  # was overwritten by the new run
        out, needle = _copy(finished_run, tmp_path), "already holds a run"
        shutil.rmtree(out / "checkpoint")
    elif case == "finished-run-without-metrics":
        out, needle = _copy(finished_run, tmp_path), "already holds a run"
        (out / "metrics.jsonl").unlink()
    else:
        out, needle = tmp_path / "c", "already holds a run"
        out.mkdir()
        (out / "config.toml").write_text("seed = 1\n")
    before = tree_hash(out)
    assert main(["run", *QUICK, "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, str(out), needle)
    assert tree_hash(out) == before


def test_empty_out_is_refused_and_the_current_folder_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    before = tree_hash(tmp_path)
    assert main(["run", *QUICK, "--out", ""]) == 2  # wrote the run into the current folder
    one_error_line(capsys.readouterr().err, "--out", "empty")
    assert tree_hash(tmp_path) == before


def test_too_long_out_is_one_line(tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    assert main(["run", *QUICK, "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "too long")


def test_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["run", *QUICK, "--out", str(tmp_path / "f" / "run")]) == 2
    one_error_line(capsys.readouterr().err, "--out")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_out_is_one_line(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["run", *QUICK, "--out", str(out)]) == 2
        one_error_line(capsys.readouterr().err, str(out))
    finally:
        out.chmod(0o755)


def test_resume_needs_a_run_folder(tmp_path, capsys):
    folder = _foreign_folder(tmp_path)
    before = tree_hash(folder)
    assert main(["run", "--resume", str(folder)]) == 2
    one_error_line(capsys.readouterr().err, "cannot resume", str(folder))
    assert tree_hash(folder) == before


def test_report_never_writes_into_a_run_folder(tmp_path, capsys, finished_run):
    run = _copy(finished_run, tmp_path)
    before = tree_hash(run)
    assert main(["report", str(run), "--out", str(run)]) == 2  # overwrote the run's plot
    one_error_line(capsys.readouterr().err, "is a run folder")
    other = _copy(finished_run, tmp_path / "other")
    before_other = tree_hash(other)
    assert main(["report", str(run), "--out", str(other)]) == 2
    one_error_line(capsys.readouterr().err, "is a run folder")
    assert tree_hash(run) == before and tree_hash(other) == before_other


def test_a_locked_run_folder_refuses_a_second_writer_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    with RunFolder(out).lock():  # another process is writing (flock conflicts between open files)
        assert main(["run", *QUICK, "--out", str(out)]) == 2
        one_error_line(capsys.readouterr().err, "being written by another protofl process", f"pid {os.getpid()}")
        with pytest.raises(RunLockedError):
            RunFolder(out, resume=True).check()
    # Released: the folder the lock created held nothing else, so it is gone.
    assert not out.exists()
    out.mkdir()
    (out / LOCK_NAME).write_text("123\n")  # a lock file nobody holds counts as empty
    RunFolder(out).check()


def test_temporary_files_of_interrupted_writes_are_removed_on_resume(tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / ".metrics.jsonl-k2j3h4.tmp").write_bytes(b"half a file")
    (run / "checkpoint" / ".state.pt-8sd7f6.tmp").write_bytes(b"half a checkpoint")
    (run / "notes.tmp").write_text("a user's file with a similar name is kept")
    assert len(leftover_temporaries(run)) == 2
    assert main(["run", "--resume", str(run)]) == 0
    assert leftover_temporaries(run) == []
    assert (run / "notes.tmp").exists()


def test_run_folder_error_is_a_protofl_error():
    with pytest.raises(RunFolderError):
        RunFolder("   ")


@pytest.mark.slow
def test_two_runs_on_one_out_exactly_one_runs(tmp_path):
    """Two ``protofl run`` processes on one --out started 0.3 s apart: one runs, the other is refused
    with the lock message (before any checkpoint exists, and without touching the run)."""
    out = tmp_path / "shared"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    args = [sys.executable, "-m", "protofl.cli", "run", *QUICK, "--set", "federation.rounds=3", "--out", str(out)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.3)
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    results = [(p.wait(timeout=600), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    one_error_line(refused, str(out), "being written by another protofl process")
    assert (out / "summary.json").exists() and (out / "checkpoint" / "state.pt").exists()


def test_refused_flower_run_leaves_no_files(tmp_path):
    pytest.importorskip("flwr")
    out = tmp_path / "fl"
    result = cli("flower", "run", *QUICK, "--min-replies", "-3", "--out", str(out))
    assert result.returncode == 2
    one_error_line(result.stderr, "min-replies")
    assert not out.exists()  # config.toml and flower.json were left behind
