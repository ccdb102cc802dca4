"""The FedHypeVAE benchmark's privacy-utility sweep (benchmarks/fedhypevae_benchmark.py): runs stored by
earlier calls are merged by method, epsilon and seed, and the table aggregates them per cell."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fedhypevae_benchmark

    return fedhypevae_benchmark


def _generator(acc: float, eps: float) -> dict:
    final = {}
    for offset, sampler in enumerate(("neutral", "mixture", "clients")):
        final[f"global_acc_{sampler}"] = acc + offset / 100
        final[f"global_mmd_{sampler}"] = 0.01
    return {"summary": {"final": {"global_acc": acc, **final}, "epsilon": eps}, "cpu_s": 50.0, "wall_s": 60.0,
            "load": ["3.0", "3.0", "3.0"]}  # fmt: skip


def _plain(acc: float, eps: float | None, cpu: float | None = 10.0) -> dict:
    return {"summary": {"final": {"global_acc": acc}, "epsilon": eps}, "cpu_s": cpu, "wall_s": cpu,
            "load": ["2.0", "2.0", "2.0"]}  # fmt: skip


def test_a_rerun_replaces_its_own_seed_and_keeps_the_others(bench):
    key = bench.cell_key
    stored = {key("dpfedavg", 8.0, 0): _plain(0.60, 8.0), key("dpfedavg", 8.0, 1): _plain(0.62, 8.0)}
    merged = bench.merge_runs(
        stored, {key("dpfedavg", 8.0, 1): _plain(0.70, 8.0), key("dpfedavg", 1.0, 1): _plain(0.5, 1)}
    )
    assert merged[key("dpfedavg", 8.0, 0)]["summary"]["final"]["global_acc"] == 0.60
    assert merged[key("dpfedavg", 8.0, 1)]["summary"]["final"]["global_acc"] == 0.70
    assert len(merged) == 3
    assert stored[key("dpfedavg", 8.0, 1)]["summary"]["final"]["global_acc"] == 0.62  # not changed in place


def test_cells_group_by_method_and_epsilon_with_seeds_in_order(bench):
    key = bench.cell_key
    stored = {
        key("dpfedavg", 10000.0, 2): _plain(0.66, 9999.6),
        key("fedhypevae", 8.0, 1): _generator(0.64, 8.0),
        key("dpfedavg", 10000.0, 0): _plain(0.64, 9999.6),
        key("ceiling", None, 0): _plain(0.79, None),
        key("fedhypevae", 8.0, 0): _generator(0.62, 8.0),
        key("fedhypevae", 1.0, 0): _generator(0.60, 1.0),
    }
    cells = bench.sweep_cells(stored)
    # methods in the benchmark's order, epsilons ascending within a method, the ceiling apart (None)
    assert list(cells) == [("fedhypevae", 1.0), ("fedhypevae", 8.0), ("dpfedavg", 10000.0), ("ceiling", None)]
    assert [r["summary"]["final"]["global_acc"] for r in cells[("dpfedavg", 10000.0)]] == [0.64, 0.66]
    assert [r["summary"]["final"]["global_acc"] for r in cells[("fedhypevae", 8.0)]] == [0.62, 0.64]
    accs = bench.cell_accuracies(cells[("fedhypevae", 8.0)])
    assert list(accs) == ["neutral", "mixture", "clients"]
    assert accs["clients"] == pytest.approx([0.64, 0.66])
    assert bench.cell_accuracies(cells[("dpfedavg", 10000.0)]) == {"—": [0.64, 0.66]}


def test_the_table_shows_each_cell_mean_and_std_and_marks_unknown_costs(bench, tmp_path):
    key = bench.cell_key
    stored = {key("dpfedavg", 8.0, s): _plain(a, 8.0) for s, a in enumerate((0.60, 0.62, 0.64))}
    stored[key("dpfedavg", 10000.0, 0)] = _plain(0.66, 9999.6, cpu=None)  # found done, not run here
    stored[key("dpfedavg", 10000.0, 1)] = _plain(0.68, 9999.6)
    stored.update({key("ceiling", None, s): _plain(0.79, None) for s in range(3)})
    bench.write_sweep(stored, tmp_path, "fashion-mnist-dir0.3", 20, "python fedhypevae_benchmark.py --sweep 8")
    text = (tmp_path / "sweep.md").read_text()
    header, pivot_table, detail = text.split("\n\n")
    pivot = {line.split(" | ")[0].strip("| "): line for line in pivot_table.splitlines()}
    assert "| ε = 8 | ε = ∞ (10⁴) | no privacy |" in pivot["method (sampler)"]
    # 3 seeds: no seed count; 2 seeds: said; pstdev of 60/62/64 is 1.63
    assert "| 62.00 ± 1.63 | 67.00 ± 1.00 (2 seeds) | — |" in pivot["dpfedavg"]
    assert pivot["ceiling"].endswith("| — | — | 79.00 ± 0.00 |")
    assert "| 30 | 30 | 2.0, 2.0, 2.0 |" in detail  # the eps 8 cell: 3 runs of 10 CPU-s
    assert "| 10+ | 10+ |" in detail  # one of the eps 1e4 runs' cost is unknown
    assert "--sweep 8" in header
    assert (tmp_path / "sweep.png").stat().st_size > 0
