"""The ServerApp: loads the run's configuration and data, drives :class:`FlowerServer`, writes the run folder.

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

    from protofl.algorithms import Task, get_algorithm
    from protofl.api import (
        _write_partition_records,
        fingerprint,
        prepare_data,
        run_summary,
        write_run_records,
    )
    from protofl.flower.server import FlowerServer
    from protofl.records import write_atomic, write_metrics

    torch.manual_seed(config.seed)
    data = prepare_data(config)
    task = Task(data.input_shape, data.num_classes, config.model)
    algorithm = get_algorithm(config.method_name).from_options(config.method_options, task, config.privacy)

    class Server(FlowerServer):
        def on_round(self, row):
            write_metrics(out / "metrics.jsonl", self.history)

    server = Server(grid, algorithm, config, settings, data.test_x, data.test_y, data.test_groups,
                    fingerprint(config), engine)
    if settings.resume and not server.resume():
        # starting over under the same run key would repeat releases the nodes' ledgers already hold
        raise RuntimeError(f"cannot resume: {out / 'checkpoint'} holds no checkpoint of this run; "
                           "start a new run (without --resume) in another folder")
    if not settings.resume:
        write_atomic(out / "config.toml", config.to_toml())
    write_metrics(out / "metrics.jsonl", server.history)
    _write_partition_records(out, data)
    history = server.run()

    summary = run_summary(config, history, privacy=server.privacy, wall_seconds=server.wall_seconds,
                          seconds_per_round=server.elapsed / max(server.round, 1), bytes_up=server.bytes_up,
                          bytes_down=server.bytes_down, engine=engine, incidents=server.incidents)
    write_run_records(out, config, history, summary)
    return summary
