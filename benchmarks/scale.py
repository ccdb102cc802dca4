"""Many clients on cached embeddings: FedProto with N clients (default 500) on EfficientNet-Lite0
embeddings of Fashion-MNIST, Dirichlet(0.5). Reports seconds per round and the peak memory of the
process. Writes benchmarks/results/scale/{table.md, summary-N.json}.

    python benchmarks/scale.py --clients 500 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import RESULTS, command_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale")
    args = parser.parse_args()

    # Embed first, in another process (cached on disk), so the figures below are of the federated run.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from protofl.data import embed, load_dataset; "
            "embed(load_dataset('fashion-mnist'), encoder='efficientnet-lite0', image_size=32)",
        ],
        check=True,
    )
    import protofl

    config = {
        "seed": 0,
        "data": {"dataset": "fashion-mnist", "features": "efficientnet-lite0", "image_size": 32},
        "partition": {"scheme": "dirichlet", "alpha": args.alpha, "num_clients": args.clients, "min_client_size": 10},
        "federation": {"rounds": args.rounds, "checkpoint_every": 0},
        "model": {"feature_dim": 64, "hidden_dim": 128},
        "method": {
            "name": "fedproto",
            "optimizer": "adam",
            "lr": 0.001,
            "batch_size": 50,
            "local_epochs": args.local_epochs,
        },
    }
    run_dir = args.out / "runs" / f"fedproto-{args.clients}"
    result = protofl.run(config, out=run_dir)
    s = result.summary
    row = (
        f"| fedproto | {args.clients} | {args.rounds} | {s['seconds_per_round']:.2f} | "
        f"{sum(r['eval_seconds'] for r in result.history) / len(result.history):.2f} | {s['peak_memory_mb']:.0f} | "
        f"{s['bytes_up'] / args.rounds / 1e6:.2f} | {s['bytes_down'] / args.rounds / 1e6:.2f} | "
        f"{100 * s['final']['personal_acc_mean']:.2f} ± {100 * s['final']['personal_acc_std']:.2f} |"
    )
    table = (
        f"FedProto, {args.clients} clients, Fashion-MNIST EfficientNet-Lite0 embeddings (1280-d, cached), "
        f"Dirichlet alpha={args.alpha}, adapter + MLP head (d=64), all clients every round, {args.local_epochs} local epochs, Adam lr 1e-3, batch 50. "
        "Peak RSS is the whole process (data, embeddings, 500 client states, evaluation).\n\n"
        f"Command: `{command_line()}`\n\n"
        "| method | clients | rounds | s / round (training) | s / evaluation | peak RSS (MB) | MB up / round "
        "| MB down / round | personalised acc, final (%) |\n|---|---|---|---|---|---|---|---|---|\n" + row + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    (args.out / f"summary-{args.clients}.json").write_text(json.dumps(s, indent=1))
    print(table)


if __name__ == "__main__":
    main()
