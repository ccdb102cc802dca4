"""The VPDR benchmark, part 2: attacks on the prototypes VPDR releases, over the same grid of epsilon and
mechanism as vpdr_privacy_utility.py (host fedproto, ``digits-domains``, the runs that script made).

For every run, every client's final personalized model is loaded from the run's last checkpoint and the
client makes one more release with the run's mechanism and noise (a fresh draw of what it released in
the last round; at epsilon = inf the clean prototypes). The attacker is white-box: it knows the frozen
encoder and the client's adapter.

(a) Membership inference: score ``−‖clip_R(z(x)) − p̃_y‖``; members = the client's training examples,
    non-members = its held-out test examples. AUC, TPR at FPR 1e-2 and 1e-3, advantage, averaged over
    clients and seeds.
(b) Prototype inversion, two ways, client ``--invert-client`` only (mnist by default), seed 0:
    - optimisation: images optimised through EfficientNet-Lite0 and the client's adapter to match the
      released prototypes (Adam lr 0.01, TV 1e-3, at most ``--steps`` steps, early stopping);
    - decoder: an MLP trained to map the client's features of *public* images (freshly rendered font
      digits, the SynthDigits-style generator with a seed no client data used) back to the images, then
      applied to the released prototypes.
    Scores: PSNR and SSIM against the closest real training image of the class, and the cosine of the
    reconstruction's feature with the clean prototype.

    python benchmarks/vpdr_attacks.py                    # after vpdr_privacy_utility.py
    python benchmarks/vpdr_attacks.py --steps 50         # quicker, weaker inversion

Writes benchmarks/results/vpdr_attacks/{membership.md, inversion.md, attacks.json, reconstructions.png}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, command_line
from vpdr_privacy_utility import EPSILONS, MECHANISMS, run_name

SETTING, HOST = "digits-domains", "fedproto"


def load_run(run_dir: Path):
    """The resolved config, the algorithm, the embedded client data, raw images and final client states."""
    from protofl.algorithms import Task, get_algorithm
    from protofl.api import prepare_data, resolve_config
    from protofl.config import RunConfig
    from protofl.data import load_dataset
    from protofl.engine.checkpoint import load_checkpoint

    cfg = resolve_config(RunConfig.from_toml(run_dir / "config.toml"))
    data = prepare_data(cfg)
    task = Task(data.input_shape, data.num_classes, cfg.model)
    algo = get_algorithm(cfg.method_name).from_options(cfg.method_options, task, cfg.privacy)
    state = load_checkpoint(run_dir / "checkpoint")
    raw = load_dataset(cfg.data.dataset, progress=False).train
    return cfg, algo, data, raw, state["client_states"]


def release(algo, params, client, seed: int):
    from protofl.algorithms.base import compute_features

    if algo.privacy_layer is None:
        classes, protos, _ = algo.local_prototypes(params, client)
        return classes, protos
    z = compute_features(algo, params, client.x_train)
    out, _ = algo.privacy_layer.release(z, client.y_train, torch.Generator().manual_seed(seed), {})
    return out.classes, out.prototypes


def membership(algo, params, client, classes, protos, clip):
    from protofl.algorithms.base import compute_features
    from protofl.privacy import membership_inference, prototype_distance_scores

    members = prototype_distance_scores(
        compute_features(algo, params, client.x_train), client.y_train, classes, protos, clip
    )
    others = prototype_distance_scores(
        compute_features(algo, params, client.x_test), client.y_test, classes, protos, clip
    )
    return membership_inference(members, others).to_dict()


def encoder_feature_fn(algo, params, image_size: int = 32):
    """Differentiable pixels -> client features: resize, ImageNet normalisation, EfficientNet-Lite0, adapter."""
    from protofl.data.embeddings import ENCODERS

    spec = ENCODERS["efficientnet-lite0"]
    encoder = spec.build()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def features(x):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return algo.features(params, encoder((x - mean) / std))

    return features


def public_digits(n: int = 3000, seed: int = 12345):
    """Font-rendered digits from the SynthDigits-style generator, a seed no benchmark data uses: public."""
    import numpy as np

    from protofl.data.digits_domains import _synth_domain

    x, y = _synth_domain(n, np.random.default_rng(seed), progress=False)
    return torch.from_numpy(x).float() / 255.0, torch.from_numpy(y)


def decoder_inversion(feature_fn, public_x: torch.Tensor, targets: torch.Tensor, epochs: int = 60, seed: int = 0):
    """Train an MLP decoder features -> images on public images, then decode ``targets``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.cat([feature_fn(public_x[i : i + 256]) for i in range(0, len(public_x), 256)])
    d, pixels = z.shape[1], public_x[0].numel()
    decoder = torch.nn.Sequential(
        torch.nn.Linear(d, 512), torch.nn.ReLU(), torch.nn.Linear(512, pixels), torch.nn.Sigmoid()
    )
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    flat = public_x.flatten(1)
    for _ in range(epochs):
        order = torch.randperm(len(z), generator=g)
        for s in range(0, len(z), 128):
            i = order[s : s + 128]
            loss = F.mse_loss(decoder(z[i]), flat[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return decoder(targets.float()).view(len(targets), *public_x.shape[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--invert-client", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=RESULTS / "vpdr" / "runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "vpdr_attacks")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from protofl.privacy import invert_prototypes, reconstruction_scores

    cells = [(m, e) for e in EPSILONS for m in MECHANISMS if not (math.isinf(e) and m == "vpp")]
    public_x, _ = public_digits()
    decoded: dict[tuple, torch.Tensor] = {}
    mia: dict[tuple, list[dict]] = {}
    inversion: dict[tuple, dict] = {}
    images: dict[tuple, torch.Tensor] = {}
    for mechanism, epsilon in cells:
        for seed in range(args.seeds):
            run_dir = args.runs / run_name(SETTING, HOST, mechanism, epsilon, seed)
            if not (run_dir / "summary.json").exists():
                raise SystemExit(f"{run_dir} has no finished run: run benchmarks/vpdr_privacy_utility.py first")
            cfg, algo, data, raw, states = load_run(run_dir)
            clip = cfg.privacy.clip_bound if cfg.privacy.mechanism != "none" else None
            for client in data.clients:
                params = states[client.client_id]["params"]
                classes, protos = release(algo, params, client, 1000 + seed)
                mia.setdefault((mechanism, epsilon), []).append(membership(algo, params, client, classes, protos, clip))
                if seed == 0 and client.client_id == args.invert_client:
                    clean_classes, clean, _ = algo.local_prototypes(params, client)
                    feature_fn = encoder_feature_fn(algo, params)
                    pool = data.partition.train[client.client_id]
                    refs = [torch.from_numpy(raw.x[pool][raw.y[pool] == int(c)]).float()[:200] for c in classes]
                    rec, history = invert_prototypes(
                        feature_fn,
                        protos,
                        tuple(raw.x.shape[1:]),
                        steps=args.steps,
                        lr=0.01,
                        tv_weight=1e-3,
                        generator=torch.Generator().manual_seed(0),
                    )
                    with torch.no_grad():
                        cos = F.cosine_similarity(
                            feature_fn(rec), clean[torch.searchsorted(clean_classes, classes)], dim=1
                        )
                    inversion[(mechanism, epsilon)] = {
                        **reconstruction_scores(rec, refs),
                        "feature_cos": float(cos.mean()),
                        "steps": len(history),
                    }
                    images[(mechanism, epsilon)] = rec
                    dec = decoder_inversion(feature_fn, public_x, protos)
                    with torch.no_grad():
                        dcos = F.cosine_similarity(
                            feature_fn(dec), clean[torch.searchsorted(clean_classes, classes)], dim=1
                        )
                    scores = reconstruction_scores(dec, refs)
                    inversion[(mechanism, epsilon)].update(
                        {
                            "decoder_psnr": scores["psnr"],
                            "decoder_ssim": scores["ssim"],
                            "decoder_feature_cos": float(dcos.mean()),
                        }
                    )
                    decoded[(mechanism, epsilon)] = dec
            print(f"{run_dir.name}: done", flush=True)
    write(args, cells, mia, inversion, images, decoded)


def write(args, cells, mia, inversion, images, decoded) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    label = {m: m for m in MECHANISMS}

    def name(m, e):
        return ("none (clean)" if m == "igpp" else "DCR only") if math.isinf(e) else label[m]

    keys = ("auc", "tpr_at_fpr_1e2", "tpr_at_fpr_1e3", "advantage")
    lines = [
        "| ε | mechanism | AUC | TPR @ FPR 1e-2 | TPR @ FPR 1e-3 | advantage | members / non-members per client |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, e in cells:
        rows = mia[(m, e)]
        vals = [
            f"{statistics.fmean(r[k] for r in rows):.3f} ± {statistics.pstdev([r[k] for r in rows]):.3f}" for k in keys
        ]
        sizes = f"{statistics.fmean(r['members'] for r in rows):.0f} / {statistics.fmean(r['non_members'] for r in rows):.0f}"
        lines.append(f"| {'∞' if math.isinf(e) else f'{e:g}'} | {name(m, e)} | " + " | ".join(vals) + f" | {sizes} |")
    header = (
        f"Host {HOST} on {SETTING}; mean ± std over clients and {args.seeds} seeds. Command: `{command_line()}`\n\n"
    )
    (args.out / "membership.md").write_text(
        "Membership inference on released prototypes. " + header + "\n".join(lines) + "\n"
    )
    inv = [
        "| ε | mechanism | optimisation: PSNR (dB) | SSIM | feature cos | steps | decoder: PSNR (dB) | SSIM | feature cos |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in cells:
        r = inversion[(m, e)]
        inv.append(
            f"| {'∞' if math.isinf(e) else f'{e:g}'} | {name(m, e)} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
            f"{r['feature_cos']:.3f} | {r['steps']} | {r['decoder_psnr']:.2f} | {r['decoder_ssim']:.3f} | "
            f"{r['decoder_feature_cos']:.3f} |"
        )
    (args.out / "inversion.md").write_text(
        f"Prototype inversion (optimisation and public-data decoder), host {HOST} on {SETTING}, client "
        f"{args.invert_client}, seed 0, scored against the closest real training image of each class. "
        f"Command: `{command_line()}`\n\n" + "\n".join(inv) + "\n"
    )
    (args.out / "attacks.json").write_text(
        json.dumps(
            {
                "membership": {f"{m}/eps{e}": v for (m, e), v in mia.items()},
                "inversion": {f"{m}/eps{e}": v for (m, e), v in inversion.items()},
            },
            indent=1,
        )
    )
    plot_grid(cells, images, name, args.out / "reconstructions.png", "optimisation")
    plot_grid(cells, decoded, name, args.out / "reconstructions_decoder.png", "public-data decoder")
    print((args.out / "membership.md").read_text())
    print((args.out / "inversion.md").read_text())


def plot_grid(cells, images, name, path: Path, how: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in cells if c in images]
    n = max(len(images[c]) for c in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.6, 1.15 * len(rows)), squeeze=False)
    for i, (m, e) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(images[(m, e)]):
                ax.imshow(images[(m, e)][j].permute(1, 2, 0).numpy())
        axes[i][0].text(
            -0.1,
            0.5,
            f"{'∞' if math.isinf(e) else f'ε={e:g}'}\n{name(m, e)}",
            transform=axes[i][0].transAxes,
            ha="right",
            va="center",
            fontsize=7,
        )
    fig.suptitle(f"Inverted prototypes ({how}; one per class), digits-domains client 0", fontsize=9, y=1.0)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
