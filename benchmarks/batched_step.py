"""One local step of the speed benchmark's batched round, in the forms considered for it, and the rate of
its matrix products: what the round's training costs and what each alternative would save.

The step: the speed benchmark's workload at N = 100 (``benchmarks/speed.py``: 100 clients' batches of 50
rows, the adapter + MLP model, FedProto's CE + MSE loss with a prototype table), one step's gradients of
every client. Forms:

- ``vmap(grad)``: protofl's general batched step (``protofl.training.train_batched``): ``vmap`` of
  ``grad_and_value`` of one client's loss;
- ``vmap forward + one backward``: ``vmap`` of the loss, then one backward of the sum of the clients'
  losses (each client's loss depends on its own parameters only, so the gradients are the same up to the
  order of float additions);
- ``stacked autograd``: protofl's stacked step (``protofl.stacked``, what protofl runs for this model and
  loss): the model's and the loss's own code on the stacked parameters, ``F.linear`` as ``baddbmm``, one
  backward of the summed losses;
- ``hand-written batched forward``: the model written out with ``torch.baddbmm`` (bias inside the
  product) and the loss without ``vmap``, one backward: a reference for how far eager execution goes
  (it is this one model only);
- ``torch.compile(vmap(grad))`` with ``--compile``: its compile time is printed.

CPU seconds (``time.process_time``), the minimum and median over repetitions, and the largest difference
of each form's gradients from ``vmap(grad)``'s. Also the rate of ``torch.bmm`` at the step's shapes.

    python benchmarks/batched_step.py [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of vmap(grad)")
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()

    import torch
    from speed import WORKLOAD, synthetic_clients
    from torch.func import grad_and_value, vmap

    from protofl.runtime import apply_threads
    from protofl.stacked import stacked_grad_and_value
    from protofl.training import ClientBatch, batch_schedule, broadcast_params

    apply_threads(args.threads)
    k = 100
    clients, algo = synthetic_clients(k)
    batch = ClientBatch.of([d.x_train for d in clients], [d.y_train for d in clients])
    schedule = batch_schedule(batch, WORKLOAD["batch_size"], 1, [torch.Generator().manual_seed(c) for c in range(k)])
    params = broadcast_params(algo.initial_params(0), k)
    params = {n: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for n, v in params.items()}
    classes, dim = WORKLOAD["classes"], WORKLOAD["feature_dim"]
    table = torch.randn(classes, dim, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(classes, dtype=torch.bool)
    context = (table, mask)
    index = schedule.index[0]
    x, y, w = batch.x[index], batch.y[index], schedule.weight[0]
    names = list(params)

    step = vmap(grad_and_value(algo.loss), in_dims=(0, 0, 0, 0, None))
    losses = vmap(algo.loss, in_dims=(0, 0, 0, 0, None))
    leaves = {n: v.clone().requires_grad_(True) for n, v in params.items()}

    def vmap_grad():
        return step(params, x, y, w, context)[0]

    def one_backward():
        return dict(zip(names, torch.autograd.grad(losses(leaves, x, y, w, context).sum(), list(leaves.values()))))

    def linear(name, h):
        return torch.baddbmm(leaves[name + ".bias"].unsqueeze(1), h, leaves[name + ".weight"].transpose(1, 2))

    def hand_written():
        h = x + linear("adapter_up", torch.relu(linear("adapter_down", x)))
        z = torch.relu(linear("mlp.2", torch.relu(linear("mlp.0", h))))
        logits = linear("head", z)
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        ce = (nll * w).sum(1) / w.sum(1).clamp_min(1)
        wm = mask[y].float() * w
        mse = (((z - table[y]) ** 2).sum(-1) * wm).sum(1) / (wm.sum(1).clamp_min(1) * z.shape[-1])
        return dict(zip(names, torch.autograd.grad((ce + mse).sum(), list(leaves.values()))))

    stacked = stacked_grad_and_value(algo.loss)
    forms = {
        "vmap(grad)": vmap_grad,
        "vmap forward + one backward": one_backward,
        "stacked autograd": lambda: stacked(params, x, y, w, context)[0],
    }
    if set(names) == {
        f"{m}.{p}" for m in ("adapter_down", "adapter_up", "mlp.0", "mlp.2", "head") for p in ("weight", "bias")
    }:
        forms["hand-written batched forward"] = hand_written
    if args.compile:
        compiled = torch.compile(step, dynamic=False)
        wall, cpu = time.perf_counter(), time.process_time()
        compiled(params, x, y, w, context)
        print(
            f"torch.compile(vmap(grad)): first call {time.perf_counter() - wall:.1f} s wall, "
            f"{time.process_time() - cpu:.1f} s CPU of this process (the C++ compiler runs in others)"
        )
        forms["torch.compile(vmap(grad))"] = lambda: compiled(params, x, y, w, context)[0]
    reference = vmap_grad()
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repetitions):
        for name, form in forms.items():  # in turn, so that each sees about the same load
            form()
            start = time.process_time()
            for _ in range(10):
                form()
            times[name].append((time.process_time() - start) / 10)
    print(f"one step of {k} clients, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    for name, form in forms.items():
        grads = form()
        diff = max(float((grads[n] - reference[n]).abs().max()) for n in names)
        print(
            f"  {name:32s} {1e3 * min(times[name]):6.2f} ms CPU (median {1e3 * statistics.median(times[name]):.2f}),"
            f" largest gradient difference {diff:.1e}"
        )
    print("torch.bmm at the step's shapes (clients x rows x in -> out):")
    for rows, n_in, n_out in ((50, 32, 32), (50, 32, 64), (50, 64, 64), (50, 64, 10), (200, 64, 64)):
        a, b = torch.randn(k, rows, n_in), torch.randn(k, n_in, n_out)
        for _ in range(5):
            torch.bmm(a, b)
        start = time.process_time()
        for _ in range(100):
            torch.bmm(a, b)
        seconds = (time.process_time() - start) / 100
        print(
            f"  {k} x {rows} x {n_in} -> {n_out}: {1e6 * seconds:.0f} us, {2 * k * rows * n_in * n_out / seconds / 1e9:.0f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
