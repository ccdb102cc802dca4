"""What FedHypeVAE's class-statistics release (``stats_fraction``) can carry, measured without a generator.

On the benchmark's Fashion-MNIST setting, every client's real training embeddings (in the public space)
go through the release's own mechanism (:func:`protofl.privacy.class_statistics.noisy_class_statistics`)
at the noise a share ``f`` of ε = 1 buys; the server's estimates (class means, and from the second
moments a pooled within-class covariance) then draw 400 synthetic examples per class for the benchmark's
downstream MLP, scored on the real test set. Covariance estimators compared:

- ``diag-real``: the real pooled within-class variance per dimension (not private: a reference for what
  the generator's learned diagonal can reach);
- ``floor``: the noisy pooled covariance with its eigenvalues floored at 0.05 (``stats_uses =
  ["covariance"]``);
- ``top<k>``: its top k eigen-directions at their noisy eigenvalues, the rest isotropic at the mean of the
  remaining eigenvalues (floored).

Reads private data: an analysis of the mechanism, never part of a run.

    python benchmarks/fedhypevae_stats_proxy.py --shares 0.1 0.2 0.3 0.5 1.0 --seed 0

Appends one JSON line per (share, estimator) to benchmarks/results/fedhypevae/stats-release/proxy.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS
from fedhypevae_benchmark import SETTINGS, config
from fedhypevae_diagnose import SETTING


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0])
    parser.add_argument("--estimators", nargs="+", default=["diag-real", "floor", "top4", "top8", "top16"])
    parser.add_argument("--mean-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fedhypevae" / "stats-release")
    args = parser.parse_args()

    import torch

    from protofl.algorithms import Task, get_algorithm
    from protofl.algorithms.fedhypevae import classify, train_mlp
    from protofl.api import prepare_data, resolve_config
    from protofl.privacy.accounting import calibrate_noise_multiplier
    from protofl.privacy.class_statistics import class_statistics_stds, noisy_class_statistics

    torch.set_num_threads(1)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    resolved = resolve_config(config(SETTING, "fedhypevae", args.seed, 20))
    data = prepare_data(resolved)
    algo = get_algorithm("fedhypevae").from_options(
        resolved.method_options, Task(data.input_shape, data.num_classes, resolved.model), resolved.privacy
    )
    k, radius, f_count = data.num_classes, SETTINGS[SETTING]["clip_bound"], resolved.privacy.count_fraction
    clients = [(algo.normalise(c.x_train), c.y_train) for c in data.clients]
    x = torch.cat([xc for xc, _ in clients])
    y = torch.cat([yc for _, yc in clients])
    real_means = torch.stack([x[y == c].mean(0) for c in range(k)])
    real_var = (x - real_means[y]).var(0)
    test_x, test_y = algo.normalise(data.test_x), data.test_y

    def score(means, factor):
        g = torch.Generator().manual_seed(0)
        ys = torch.arange(k).repeat_interleave(400)
        xs = means[ys] + torch.randn(len(ys), x.shape[1], generator=g) @ factor.T
        clf = train_mlp(xs, ys, k, 256, 20, 0)
        with torch.no_grad():
            return float((classify(clf, test_x).argmax(1) == test_y).float().mean())

    lines = []
    for share in args.shares:
        sigma = calibrate_noise_multiplier(share, 1e-4, 1, "rdp")
        rest = 1 - f_count
        shares = (f_count, rest * args.mean_share, rest * (1 - args.mean_share))
        stds = class_statistics_stds(sigma, radius, shares)
        g = torch.Generator().manual_seed(1000 + args.seed)
        released = [noisy_class_statistics(xc, yc, k, radius, stds, g) for xc, yc in clients]
        n = sum(r.counts for r in released).double().clamp_min(1.0)
        means = sum(r.sums for r in released).double() / n[:, None]
        means = means * (radius / means.norm(dim=1, keepdim=True).clamp_min(radius))
        pooled = sum(r.moments.sum(0) for r in released).double() / n.sum()  # type: ignore[union-attr]
        pooled = pooled - torch.einsum("c,ci,cj->ij", n / n.sum(), means, means)
        values, vectors = torch.linalg.eigh((pooled + pooled.T) / 2)  # ascending
        centre = real_means.mean(0)
        cos = torch.nn.functional.cosine_similarity(real_means - centre, means.float() - means.float().mean(0), dim=1)
        for name in args.estimators:
            if name == "diag-real":
                factor = torch.diag(real_var.sqrt())
            elif name == "floor":
                factor = torch.linalg.cholesky(vectors @ torch.diag(values.clamp_min(0.05)) @ vectors.T).float()
            else:
                top = int(name[3:])
                lam = values[-top:].clamp_min(0.05)
                iso = float(values[:-top].mean().clamp_min(0.05))
                v = vectors[:, -top:]
                cov = v @ torch.diag(lam - iso) @ v.T + iso * torch.eye(len(values), dtype=v.dtype)
                factor = torch.linalg.cholesky(cov).float()
            line = {
                "share": share,
                "sigma": round(sigma, 3),
                "estimator": name,
                "seed": args.seed,
                "cos_offsets": round(float(cos.mean()), 3),
                "acc": round(100 * score(means.float(), factor), 2),
            }
            lines.append(line)
            print(json.dumps(line), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    with open(args.out / "proxy.jsonl", "a") as f:
        for line in lines:
            f.write(json.dumps({**line, "cpu_s": round(cpu), "wall_s": round(wall)}) + "\n")


if __name__ == "__main__":
    main()
