"""``federation.device``: every method keeps its model, state and training tensors on the configured
device, payloads and checkpoints on the CPU, and its random draws on the CPU generators.

This machine has no CUDA device, so the guards here are CPU-side:

- every method runs with ``device = "cpu"`` while torch's default device is ``meta``: a tensor created
  without naming its device (a factory call, a model built on the default device) becomes a meta tensor
  and the run fails (meta tensors hold no data); its results must equal the default run's, bit for bit;
- a static check over the source: every tensor factory names its device, every array sent comes through
  ``.cpu()``, every array received is moved onto the device (a few payload helpers work on the CPU by
  design: listed with their reason);
- a resumed run's states (read from a CPU checkpoint) land on the method's device.

The CUDA tests at the end run only where torch sees a CUDA device.
"""

import ast
import contextlib
import math
from pathlib import Path

import pytest
import torch

import protofl
from protofl.engine import RunInterrupted
from protofl.engine.checkpoint import load_checkpoint, on_device

SRC = Path(protofl.__file__).resolve().parent

BASE = {
    "seed": 1,
    "data": {"dataset": "optdigits", "max_train_samples": 300},
    "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 3},
    "federation": {"rounds": 2, "progress": False, "threads": 1},
    "model": {"feature_dim": 8},
}
LOCAL = {"lr": 0.1, "batch_size": 32, "local_epochs": 1}
DP_SGD = {"mechanism": "dp-sgd", "epsilon": 8.0, "accountant": "rdp"}  # rdp: calibrates in a fraction of the time
DP_GRADIENTS = {"mechanism": "dp-gradients", "epsilon": 8.0, "accountant": "rdp"}
#: private CReFF and FedHPro: DP-SGD steps and a released class-gradient upload, kept short
PRIVATE_GRADIENTS = {
    "steps_per_round": 2,
    "grad_samples": 0,
    "features_per_class": 5,
    "retrain_epochs": 2,
    "match_steps": 3,
}

#: case -> (method options, federation options, privacy section): every method, the batched client step,
#: both prototype releases, DCR and the private gradient uploads of CReFF and FedHPro.
CASES = {
    "local": ({"name": "local", **LOCAL}, {}, {}),
    "fedavg": ({"name": "fedavg", **LOCAL}, {}, {}),
    "fedavg-batched": ({"name": "fedavg", **LOCAL}, {"execution": "batched"}, {}),
    "fedprox": ({"name": "fedprox", **LOCAL}, {}, {}),
    "fedproto": ({"name": "fedproto", **LOCAL}, {}, {}),
    "fedproto-batched-igpp": (
        {"name": "fedproto", **LOCAL},
        {"execution": "batched"},
        {"mechanism": "igpp", "epsilon": 8.0, "accountant": "rdp"},
    ),
    "fedproto-vpp-dcr": (
        {"name": "fedproto", **LOCAL},
        {},
        {"mechanism": "vpp", "epsilon": 8.0, "dcr": True, "accountant": "rdp"},
    ),
    "fpl": ({"name": "fpl", **LOCAL}, {}, {}),
    "fedtgp": ({"name": "fedtgp", **LOCAL}, {}, {}),
    "fedgh": ({"name": "fedgh", **LOCAL}, {}, {}),
    "creff": ({"name": "creff", **LOCAL}, {}, {}),
    "fedhpro": ({"name": "fedhpro", **LOCAL}, {}, {}),
    "creff-dp-gradients": ({"name": "creff", **LOCAL, **PRIVATE_GRADIENTS}, {}, DP_GRADIENTS),
    "fedhpro-dp-gradients": (
        {
            "name": "fedhpro",
            **LOCAL,
            **PRIVATE_GRADIENTS,
            "distill_augmentation": "none",
            "client_margin": False,
            "hp_steps": 3,
        },
        {},
        DP_GRADIENTS,
    ),
    "dpfedavg": ({"name": "dpfedavg", "batch_size": 16, "steps_per_round": 3}, {}, DP_SGD),
    "fedhypevae": (
        {
            "name": "fedhypevae",
            "batch_size": 16,
            "steps_per_round": 2,
            "synthetic_per_class": 5,
            "meta_rounds": 1,
            "meta_steps": 2,
            "classifier_epochs": 2,
        },
        {},
        DP_SGD,
    ),
    "dpgauss": (
        {"name": "dpgauss", "synthetic_per_class": 20, "classifier_epochs": 2},
        {},
        {"mechanism": "class-statistics", "epsilon": 8.0, "accountant": "rdp", "clip_bound": 10.0},
    ),
}


def case_config(case: str, **federation) -> dict:
    method, fed, privacy = CASES[case]
    config = {**BASE, "method": method, "federation": {**BASE["federation"], **fed, **federation}}
    if privacy:
        config["privacy"] = privacy
    if method["name"] in ("fedhypevae", "dpgauss"):  # they work on frozen-encoder embeddings only
        config["data"] = {**config["data"], "features": "efficientnet-lite0"}
    return config


