"""Start Flower's processes for a protofl run: on one machine (loopback) or as the pieces of a deployment.

- :func:`write_app` writes the Flower app folder (a ``pyproject.toml`` naming protofl's ServerApp and
  ClientApp and carrying the run's configuration) that ``flwr run`` submits;
- :class:`Federation` starts ``flower-superlink`` and one ``flower-supernode`` per partition as separate
  processes on loopback (free ports chosen at run time), can kill and restart a node, and stops them all;
- :func:`run_on_flower` submits the app with ``flwr run`` (deployment, or the simulation runtime) and
  waits for the ServerApp to finish writing the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import tomli_w

from protofl.config import RunConfig
from protofl.flower.settings import CONFIG_KEY, FlowerSettings
from protofl.rundir import RunFolder

#: Written by the launcher in the run folder: the run key (so a restarted server continues the nodes'
#: state) and how the run was started.
LAUNCH_FILE = "flower.json"
#: How often a SuperNode's SuperExec asks for ClientApp tasks (seconds; Flower's default is 1).
SUPEREXEC_POLL_SECONDS = 0.25


class FlowerRunError(RuntimeError):
    """A Flower process failed or the run ended with an error (the message says where to look)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower executable: next to this Python first (a virtual environment need not be activated)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FlowerRunError(f"{name} not found: install the Flower extra, pip install 'protofl[flower]'")
    return found


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    # A SuperNode's SuperExec asks for new ClientApp tasks every second by default (Flower's variable):
    # a quarter of a second takes up to 0.75 s off every message of a deployment.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_SECONDS))
    return env


def write_app(directory: Path, config: RunConfig, settings: FlowerSettings, engine: str) -> Path:
    """The Flower app folder for ``config`` (its pyproject.toml names protofl's apps)."""
    directory.mkdir(parents=True, exist_ok=True)
    app = {
        "project": {
            "name": "protofl-flower",
            "version": "1.0.0",
            "description": "protofl on Flower",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "protofl",
                    "components": {
                        "serverapp": "protofl.flower.server_app:app",
                        "clientapp": "protofl.flower.client_app:app",
                    },
                    "config": {CONFIG_KEY: config.to_toml(), "engine": engine, **settings.to_run_config()},
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(app))
    return directory


def write_connection(
    home: Path,
    name: str,
    address: str,
    *,
    insecure: bool = True,
    root_certificates: str | None = None,
    num_supernodes: int | None = None,
    client_cpus: int | None = None,
) -> None:
    """A SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` (what ``flwr run APP NAME`` uses);
    ``num_supernodes`` and ``client_cpus`` (CPUs Ray reserves per ClientApp: the cores divided by it is the
    number of ClientApps run at once) configure the simulation runtime."""
    conn: dict[str, Any] = {"address": address, "insecure": insecure}
    if root_certificates:
        conn["root-certificates"] = root_certificates
    if num_supernodes:
        conn["options"] = {"num-supernodes": num_supernodes}
        if client_cpus:
            conn["options"]["backend"] = {"client-resources": {"num-cpus": client_cpus}}
    path = home / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        import tomllib

        data = tomllib.loads(path.read_text())
    data.setdefault("superlink", {})[name] = conn
    data["superlink"].setdefault("default", name)
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))


