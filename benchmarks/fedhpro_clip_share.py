"""How much of private FedHPro's per-example clip its hyper-prototype terms take.

Private FedHPro (``privacy.mechanism = "dp-gradients"``) clips each example's gradient of
``CE + hpcl_weight · HPCL + hpal_weight · HPAL`` as one vector to ``privacy.clip_norm``. For a finished run
(its final checkpoint) this script takes one Poisson-sized batch of every client's train split at the
model and hyper-prototypes the server broadcast after the last round, and measures per example the norm
of each term's gradient (CE, HPCL, HPAL, each with its weight), the cosine between the CE gradient and the
HP terms' gradient, the norm of the whole gradient and how much of the CE gradient survives the clip:
``‖g_CE‖ · min(1, C/‖g‖)`` (clipped together, as the run does) against ``min(‖g_CE‖, C)`` (what the
clip would keep of the CE gradient alone). The terms' gradients are checked to add up to the gradient of
the method's own loss; each term's loss (weighted) is reported beside them.

    python benchmarks/fedhpro_clip_share.py RUN_FOLDER [RUN_FOLDER ...] [--examples 64]

Prints one table row per run (medians over the examples, all clients pooled) and writes
``clip_share.json`` into each run folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def measure(folder: Path, examples: int, seed: int = 0) -> dict:
    from protofl.algorithms.fedhpro import hpal_loss, hpcl_loss
    from protofl.api import resolve_config
    from protofl.config import RunConfig
    from protofl.privacy.dpsgd import per_example_gradients
    from protofl.runner import build_algorithm, prepare_data
    from protofl.training import masked_cross_entropy

    config = resolve_config(RunConfig.from_toml(folder / "config.toml"))
    if config.method_name != "fedhpro":
        raise SystemExit(f"{folder}: a run of {config.method_name}, not fedhpro")
    state = torch.load(folder / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    data = prepare_data(config)
    algorithm = build_algorithm(config, data)
    cfg = algorithm.config
    clip = config.privacy.clip_norm
    received = algorithm.broadcast(state["server_state"])
    params = {k: v.detach() for k, v in algorithm.received_params(received).items()}
    context = algorithm.context(received)
    if not context["use_hp"]:
        raise SystemExit(f"{folder}: no class has matched hyper-prototypes (or both HP weights are 0)")
    one = torch.ones(1)

    def has(y):
        return context["ready"][y].to(torch.float32)

    def ce(p, x, y):
        return masked_cross_entropy(algorithm.forward(p, x[None])[1], y[None], one)

    def hpcl(p, x, y):
        z = algorithm.forward(p, x[None])[0]
        scale = cfg.hpcl_weight / (cfg.batch_size if cfg.hpcl_normalisation == "batch-size" else 1)
        return scale * hpcl_loss(
            z, y[None], context["summaries"], cfg.temperature, context["kappa"], context["classes"], has(y[None])
        )

    def hpal(p, x, y):
        z = algorithm.forward(p, x[None])[0]
        return cfg.hpal_weight * hpal_loss(z, context["means"][y[None]], cfg.hpal_beta, has(y[None]))

    def full(p, x, y):
        return algorithm.loss(p, x[None], y[None], one, context)

    def flat(grads):
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)

    terms = [("ce", ce), ("hpcl", hpcl), ("hpal", hpal)]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for client in data.clients:
        index = torch.randperm(client.num_train, generator=generator)[:examples]
        x, y = client.x_train[index], client.y_train[index]
        g = {name: flat(per_example_gradients(fn, params, x, y)) for name, fn in [*terms, ("full", full)]}
        error = (g["ce"] + g["hpcl"] + g["hpal"] - g["full"]).norm(dim=1).max()
        if error > 1e-4 * max(float(g["full"].norm(dim=1).max()), 1.0):
            raise SystemExit(f"{folder}: the terms' gradients do not add up to the loss's gradient ({error:.2e})")
        with torch.no_grad():
            losses = {name: torch.stack([fn(params, x[i], y[i]) for i in range(len(y))]) for name, fn in terms}
        hp = g["hpcl"] + g["hpal"]
        norm = {name: v.norm(dim=1) for name, v in g.items()}
        scale = (clip / norm["full"].clamp_min(1e-12)).clamp(max=1.0)
        for i in range(len(y)):
            rows.append(
                {
                    "client": client.client_id,
                    "label": int(y[i]),
                    "ce": float(norm["ce"][i]),
                    "hpcl": float(norm["hpcl"][i]),
                    "hpal": float(norm["hpal"][i]),
                    "hp": float(hp[i].norm()),
                    "full": float(norm["full"][i]),
                    "cos_ce_hp": float(torch.nn.functional.cosine_similarity(g["ce"][i], hp[i], dim=0)),
                    "ce_kept_together": float(norm["ce"][i] * scale[i]),
                    "ce_kept_alone": float(norm["ce"][i].clamp(max=clip)),
                    **{f"loss_{name}": float(v[i]) for name, v in losses.items()},
                }
            )
    result = {"round": state["round"], "clip_norm": clip, "examples": rows}
    (folder / "clip_share.json").write_text(json.dumps(result))
    return result


def median(values) -> float:
    return float(torch.tensor(list(values)).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--examples", type=int, default=64, help="examples per client")
    args = parser.parse_args()
    print(
        "| run | round | examples | median ‖g_CE‖ | median ‖g_HPCL‖ | median ‖g_HPAL‖ | median cos(g_CE, g_HP) "
        "| median ‖g‖ | clipped (%) | CE kept, clipped together / alone (mean) | mean loss CE / HPCL / HPAL |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.runs:
        r = measure(folder, args.examples)
        rows = r["examples"]
        kept = sum(e["ce_kept_together"] for e in rows) / sum(e["ce_kept_alone"] for e in rows)
        clipped = 100 * sum(e["full"] > r["clip_norm"] for e in rows) / len(rows)
        print(
            f"| {folder.name} | {r['round']} | {len(rows)} | {median(e['ce'] for e in rows):.3f} "
            f"| {median(e['hpcl'] for e in rows):.3f} | {median(e['hpal'] for e in rows):.3f} "
            f"| {median(e['cos_ce_hp'] for e in rows):.2f} | {median(e['full'] for e in rows):.3f} "
            f"| {clipped:.0f} | {kept:.2f} | "
            + " / ".join(f"{sum(e[f'loss_{t}'] for e in rows) / len(rows):.3f}" for t in ("ce", "hpcl", "hpal"))
            + " |"
        )


if __name__ == "__main__":
    main()
