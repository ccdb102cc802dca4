"""Where a FedHypeVAE (or DP-CVAE) generator's synthetic data stand against the real data, in the public space.

One run of the FedHypeVAE benchmark's configuration (``fedhypevae_benchmark.config``) with the method
options given as JSON, at the epsilon and number of rounds given; then, on the final generator (the
neutral sampler), against the real training embeddings projected the same way:

- ``syn_spread`` / ``real_spread``: mean distance of the class means to their centre;
- ``cos_offsets``: mean cosine between the synthetic and the real class offsets (class mean − centre);
- ``syn_within_std`` / ``real_within_std``: per-dimension standard deviation within a class, averaged;
- ``centre_err``: distance between the synthetic and the real centre (``real_centre_norm``: its norm);
- ``out_bias_norm``, ``label_w_spread``: the decoder's output bias norm, and the spread of the label's
  output weights (the per-class path; ``label_at_output``).

The diagnostics read private data: they are for the benchmark's analysis, never part of a run.

    python benchmarks/fedhypevae_diagnose.py before dp-cvae 10000 10 \
        '{"output_lr": null, "beta_kl": 0.1, "output_variance": false}'

Appends one JSON line to benchmarks/results/fedhypevae/class-path/diagnostics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS
from fedhypevae_benchmark import config

SETTING = "fashion-mnist-dir0.3"


def spread(means):
    return float((means - means.mean(0)).norm(dim=1).mean())


def diagnose(run_dir: Path, cfg: dict) -> dict[str, float]:
    import torch

    from protofl.algorithms import Task, get_algorithm
    from protofl.api import prepare_data, resolve_config
    from protofl.engine.checkpoint import load_checkpoint

    resolved = resolve_config(cfg)
    data = prepare_data(resolved)
    task = Task(data.input_shape, data.num_classes, resolved.model)
    algo = get_algorithm(resolved.method_name).from_options(resolved.method_options, task, resolved.privacy)
    state = load_checkpoint(run_dir / "checkpoint")["server_state"]
    x = algo.normalise(torch.cat([c.x_train for c in data.clients]))
    y = torch.cat([c.y_train for c in data.clients])
    classes = range(data.num_classes)
    real = torch.stack([x[y == k].mean(0) for k in classes])
    xs, ys = algo.synthesise(state, "neutral", 3, per_class=400)
    synthetic = torch.stack([xs[ys == k].mean(0) for k in classes])
    cos = torch.nn.functional.cosine_similarity(real - real.mean(0), synthetic - synthetic.mean(0), dim=1)
    phi = state["phi"]
    out = {
        "real_spread": spread(real),
        "syn_spread": spread(synthetic),
        "cos_offsets": float(cos.mean()),
        "real_within_std": float(torch.stack([x[y == k].std(0).mean() for k in classes]).mean()),
        "syn_within_std": float(torch.stack([xs[ys == k].std(0).mean() for k in classes]).mean()),
        "centre_err": float((synthetic.mean(0) - real.mean(0)).norm()),
        "real_centre_norm": float(real.mean(0).norm()),
        "out_bias_norm": float(phi[f"dec{len(algo.sizes) - 1}.b"].norm()),
    }
    if algo.config.label_at_output:
        out["label_w_spread"] = spread(phi[f"dec{len(algo.sizes) - 1}.w"][:, -data.num_classes :].T)
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("method", choices=["fedhypevae", "dp-cvae"])
    parser.add_argument("epsilon", type=float)
    parser.add_argument("rounds", type=int)
    parser.add_argument("options", nargs="?", default="{}", help="method options as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--privacy", default="{}", help="privacy options as JSON (e.g. the clip norm)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fedhypevae" / "class-path")
    args = parser.parse_args()

    import torch

    import protofl

    torch.set_num_threads(1)
    options = json.loads(args.options)
    cfg = config(SETTING, args.method, args.seed, args.rounds)
    cfg["privacy"]["epsilon"] = args.epsilon
    cfg["method"].update(options)
    cfg["privacy"].update(json.loads(args.privacy))
    cfg["federation"]["threads"] = 1
    run_dir = args.out / "runs" / f"diagnose-{args.name}"
    wall, cpu = time.perf_counter(), time.process_time()
    summary = protofl.run(cfg, out=run_dir).summary
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    line = {
        "name": args.name,
        "method": args.method,
        "epsilon": args.epsilon,
        "rounds": args.rounds,
        "seed": args.seed,
        "options": options,
        "privacy": json.loads(args.privacy),
        "acc": round(100 * summary["final"]["global_acc"], 2),
        "cpu_s": round(cpu),
        "wall_s": round(wall),
        "load": Path("/proc/loadavg").read_text().split()[:3],
        **diagnose(run_dir, cfg),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "diagnostics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
