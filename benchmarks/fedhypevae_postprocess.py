"""Post-processing levers on a finished FedHypeVAE (or DP-CVAE) run, at no privacy cost.

Loads the final generator of a run written by ``fedhypevae_diagnose.py`` (its checkpoint) and, for each
combination of synthetic examples per class, downstream classifier epochs and latent temperature (the
prior's standard deviation of z scaled at synthesis), draws the neutral sampler's synthetic data the way
the run did (seed = the last round), trains the downstream MLP and scores it on the global test set. The
run's own setting (400 per class, 20 epochs, temperature 1) reproduces its accuracy. Synthesis and the
classifier see only the released generator: none of this touches private data or the privacy budget.

    python benchmarks/fedhypevae_postprocess.py fhv-s0-r20 fedhypevae 1 20 --seed 0 \
        --per-class 400 2000 4000 --epochs 20 40 --temperature 0.8 1 1.2

With ``--real-rank``, instead (no run needed; NAME only labels the lines): the non-private reference of
the within-class shape, on the real training embeddings in the same space: class means plus the pooled
within-class covariance's top r eigen-directions and a diagonal rest (r = 0: the diagonal alone), drawn
``per_class`` per class and scored the same way. Reads private data: analysis only.

    python benchmarks/fedhypevae_postprocess.py real fedhypevae 1 20 --real-rank 0 2 4 8 16 64

Appends one JSON line per combination to benchmarks/results/fedhypevae/class-path/postprocess.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from _common import RESULTS
from fedhypevae_benchmark import config
from fedhypevae_diagnose import SETTING


def real_reference(x, data):
    """``draw(per_class, rank)``: class means of the real (normalised) embeddings ``x`` plus Gaussian
    noise with the pooled within-class covariance's top ``rank`` eigen-directions and its diagonal rest."""
    import torch

    y = torch.cat([c.y_train for c in data.clients])
    means = torch.stack([x[y == k].mean(0) for k in range(data.num_classes)])
    res = x - means[y]
    cov = res.T @ res / len(x)
    values, vectors = torch.linalg.eigh(cov)  # ascending

    def draw(per_class: int, rank: int):
        g = torch.Generator().manual_seed(0)
        ys = torch.arange(data.num_classes).repeat_interleave(per_class)
        v, lam = vectors[:, len(values) - rank :], values[len(values) - rank :]
        rest = (cov - (v * lam) @ v.T).diag().clamp_min(0)
        xs = means[ys] + torch.randn(len(ys), x.shape[1], generator=g) * rest.sqrt()
        return xs + (torch.randn(len(ys), rank, generator=g) * lam.sqrt()) @ v.T, ys

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the diagnose run's name (runs/diagnose-NAME)")
    parser.add_argument("method", choices=["fedhypevae", "dp-cvae"])
    parser.add_argument("epsilon", type=float)
    parser.add_argument("rounds", type=int)
    parser.add_argument("options", nargs="?", default="{}", help="the run's method options as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, nargs="+", default=[400])
    parser.add_argument("--epochs", type=int, nargs="+", default=[20])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--real-rank", type=int, nargs="*", help="score the real-data covariance reference")
    parser.add_argument("--out", type=Path, default=RESULTS / "fedhypevae" / "class-path")
    args = parser.parse_args()

    import torch

    from protofl.algorithms import Task, get_algorithm
    from protofl.algorithms.fedhypevae import classify, train_mlp
    from protofl.api import prepare_data, resolve_config
    from protofl.engine.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    cfg = config(SETTING, args.method, args.seed, args.rounds)
    cfg["privacy"]["epsilon"] = args.epsilon
    cfg["method"].update(json.loads(args.options))
    cfg["federation"]["threads"] = 1
    resolved = resolve_config(cfg)
    data = prepare_data(resolved)
    task = Task(data.input_shape, data.num_classes, resolved.model)
    algo = get_algorithm(resolved.method_name).from_options(resolved.method_options, task, resolved.privacy)
    x_test, y_test = algo.normalise(data.test_x), data.test_y
    hidden = algo.config.classifier_hidden
    with open(args.out / "postprocess.jsonl", "a") as f:
        if args.real_rank is not None:
            draw = real_reference(algo.normalise(torch.cat([c.x_train for c in data.clients])), data)
            combos = itertools.product(args.per_class, args.epochs, args.real_rank)
        else:
            state = load_checkpoint(args.out / "runs" / f"diagnose-{args.name}" / "checkpoint")["server_state"]
            combos = itertools.product(args.per_class, args.epochs, args.temperature)
        for n, epochs, knob in combos:
            wall, cpu = time.perf_counter(), time.process_time()
            if args.real_rank is not None:
                x, y = draw(n, knob)
            else:
                x, y = algo.synthesise(state, "neutral", args.rounds, per_class=n, temperature=knob)
            clf = train_mlp(x, y, data.num_classes, hidden, epochs, seed=0)
            acc = float((classify(clf, x_test).argmax(1) == y_test).float().mean())
            line = {
                "name": args.name,
                "method": args.method,
                "epsilon": args.epsilon,
                "seed": args.seed,
                "per_class": n,
                "epochs": epochs,
                ("real_rank" if args.real_rank is not None else "temperature"): knob,
                "acc": round(100 * acc, 2),
                "cpu_s": round(time.process_time() - cpu, 1),
                "wall_s": round(time.perf_counter() - wall, 1),
                "load": Path("/proc/loadavg").read_text().split()[:3],
            }
            f.write(json.dumps(line) + "\n")
            f.flush()
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