def test_every_registered_method_has_a_case():
    from protofl.algorithms import ALGORITHMS

    assert {m["name"] for m, _, _ in CASES.values()} == set(ALGORITHMS)


def without_timings(value):
    """A metric row (or its per-client records) without wall-clock figures, which differ run to run."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "second" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def same(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def tensors(value, prefix=""):
    """Every tensor of a (nested) state, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


@contextlib.contextmanager
def default_device(device: str):
    """torch's default device is ``device`` inside (``meta``: a tensor created without naming its device
    holds no data, and the first use of its values fails)."""
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def run_and_read(config, out: Path):
    result = protofl.run(config, out=out)
    checkpoint = load_checkpoint(out / "checkpoint")
    assert checkpoint is not None
    return result, checkpoint


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_cpu_creates_nothing_on_the_default_device_and_equals_the_default(case, tmp_path):
    default, default_state = run_and_read(case_config(case), tmp_path / "default")
    assert default.summary["device"] == "cpu"
    with default_device("meta"):
        explicit, explicit_state = run_and_read(case_config(case, device="cpu"), tmp_path / "cpu")
    assert explicit.summary["device"] == "cpu"
    assert same(without_timings(explicit.history), without_timings(default.history))
    assert same(explicit.summary["final"], default.summary["final"])
    a, b = tensors(default_state["server_state"]), tensors(explicit_state["server_state"])
    a.update(tensors(default_state.get("client_states", {}), "clients"))
    b.update(tensors(explicit_state.get("client_states", {}), "clients"))
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


# -- the static guard --------------------------------------------------------------------------------

#: torch functions that create a tensor (or a generator): each must name its device.
FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "randperm",
    "tensor",
    "as_tensor",
    "eye",
    "linspace",
    "normal",
    "Generator",
}
#: The whole package (the payload rules apply to the methods' modules, algorithms/).
SCOPE = sorted(SRC.rglob("*.py"))
#: (module, function) -> why its arrays stay on the CPU: payload helpers whose results are moved by
#: their callers, and releases (which run on the CPU).
ON_THE_CPU = {
    ("fedproto.py", "reply_weights"): "a reply's counts, for the server's averages",
    ("fedproto.py", "present_rows"): "the uploaded prototypes; callers move them onto the device",
    ("fedproto.py", "aggregate_prototypes"): "the server's average of uploads; server_prototypes moves it",
    ("fedproto.py", "release_prototypes"): "the broadcast prototypes go to the release, which runs on the CPU",
    ("fedproto.py", "release_prototypes_batch"): "the same for the release of a batched round's clients",
    ("fpl.py", "cluster_prototypes"): "FINCH over the uploads; server_prototypes moves the result",
    ("fedhpro.py", "aggregate_vectors"): "the server's average of uploads; server_step moves it",
    ("fedhypevae.py", "server_step"): "the replies' arrays, stacked, averaged and then moved",
    ("fedhypevae.py", "client_step"): "the released code: its noise is drawn and added on the CPU",
}


def _calls(path: Path):
    """``(call, enclosing function name, parent map)`` for every call in ``path``."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            up, function = node, None
            while up in parents:
                up = parents[up]
                if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    function = up.name
                    break
            yield node, function, parents


def _is_torch(func, names) -> bool:
    return (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id == "torch"
        and (func.attr in names)
    )


def _moved(node, parents) -> bool:
    """Whether ``node``'s value reaches a ``.to(...)`` along its chain of method calls."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Attribute):
            if parent.attr == "to":
                return True
        elif not (isinstance(parent, ast.Call) and parent.func is node):
            return False
        node = parent
    return False


def device_violations(paths=SCOPE) -> list[str]:
    found = []
    for path in paths:
        name = f"{path.parent.name}/{path.name}"
        in_methods = path.parent.name == "algorithms"
        for call, function, parents in _calls(path):
            func = call.func
            where = f"{name}:{call.lineno} ({function})"
            if _is_torch(func, FACTORIES) and not any(k.arg == "device" for k in call.keywords):
                found.append(f"{where}: torch.{func.attr} without device=")
            if isinstance(func, ast.Attribute) and func.attr == "build_model" and function != "cpu_model":
                found.append(f"{where}: a model built outside cpu_model (it must be the same on every device)")
            if isinstance(func, ast.Name) and func.id == "arrays_to_params" and len(call.args) + len(call.keywords) < 2:
                found.append(f"{where}: arrays_to_params without the device")
            if not in_methods or (path.name, function) in ON_THE_CPU or not isinstance(func, ast.Attribute):
                continue
            sent_from_cpu = isinstance(func.value, ast.Call) and getattr(func.value.func, "attr", None) == "cpu"
            if isinstance(func, ast.Attribute) and func.attr == "numpy" and not sent_from_cpu:
                found.append(f"{where}: .numpy() without .cpu() first")
            if _is_torch(func, {"from_numpy"}) and not _moved(call, parents):
                found.append(f"{where}: torch.from_numpy(...) not moved .to(the device)")
    return found


