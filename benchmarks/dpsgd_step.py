"""The DP-SGD step benchmark: seconds per DP-SGD step, plain vs materialised per-example gradients vs ghost.

Models, batch 256:

- ``fedhypevae``: FedHypeVAE's joint DP-SGD step on (φ, ψ, c) at the default sizes (latent 32, hidden
  256, code 32, hypernetwork 64), 1280-d inputs (EfficientNet-Lite0 embeddings), 10 classes, with its
  MMD and Lipschitz terms;
- ``mlp``: an MLP 768 -> 256 -> 256 -> 100 (ReLU) with cross-entropy.

Modes, each a whole optimiser step (gradient, noise where private, Adam):

- ``plain``: the non-private batched loss, one backward pass;
- ``materialised``: per-example gradients with ``torch.func`` (``vmap(grad)``), clipped, summed, noised;
- ``ghost``: ghost clipping (:mod:`protofl.privacy.ghost`), the same clipped sum and noise.

Median seconds over ``--steps`` steps (the materialised mode: a third of them) after ``--warmup``
steps, the modes taking turns; ``--threads`` torch threads.

    python benchmarks/dpsgd_step.py                      # the documented table
    python benchmarks/dpsgd_step.py --steps 5 --warmup 1 # smoke

Writes benchmarks/results/dpsgd_step/{results.json, table.md}; ``--profile`` also prints where a ghost
step's time goes (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, command_line
from torch.func import functional_call

from protofl.algorithms import Task, get_algorithm
from protofl.algorithms.fedhypevae import batch_losses, batch_noise, ghost_clipped_sum, init_encoder, init_phi
from protofl.config import PrivacyConfig
from protofl.privacy.dpsgd import add_noise, noisy_clipped_mean, per_example_gradients
from protofl.privacy.ghost import module_clipped_sum

BATCH, CLIP, SIGMA = 256, 1.0, 1.0


def fedhypevae_steps(batch: int):
    """``{mode: step()}`` for FedHypeVAE's DP-SGD on (φ, ψ, c) as ``_train_phi`` runs it."""
    algo = get_algorithm("fedhypevae").from_options(
        {"range_reference": "unit"}, Task((1280,), 10), PrivacyConfig(mechanism="dp-sgd", planned_releases=10)
    )
    c = algo.config
    g = torch.Generator().manual_seed(0)
    phi, psi = init_phi(c, 1280, 10, g), init_encoder(c, 1280, 10, g)
    phi["hyper1.w"] = torch.randn(phi["hyper1.w"].shape, generator=g) * 0.01  # away from the zero start
    params = {
        **{"phi/" + k: v for k, v in phi.items()},
        **{"psi/" + k: v for k, v in psi.items()},
        "code": 0.1 * torch.randn(c.code_dim, generator=g),
    }
    x = torch.rand(batch, 1280, generator=g)
    y1h = F.one_hot(torch.randint(0, 10, (batch,), generator=g), 10).float()
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-4)

    def example(p, xi, yi):
        return algo.example_loss(
            {k[4:]: v for k, v in p.items() if k.startswith("phi/")},
            {k[4:]: v for k, v in p.items() if k.startswith("psi/")},
            p["code"],
            xi,
            yi,
        )

    def apply(grads):
        for k, v in params.items():
            v.grad = grads[k]
        optimizer.step()

    def plain():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = batch_losses(algo, leaves, x, y1h, batch_noise(c, batch))
        apply(dict(zip(leaves, torch.autograd.grad(loss.mean(), list(leaves.values())))))

    def materialised():
        grads = per_example_gradients(example, params, x, y1h)
        apply(noisy_clipped_mean(grads, CLIP, SIGMA, batch, g)[0])

    def ghost():
        summed, _, _ = ghost_clipped_sum(algo, params, x, y1h, batch_noise(c, batch), CLIP)
        apply(add_noise(summed, CLIP, SIGMA, batch, g))

    return {"plain": plain, "materialised": materialised, "ghost": ghost}


def mlp_steps(batch: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(768, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 100),
    )
    x, y = torch.randn(batch, 768), torch.randint(0, 100, (batch,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def apply(grads):
        for k, p in model.named_parameters():
            p.grad = grads[k]
        optimizer.step()

    def plain():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def materialised():
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads = per_example_gradients(
            lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None]), params, x, y
        )
        apply(noisy_clipped_mean(grads, CLIP, SIGMA, batch, g)[0])

    def ghost():
        summed, _, _ = module_clipped_sum(model, lambda: F.cross_entropy(model(x), y, reduction="none"), CLIP)
        apply(add_noise(summed, CLIP, SIGMA, batch, g))

    return {"plain": plain, "materialised": materialised, "ghost": ghost}


def time_interleaved(steps: dict, n: int, warmup: int, materialised_every: int = 3) -> dict[str, list[float]]:
    """Per-step seconds of each mode, the modes taking turns (plain, ghost, and every
    ``materialised_every``-th turn the slow materialised step) so that a change in the load of a shared
    machine hits every mode alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for turn in range(n):
        for mode, step in steps.items():
            if mode == "materialised" and turn % materialised_every:
                continue
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (materialised: a third)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--models", nargs="+", default=["fedhypevae", "mlp"], choices=["fedhypevae", "mlp"])
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the ghost step")
    parser.add_argument("--out", type=Path, default=RESULTS / "dpsgd_step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    makers = {"fedhypevae": fedhypevae_steps, "mlp": mlp_steps}
    results = {}
    for model in args.models:
        steps = makers[model](args.batch)
        results[model] = {}
        for mode, times in time_interleaved(steps, args.steps, args.warmup).items():
            results[model][mode] = {"median_s": statistics.median(times), "min_s": min(times), "steps": len(times)}
            print(
                f"{model} {mode}: {results[model][mode]['median_s'] * 1e3:.1f} ms/step (median of {len(times)})",
                flush=True,
            )
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    steps["ghost"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    command = command_line()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "command": command,
        "clip_norm": CLIP,
        "noise_multiplier": SIGMA,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        (
            f"Seconds per optimiser step at batch {args.batch} (median, the modes taking turns; {args.threads} "
            f"torch thread(s), CPU shared with other jobs, torch {torch.__version__}); ratio to the plain step. "
            f"Command: `{command}` (from benchmarks/)"
        ),
        "",
        "| model | plain | materialised per-example | ghost |",
        "|---|---|---|---|",
    ]
    for model, r in results.items():
        p = r["plain"]["median_s"]
        cells = [
            f"{r[m]['median_s']:.4f} s" + ("" if m == "plain" else f" ({r[m]['median_s'] / p:.1f}x)")
            for m in ("plain", "materialised", "ghost")
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out / 'table.md'}; reproduce: {command}")


if __name__ == "__main__":
    main()