@dataclasses.dataclass
class Federation:
    """A SuperLink and one SuperNode per partition on loopback, each its own process (``simulation``:
    a SuperLink running Flower's simulation runtime, and no SuperNodes)."""

    num_nodes: int
    workdir: Path
    simulation: bool = False
    #: Where the SuperNodes keep their state (``state-dir``); default: ``workdir/client-state``.
    state_dir: Path | None = None
    #: A folder with ``ca.crt``, ``server.pem`` and ``server.key``: TLS between every process (else
    #: ``--insecure``); the server certificate must name 127.0.0.1.
    tls_dir: Path | None = None
    #: Simulation: CPUs per ClientApp on Ray (Flower's default is 2; a node's work here is one thread, so
    #: 1 runs one ClientApp per core).
    client_cpus: int = 1

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if isinstance(self.client_cpus, bool) or not isinstance(self.client_cpus, int) or self.client_cpus < 1:
            raise ValueError(f"client_cpus must be a whole number >= 1, got {self.client_cpus!r}")
        self.workdir = Path(self.workdir)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home)
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        if self.tls_dir is not None:
            self.tls_dir = Path(self.tls_dir).resolve()
            missing = [n for n in ("ca.crt", "server.pem", "server.key") if not (self.tls_dir / n).exists()]
            if missing:
                raise FlowerRunError(f"TLS folder {self.tls_dir} lacks {', '.join(missing)}")
        self.nodes: dict[int, subprocess.Popen] = {}
        self.state_dir = Path(self.state_dir) if self.state_dir else self.workdir / "client-state"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 (owned by the process record)
        try:
            # A session of its own: stopping it stops the helpers it starts (SuperExec, app processes).
            return subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir, start_new_session=True
            )
        finally:
            log.close()

    def start(self, timeout: float = 60.0) -> Federation:
        cmd = [
            _bin("flower-superlink"),
            *self._link_tls(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            cmd.append("--simulation")
        self.superlink = self._start(cmd, "superlink.log")
        self._wait_listening(self.port, self.superlink, "superlink.log", timeout)
        write_connection(
            self.home,
            "protofl",
            self.address,
            insecure=self.tls_dir is None,
            root_certificates=str(self.tls_dir / "ca.crt") if self.tls_dir else None,
            num_supernodes=self.num_nodes if self.simulation else None,
            client_cpus=self.client_cpus if self.simulation else None,
        )
        if not self.simulation:
            for k in range(self.num_nodes):
                self.start_node(k)
        return self

    def start_node(self, k: int) -> subprocess.Popen:
        """Start (or restart) the SuperNode of partition ``k``; its state on disk survives restarts."""
        node_config = f"partition-id={k} num-partitions={self.num_nodes} state-dir='{self.state_dir}'"
        tls = ["--root-certificates", str(self.tls_dir / "ca.crt")] if self.tls_dir else ["--insecure"]
        cmd = [
            _bin("flower-supernode"),
            *tls,
            "--superlink",
            self.address,
            "--node-config",
            node_config,
            "--port",
            str(free_port()),
        ]
        self.nodes[k] = self._start(cmd, f"supernode-{k}.log")
        return self.nodes[k]

    def _link_tls(self) -> list[str]:
        if self.tls_dir is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.tls_dir / "ca.crt"),
            "--ssl-certfile",
            str(self.tls_dir / "server.pem"),
            "--ssl-keyfile",
            str(self.tls_dir / "server.key"),
        ]

    def kill_node(self, k: int) -> None:
        """SIGKILL partition ``k``'s SuperNode and everything it started, as a crash would."""
        proc = self.nodes.pop(k)
        _kill_group(proc, signal.SIGKILL)

    def _wait_listening(self, port: int, proc: subprocess.Popen, log_name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FlowerRunError(f"the SuperLink exited with code {proc.returncode}; see {self.workdir / log_name}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise FlowerRunError(f"the SuperLink did not listen on port {port} within {timeout:g} s")

    def close(self) -> None:
        """Stop every process this federation started (SIGTERM, then SIGKILL)."""
        procs = [*self.nodes.values(), *([self.superlink] if self.superlink else [])]
        for proc in procs:
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc, signal.SIGKILL)
        self.nodes.clear()
        self.superlink = None

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group of a process we started in its own session."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if sig == signal.SIGKILL:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def submit(federation: Federation, app_dir: Path) -> str:
    """``flwr run APP protofl`` against the federation's SuperLink; returns the run id."""
    res = subprocess.run(
        [_bin("flwr"), "run", str(app_dir), "protofl", "--format", "json"],
        env=federation.env,
        capture_output=True,
        text=True,
        cwd=federation.workdir,
        timeout=300,
    )
    if res.returncode != 0:
        raise FlowerRunError(f"flwr run failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    try:
        answer = json.loads(res.stdout)
    except ValueError:
        return res.stdout.strip()
    if isinstance(answer, dict) and answer.get("success") is False:
        # flwr run reports some refusals in its JSON with exit status 0: no run was started
        reason = str(answer.get("error-message", "no reason given")).strip().splitlines()[-1]
        raise FlowerRunError(f"flwr run refused the app: {reason}")
    return str(answer.get("run-id", res.stdout.strip())) if isinstance(answer, dict) else res.stdout.strip()


def prepare_run(config: RunConfig, out: Path, *, resume: bool = False, **settings: Any) -> FlowerSettings:
    """The settings of a Flower run writing to ``out``: a new run key, or the one of the run being resumed."""
    out = Path(out).resolve()
    launch = out / LAUNCH_FILE
    if resume:
        if not launch.exists():
            raise FlowerRunError(f"cannot resume: {out} holds no {LAUNCH_FILE} of an earlier Flower run")
        run_key = json.loads(launch.read_text())["run_key"]
    else:
        if (out / "checkpoint").exists():
            raise FlowerRunError(f"{out} already holds a run; resume it or choose another folder")
        run_key = uuid.uuid4().hex
        # Bad settings and a folder the run may not write are refused before anything is written.
        flower_settings = FlowerSettings(out=str(out), run_key=run_key, resume=resume, **settings)
        RunFolder(out).check()
        out.mkdir(parents=True, exist_ok=True)
        launch.write_text(json.dumps({"run_key": run_key}) + "\n")
        (out / "config.toml").write_text(config.to_toml())  # what --resume reads
        return flower_settings
    return FlowerSettings(out=str(out), run_key=run_key, resume=resume, **settings)


def wait_done(out: Path, federation: Federation | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """Wait for the ServerApp to finish; raises :class:`FlowerRunError` with its error."""
    from protofl.flower.server_app import DONE

    done = Path(out) / DONE
    deadline = time.monotonic() + timeout
    while not done.exists():
        if federation is not None and federation.superlink is not None and federation.superlink.poll() is not None:
            raise FlowerRunError(f"the SuperLink exited; see {federation.workdir / 'superlink.log'}")
        if time.monotonic() > deadline:
            raise FlowerRunError(f"the run did not finish within {timeout:g} s")
        time.sleep(0.2)
    status = json.loads(done.read_text())
    if not status["ok"] and status.get("kind") == "BudgetExceededError":
        from protofl.privacy import BudgetExceededError

        raise BudgetExceededError(status["error"].removeprefix("BudgetExceededError: "))
    if not status["ok"]:
        where = f"; see {federation.workdir / 'superlink.log'}" if federation is not None else ""
        raise FlowerRunError(f"the Flower run failed: {status['error']}{where}")
    return status


def run_on_flower(
    config: RunConfig | Any,
    out: str | Path,
    *,
    mode: str = "deployment",
    resume: bool = False,
    workdir: str | Path | None = None,
    timeout: float = 3600.0,
    tls_dir: str | Path | None = None,
    client_cpus: int = 1,
    **settings: Any,
) -> dict[str, Any]:
    """Run ``config`` on Flower on this machine and return its summary: ``mode="deployment"`` starts a
    SuperLink and one SuperNode per client as processes, ``"simulation"`` Flower's simulation runtime;
    ``tls_dir`` (ca.crt, server.pem, server.key) turns TLS on between them; ``client_cpus``: the
    simulation's CPUs per ClientApp (:class:`Federation`)."""
    from protofl.flower._require import require_flwr
    from protofl.records import read_summary
    from protofl.runner import resolve_config

    require_flwr()
    if mode not in ("deployment", "simulation"):
        raise ValueError(f"mode must be deployment or simulation, got {mode!r}")
    out = Path(out).resolve()
    if resume:
        config = RunConfig.from_toml(out / "config.toml")
    config = resolve_config(config)
    flower_settings = prepare_run(config, out, resume=resume, **settings)
    (out / "flower-done.json").unlink(missing_ok=True)
    scratch = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="protofl-flower-"))
    # The nodes run on this machine: they keep their state in the run folder, so --resume finds it.
    nodes = out / "nodes"
    if mode == "simulation" and not flower_settings.client_state_dir:
        flower_settings = dataclasses.replace(flower_settings, client_state_dir=str(nodes))
    with Federation(
        config.partition.num_clients,
        scratch,
        simulation=mode == "simulation",
        state_dir=nodes,
        tls_dir=Path(tls_dir) if tls_dir else None,
        client_cpus=client_cpus,
    ) as federation:
        app_dir = write_app(scratch / "app", config, flower_settings, f"flower-{mode}")
        submit(federation, app_dir)
        wait_done(out, federation, timeout)
    if workdir is None:  # a scratch folder of our own: its logs are only worth keeping when a run fails
        shutil.rmtree(scratch, ignore_errors=True)
    return read_summary(out)
