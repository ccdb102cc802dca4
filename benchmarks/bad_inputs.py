"""Bad inputs through the command line of a protofl source tree, for a before/after comparison.

    python benchmarks/bad_inputs.py SRC_DIR        (e.g. src, or the src of an older checkout)

Each case runs ``protofl`` with SRC_DIR first on the path and prints one JSON line: the exit code,
whether stderr holds a traceback, how many lines it holds (log warnings aside), whether a folder the
case must not touch is byte-identical afterwards, and ``ok`` (the expected exit code, no traceback, at
most one line, the folder untouched). The last line counts the cases that are ok. ``FROM=N`` starts at
case N. The same cases, and more, are the tests in tests/test_hardening_*.py; this script exists to run
them against code that predates those tests.
"""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = sys.argv[1]
BASE = Path(tempfile.mkdtemp(prefix="baseline-"))
Q = [
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


def h(p):
    p = Path(p)
    if not p.exists():
        return "missing"
    d = hashlib.sha256()
    for q in [p] if p.is_file() else sorted(p.rglob("*")):
        d.update(str(q).encode())
        if q.is_file() and q.name != ".protofl.lock":
            d.update(q.read_bytes())
    return d.hexdigest()


def cli(*args, cwd=None, env=None):
    e = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "protofl.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=e,
        timeout=900,
    )


finished = BASE / "finished"
r = cli("run", *Q, "--out", str(finished))
assert r.returncode == 0, r.stderr


def copy(name):
    d = BASE / name
    shutil.copytree(finished, d)
    return d


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


class Alloc:
    def __reduce__(self):
        return (bytearray, (10**12,))


def cifar(name, data=None, labels=(0, 1)):
    import numpy as np

    d = BASE / name
    d.mkdir()
    rng = np.random.default_rng(0)
    (d / "data_batch_1").write_bytes(
        pickle.dumps(
            {
                b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8) if data is None else data,
                b"labels": list(labels),
            },
            protocol=2,
        )
    )
    (d / "test_batch").write_bytes(
        pickle.dumps({b"data": rng.integers(0, 256, (1, 3072)).astype(np.uint8), b"labels": [1]}, protocol=2)
    )
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    return d


def case_dir(name, files):
    d = BASE / name
    d.mkdir()
    for k, v in files.items():
        (d / k).write_text(v)
    return d


cases = []


def add(name, args, folder=None, expect=2, cwd=None, env=None):
    cases.append((name, args, folder, expect, cwd, env))


for ov in [
    "partition.imbalance_factor=inf",
    "privacy.epsilon=1e300",
    "method.weight_decay=inf",
    "federation.rounds=100000000000000000000000",
    "seed=4294967296",
    "data.max_train_samples=5",
    "method.lr=nan",
    "privacy.planned_releases=1000000000000",
    "data.dataset=synthetic-gaussian:train=1000000000000",
]:
    add(f"--set {ov}", ["run", *Q, "--set", ov, "--out", str(BASE / ("o-" + hashlib.md5(ov.encode()).hexdigest()[:6]))])
cfgdir = BASE / "cfg.toml"
cfgdir.mkdir()
add("config path is a folder", ["run", str(cfgdir), "--out", str(BASE / "o-cfg")])
f = BASE / "afile"
f.write_text("mine")
add("--out is a file", ["run", *Q, "--out", str(f)], folder=f)
add("--out too long", ["run", *Q, "--out", str(BASE / ("x" * 300))])
foreign = case_dir("foreign", {"thesis.tex": "only copy"})
add("--out foreign folder", ["run", *Q, "--out", str(foreign)], folder=foreign)
empty_cwd = case_dir("cwd", {"mine.txt": "x"})
add("--out ''", ["run", *Q, "--out", ""], folder=empty_cwd, cwd=empty_cwd)
nock = copy("nock")
shutil.rmtree(nock / "checkpoint")
add("finished run without checkpoint/ as --out", ["run", *Q, "--out", str(nock)], folder=nock)
rep = copy("rep")
add("report --out <run folder>", ["report", str(finished), "--out", str(rep)], folder=rep)
add("data fetch foo", ["data", "fetch", "foo"])
add("data verify foo", ["data", "verify", "foo"])
for kind, write in {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "foreign": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
    "malicious": lambda p: p.write_bytes(pickle.dumps(Evil())),
}.items():
    d = copy("ck-" + kind)
    write(d / "checkpoint" / "state.pt")
    add(f"--resume with a {kind} checkpoint", ["run", "--resume", str(d)])
for kind, text in {"list": "[]", "empty object": "{}"}.items():
    d = copy("sum-" + kind.replace(" ", ""))
    (d / "summary.json").write_text(text)
    add(
        f"report on summary.json that is {kind}",
        ["report", str(d), "--out", str(BASE / ("rep-" + kind.replace(" ", "")))],
    )
add(
    "CIFAR batch with a malicious pickle",
    ["run", *Q, "--set", f"data.dataset=cifar:{cifar('c-evil', data=Evil())}", "--out", str(BASE / "o-ce")],
)
add(
    "CIFAR pickle asking bytearray(10**12)",
    ["run", *Q, "--set", f"data.dataset=cifar:{cifar('c-alloc', data=Alloc())}", "--out", str(BASE / "o-ca")],
)
add(
    "CIFAR float labels",
    ["run", *Q, "--set", f"data.dataset=cifar:{cifar('c-float', labels=(0.5, 1.7))}", "--out", str(BASE / "o-cf")],
)
add(
    "run with no client test split",
    [
        "run",
        "--set",
        "data.dataset=synthetic-gaussian:train=20,test=50,dim=8,classes=2",
        "--set",
        "partition.num_clients=20",
        "--set",
        "partition.min_client_size=1",
        "--set",
        "federation.rounds=1",
        "--set",
        "federation.progress=false",
        "--out",
        str(BASE / "o-nt"),
    ],
    expect=0,
)
add(
    "method.weight_decay=1e14 (every reply rejected)",
    ["run", *Q, "--set", "method.weight_decay=1e14", "--out", str(BASE / "o-wd")],
    expect=4,
)
cachefile = BASE / "cachefile"
cachefile.write_text("x")
add("cache path is a file", ["data", "fetch", "mnist"], env={"PROTOFL_CACHE": str(cachefile)})
add("flower run --min-replies -3", ["flower", "run", *Q, "--min-replies", "-3", "--out", str(BASE / "o-fl")])

cases = cases[int(os.environ.get("FROM", "0")) :]
results = []
for name, args, folder, expect, cwd, env in cases:
    before = h(folder) if folder else None
    r = cli(*args, cwd=cwd, env=env)
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
    ok = (
        r.returncode == expect
        and "Traceback" not in r.stderr
        and len(lines) <= 1
        and (folder is None or h(folder) == before)
    )
    if name.startswith("flower"):
        ok = ok and not (BASE / "o-fl").exists()
    results.append(
        {
            "case": name,
            "exit": r.returncode,
            "traceback": "Traceback" in r.stderr,
            "stderr_lines": len(lines),
            "folder_unchanged": None if folder is None else h(folder) == before,
            "ok": ok,
            "last": (lines[-1] if lines else "")[:150],
        }
    )
    print(json.dumps(results[-1]), flush=True)
print(json.dumps({"ok": sum(r["ok"] for r in results), "of": len(results)}))
