"""Where FedTGP's global prototypes lie against the clients' features, on the `linear` and `adapter` models.

FedTGP's server trains its global prototypes P (a generator over class embeddings) to tell the uploaded
client prototypes apart by a margin; its clients then pull their features toward P (λ·MSE). On the
``linear`` model (a head on frozen embeddings) the features cannot move; on the ``adapter`` model they
can. This script runs FedTGP without a release (ε = ∞; the VPP-selection benchmark's cell: its settings,
hosts and local training, :mod:`vpp_selection`) on each model, loads the final checkpoint (P from the
server state, each client's model from its state) and measures, per client (then the mean over
clients and the mean ± std over seeds):

- ``acc P``: nearest-P accuracy on the client's test split (the hosts' ``personal_proto_acc``);
- ``top class share``: the share of the test split that nearest-P puts in its most-predicted class;
- ``acc means``: the same with P replaced by the class means of the clients' train features
  (per class, the unweighted mean over clients of each client's class mean: what FedProto's server
  builds), and ``acc own``: by the client's own class means;
- ``uploads by P``: the share of the clean uploads (each client's class means) whose nearest P is their
  class: how well the server fits what it was trained on;
- ``‖P − m‖``: the distance of P_c to the class mean m_c (mean over classes), beside ‖m‖, ‖P‖ and the
  smallest and median distance between two class means; ``cos``: the cosine between P_c − mean(P) and
  m_c − mean(m) (does P keep the classes' layout, up to a shift?);
- ``live units``: the share of the generator's hidden ReLU units that are positive for at least one class
  (0: every class gets the same prototype, fc2's bias), and the largest distance between two P.

    python benchmarks/fedtgp_prototypes.py --models linear adapter --seeds 3 --rounds 5
    python benchmarks/fedtgp_prototypes.py --models linear --server-epochs 1000   # the reference's epochs

Writes benchmarks/results/vpp_selection/fedtgp_prototypes<suffix>.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import vpdr_privacy_utility as vpdr
import vpp_selection
from _common import RESULTS, command_line

import protofl
from protofl.algorithms.base import compute_features
from protofl.api import resolve_config
from protofl.engine.checkpoint import load_checkpoint
from protofl.runner import build_algorithm, prepare_data

METRICS = (
    ("acc P", "acc_p"),
    ("top class share", "top_class_share"),
    ("acc means", "acc_means"),
    ("acc own", "acc_own"),
    ("uploads by P", "upload_acc_p"),
    ("uploads by means", "upload_acc_means"),
    ("‖P − m‖", "dist_p_m"),
    ("‖m‖", "norm_m"),
    ("‖P‖", "norm_p"),
    ("min / median ‖m_c − m_c'‖", "gaps_m"),
    ("cos", "cos"),
    ("live units", "live_units"),
    ("max ‖P_c − P_c'‖", "distinct_p"),
)


def nearest(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), protos.double()).argmin(1)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[int, torch.Tensor]:
    return {c: features[labels == c].double().mean(0) for c in range(num_classes) if bool((labels == c).any())}


def diagnose(cell: dict, method_overrides: dict) -> dict:
    """One FedTGP run at ε = ∞ of ``cell`` (setting, model, seed, rounds) and the measures above."""
    variant = vpp_selection.VARIANTS["igpp"]
    config = vpp_selection.config(
        cell["setting"], "fedtgp", variant, math.inf, cell["seed"], cell["rounds"], cell["model"]
    )
    config["method"].update(method_overrides)
    config["federation"].update(checkpoint_every=cell["rounds"], eval_every=cell["rounds"])
    with tempfile.TemporaryDirectory() as tmp:
        result = protofl.run(config, out=Path(tmp) / "run")
        checkpoint = load_checkpoint(Path(tmp) / "run" / "checkpoint")
    assert checkpoint is not None, "the run wrote no final checkpoint"
    resolved = resolve_config(config)
    data = prepare_data(resolved)
    algorithm = build_algorithm(resolved, data)
    server, states = checkpoint["server_state"], checkpoint["client_states"]
    classes = server["classes"].tolist()
    assert classes == list(range(data.num_classes)), f"global prototypes for classes {classes} only"
    protos = server["prototypes"].double()
    with torch.no_grad():
        feats = {
            c.client_id: (
                compute_features(algorithm, states[c.client_id]["params"], c.x_train),
                compute_features(algorithm, states[c.client_id]["params"], c.x_test),
            )
            for c in data.clients
        }
    own = {c.client_id: class_means(feats[c.client_id][0], c.y_train, data.num_classes) for c in data.clients}
    # per class: the unweighted mean over the clients that hold it
    means = torch.stack([torch.stack([own[k][c] for k in own if c in own[k]]).mean(0) for c in range(data.num_classes)])
    acc_p, acc_means, acc_own, up_p, up_means, top = [], [], [], [], [], []
    for c in data.clients:
        train, test = feats[c.client_id]
        table = torch.stack([own[c.client_id].get(k, means[k]) for k in range(data.num_classes)])
        pred = nearest(test, protos)
        acc_p.append(float((pred == c.y_test).double().mean()))
        top.append(float(torch.bincount(pred, minlength=data.num_classes).max()) / len(pred))
        acc_means.append(float((nearest(test, means) == c.y_test).double().mean()))
        acc_own.append(float((nearest(test, table) == c.y_test).double().mean()))
        held = sorted(own[c.client_id])
        uploads = torch.stack([own[c.client_id][k] for k in held])
        target = torch.tensor(held)
        up_p.append(float((nearest(uploads, protos) == target).double().mean()))
        up_means.append(float((nearest(uploads, means) == target).double().mean()))
    gen = server["generator"]
    hidden = gen["embedding"].double() @ gen["fc1.weight"].double().t() + gen["fc1.bias"].double()
    gaps = torch.pdist(means)
    centred_p, centred_m = protos - protos.mean(0), means - means.mean(0)
    return {
        **cell,
        "reported_proto_acc": result.history[-1].get("personal_proto_acc_mean"),
        "server_loss_last": result.history[-1].get("server_server_loss_last"),
        "margin": result.history[-1].get("server_margin"),
        "acc_p": statistics.fmean(acc_p),
        "acc_means": statistics.fmean(acc_means),
        "acc_own": statistics.fmean(acc_own),
        "upload_acc_p": statistics.fmean(up_p),
        "upload_acc_means": statistics.fmean(up_means),
        "top_class_share": statistics.fmean(top),
        "dist_p_m": float((protos - means).norm(dim=1).mean()),
        "norm_m": float(means.norm(dim=1).mean()),
        "norm_p": float(protos.norm(dim=1).mean()),
        "gap_min": float(gaps.min()),
        "gap_median": float(gaps.median()),
        "live_units": float((hidden > 0).any(0).double().mean()),
        "distinct_p": float(torch.pdist(protos).max()),
        "cos": float(torch.nn.functional.cosine_similarity(centred_p, centred_m, dim=1).mean()),
    }


def fmt(rows: list[dict], key: str) -> str:
    if key == "gaps_m":
        return f"{statistics.fmean(r['gap_min'] for r in rows):.3f} / {statistics.fmean(r['gap_median'] for r in rows):.3f}"
    values = [r[key] for r in rows]
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=sorted(vpdr.SETTINGS), choices=sorted(vpdr.SETTINGS))
    parser.add_argument("--models", nargs="+", default=["linear", "adapter"], choices=sorted(vpdr.MODELS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server-epochs", type=int, default=None, help="FedTGP's server_epochs (default: the host's)")
    parser.add_argument("--server-optimizer", default=None, choices=["sgd", "adam"])
    parser.add_argument("--server-lr", type=float, default=None)
    parser.add_argument("--suffix", default="", help="appended to the output file's name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {
        k: v
        for k, v in {
            "server_epochs": args.server_epochs,
            "server_optimizer": args.server_optimizer,
            "server_lr": args.server_lr,
        }.items()
        if v is not None
    }
    wall, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    rows = []
    for setting in args.settings:
        for model in args.models:
            for seed in range(args.seeds):
                row = diagnose({"setting": setting, "model": model, "seed": seed, "rounds": args.rounds}, overrides)
                rows.append(row)
                print(row, flush=True)
    lines = [
        f"`{command_line()}`: FedTGP at ε = ∞ (no release), {args.rounds} rounds, method overrides {overrides or 'none'}; "
        f"mean over clients, then mean ± std over {args.seeds} seeds; {time.process_time() - cpu:.0f} CPU-s, "
        f"{time.perf_counter() - wall:.0f} s wall, 1-minute load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end. Chance: 0.100.",
        "",
        "| setting | model | " + " | ".join(name for name, _ in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for setting in args.settings:
        for model in args.models:
            cell = [r for r in rows if (r["setting"], r["model"]) == (setting, model)]
            lines.append(f"| {setting} | {model} | " + " | ".join(fmt(cell, key) for _, key in METRICS) + " |")
    mismatch = [r for r in rows if abs(r["acc_p"] - r["reported_proto_acc"]) > 1e-6]
    lines += [
        "",
        f"`acc P` equals the run's own `personal_proto_acc_mean` in {len(rows) - len(mismatch)} of {len(rows)} runs"
        + (f" (differs in {[(r['setting'], r['model'], r['seed']) for r in mismatch]})" if mismatch else "")
        + "; FedTGP's final server loss (margin loss on the uploads) "
        + ", ".join(
            f"{s}/{m}: {statistics.fmean(r['server_loss_last'] for r in rows if (r['setting'], r['model']) == (s, m)):.3f}"
            for s in args.settings
            for m in args.models
        )
        + ".",
    ]
    out = RESULTS / "vpp_selection" / f"fedtgp_prototypes{args.suffix}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
