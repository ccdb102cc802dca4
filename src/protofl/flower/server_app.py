"""The ServerApp: the runner (:mod:`protofl.runner`) with the round driver over a Flower grid
(:class:`~protofl.flower.transport.GridTransport`): loads the run's configuration and data, runs the rounds,
writes the run folder.

The run folder has protofl's format (config.toml, metrics.jsonl, summary.json, checkpoint/, report.md,
plots), so ``protofl report`` compares Flower runs with in-process runs; summary.json adds ``engine``
and ``incidents`` (nodes lost, replies rejected, with reasons).
"""

from __future__ import annotations

import logging
from pathlib import Path

from protofl.flower._require import require_flwr

require_flwr()

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

log = logging.getLogger("protofl.flower")

app = ServerApp()

#: Written next to summary.json when the run ends (whatever way): the launcher waits for it.
DONE = "flower-done.json"


@app.main()
def main(grid: Grid, context: Context) -> None:
    from protofl.flower.settings import FlowerSettings, run_config_of

    settings = FlowerSettings.from_run_config(context.run_config)
    out = Path(settings.out)
    try:
        run_server(grid, run_config_of(context.run_config), settings, str(context.run_config.get("engine", "flower")))
    except BaseException as exc:
        _write_done(out, error=f"{type(exc).__name__}: {exc}", kind=type(exc).__name__)
        raise
    _write_done(out, error=None)


def _write_done(out: Path, error: str | None, kind: str | None = None) -> None:
    from protofl.records import write_json

    write_json(out / DONE, {"ok": error is None, "error": error, "kind": kind})


def run_server(grid, config, settings, engine: str):
    """Run ``config`` over ``grid`` and write the run folder ``settings.out`` (its log in ``server.log``)."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    # The server's log (nodes lost, replies rejected, resumes) goes to the run folder's server.log too.
    logger = logging.getLogger("protofl")
    handler = logging.FileHandler(out / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        return _run(grid, config, settings, engine, out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _run(grid, config, settings, engine: str, out: Path):
    import torch

    from protofl.engine.rounds import RoundDriver
    from protofl.flower.transport import GridTransport
    from protofl.runner import prepare_data, run_rounds
    from protofl.runtime import resolve_device

    torch.manual_seed(config.seed)
    if config.federation.compile:
        logging.getLogger("protofl.flower").warning(
            "federation.compile = true: Flower nodes train per client, so nothing is compiled on them"
        )
    data = prepare_data(config, device=resolve_device(config.federation.device))
    from protofl.data.shared import PartitionStore, data_key

    # the nodes on this machine (the simulation's, a deployment's on loopback) read their rows from it
    PartitionStore.default().ensure(data_key(config), lambda: data)

    def driver(algorithm, **kwargs) -> RoundDriver:
        transport = GridTransport(grid, algorithm, config.partition.num_clients, settings, engine)
        return RoundDriver(
            algorithm,
            transport,
            config.federation,
            config.seed,
            test_x=data.test_x,
            test_y=data.test_y,
            test_groups=data.test_groups,
            **kwargs,
        )

    summary, _history = run_rounds(config, data, driver, out, resume=settings.resume, require_checkpoint=True)
    return summary