def test_every_tensor_is_created_on_a_named_device_and_crosses_the_payload_through_the_cpu():
    assert not device_violations()
    for module, function in ON_THE_CPU:  # no stale entry (a renamed function would hide a new one)
        tree = ast.parse((SRC / "algorithms" / module).read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == function for n in ast.walk(tree)), (module, function)


def test_the_static_guard_finds_what_it_looks_for(tmp_path):
    """The guard itself: each rule flags its violation (in a scratch module of a method)."""
    scratch = tmp_path / "algorithms" / "scratch.py"
    scratch.parent.mkdir()
    scratch.write_text(
        "import torch\n"
        "def f(received, state, task):\n"
        "    a = torch.zeros(3)\n"
        "    g = torch.Generator()\n"
        "    p = arrays_to_params(received)\n"
        "    m = task.build_model()\n"
        "    b = torch.from_numpy(received['x']).float()\n"
        "    ok = torch.from_numpy(received['x']).float().to(state.device)\n"
        "    return state['x'].numpy(), state['x'].cpu().numpy()\n"
    )
    found = device_violations([scratch])
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted(
        [
            "torch.zeros without device=",
            "torch.Generator without device=",
            "arrays_to_params without the device",
            "a model built outside cpu_model (it must be the same on every device)",
            "torch.from_numpy(...) not moved .to(the device)",
            ".numpy() without .cpu() first",
        ]
    )


# -- state onto the device -----------------------------------------------------------------------------


def test_on_device_moves_every_tensor_of_a_nested_state_and_keeps_the_rest():
    state = {"a": torch.ones(2), "b": [torch.zeros(1), 3, ("x", torch.ones(()))], "c": {"d": None}}
    moved = on_device(state, "meta")
    assert {k: v.device.type for k, v in tensors(moved).items()} == {
        "/a": "meta",
        "/b/0": "meta",
        "/b/2/1": "meta",
    }
    assert moved["b"][1] == 3 and moved["b"][2][0] == "x" and isinstance(moved["b"][2], tuple)
    assert moved["c"] == {"d": None}


def test_a_resumed_run_puts_the_checkpoints_states_on_the_methods_device(tmp_path):
    """The checkpoint holds CPU tensors; resuming moves the server's and the clients' states onto the
    method's device (``meta`` here: a device other than the checkpoint's that this machine has)."""
    from protofl.algorithms import Task, get_algorithm
    from protofl.config import RunConfig
    from protofl.engine import Simulation
    from protofl.runner import prepare_data

    config = case_config("fedproto", rounds=1)
    protofl.run(config, out=tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run/checkpoint")
    assert {t.device.type for t in tensors(checkpoint).values()} == {"cpu"}
    resolved = RunConfig.from_toml(tmp_path / "run/config.toml")
    data = prepare_data(resolved)
    task = Task(data.input_shape, data.num_classes, resolved.model, device="meta")
    algorithm = get_algorithm("fedproto").from_options(resolved.method_options, task, resolved.privacy)
    assert {p.device.type for p in algorithm.model.parameters()} == {"meta"}
    driver = Simulation(algorithm, data.clients, data.test_x, data.test_y, resolved.federation, resolved.seed)
    driver.load_state_dict({**checkpoint, "fingerprint": driver.fingerprint})
    assert driver.round == 1
    server, clients = tensors(driver.server_state), tensors(dict(driver.client_states))  # the store is a mapping
    assert server and clients
    assert {t.device.type for t in [*server.values(), *clients.values()]} == {"meta"}


# -- on a CUDA device (only where torch sees one) --------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_runs_on_cuda_and_checkpoints_on_the_cpu(case, tmp_path):
    config = case_config(case, device="cuda")
    with pytest.raises(RunInterrupted):
        protofl.run(config, out=tmp_path / "run", stop_after=1)
    checkpoint = load_checkpoint(tmp_path / "run/checkpoint")
    assert checkpoint is not None and {t.device.type for t in tensors(checkpoint).values()} == {"cpu"}
    result = protofl.run(config, out=tmp_path / "run", resume=True)  # read on the CPU, moved onto CUDA
    assert result.summary["device"] == "cuda:0"
    assert result.summary["status"] == "completed" and result.summary["rounds_done"] == 2
    assert all(isinstance(v, float) for v in result.summary["final"].values() if v is not None)


@needs_cuda
def test_the_main_job_runs_one_round_on_cuda(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = protofl.run(
        root / "configs/fashion-mnist-fedproto-private.toml",
        out=tmp_path / "main",
        overrides=["federation.rounds=1", 'federation.device="cuda"'],
    )
    assert result.summary["device"] == "cuda:0" and result.summary["rounds_done"] == 1
    assert result.summary["epsilon"] is not None and 0 < result.summary["final"]["personal_acc_mean"] <= 1
