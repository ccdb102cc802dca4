"""``federation.compile``: the batched round's step and feature pass compiled with ``torch.compile``
(:mod:`protofl.compiled`) against their eager forms."""

import pytest
import torch
from torch._dynamo.utils import counters

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.compiled import COMPILED, CompiledRound
from protofl.config import ConfigError, FederationConfig, ModelConfig, RunConfig
from protofl.engine import Simulation
from protofl.errors import CompileError
from protofl.stacked import STACKED_STEP, VMAP_STEP, stacked_forward, stacked_grad_and_value
from protofl.training import stack_params

TASK = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))
#: The compiled step differs from the eager one by the order of float additions (about 1e-8 here).
TOL = {"atol": 1e-6, "rtol": 1e-5}


def stacked_clients(algo, k, rows, seed=0):
    """``k`` clients' differing parameters, a padded batch each (client c has ``rows - c`` real rows) and
    FedProto's context with prototypes for some classes."""
    g = torch.Generator().manual_seed(seed)
    params = stack_params(
        [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in algo.initial_params(c).items()} for c in range(k)]
    )
    x = torch.randn(k, rows, *TASK.input_shape, generator=g)
    y = torch.randint(0, TASK.num_classes, (k, rows), generator=g)
    weight = (torch.arange(rows)[None, :] < torch.tensor([rows - c for c in range(k)])[:, None]).float()
    table = torch.randn(TASK.num_classes, algo.model.feature_dim, generator=g)
    mask = torch.tensor([True, False, True, True])
    return params, x, y, weight, (table, mask)


def test_compile_is_validated():
    assert FederationConfig(execution="batched", compile=True).compile is True
    assert FederationConfig().compile is False
    with pytest.raises(ConfigError, match='compile: .*execution = "batched"'):
        FederationConfig(compile=True)
    with pytest.raises(ConfigError, match="compile: must be true or false"):
        FederationConfig(execution="batched", compile="yes")
    config = RunConfig.from_dict({"federation": {"execution": "batched", "compile": True}})
    assert config.federation.compile is True


def test_the_fingerprint_separates_compiled_runs_and_keeps_earlier_ones():
    from protofl.config import effective_settings
    from protofl.runner import fingerprint

    batched = RunConfig.from_dict({"federation": {"execution": "batched"}})
    compiled = batched.replace("federation.compile=true")
    # off, the setting is not part of what a run's results depend on (earlier runs' fingerprints stay valid)
    assert "federation.compile" not in effective_settings(batched)
    assert effective_settings(compiled)["federation.compile"] is True
    assert fingerprint(compiled) != fingerprint(batched)


def test_the_compiled_step_equals_the_eager_one_at_every_shape_without_recompiling():
    algo = get_algorithm("fedproto").from_options({}, TASK)
    compiled = CompiledRound(algo.loss, algo.forward_features)
    eager = stacked_grad_and_value(algo.loss)
    graphs = None
    # a full step, then other numbers of clients and widths (a chunk of another size, a short step)
    for i, (k, rows) in enumerate(((5, 12), (3, 7), (4, 2), (6, 9))):
        params, x, y, weight, context = stacked_clients(algo, k, rows, seed=k)
        grads, losses = compiled.step(params, x, y, weight, context)
        want_grads, want_losses = eager(params, x, y, weight, context)
        torch.testing.assert_close(losses, want_losses, **TOL)
        assert grads.keys() == params.keys()
        for n in params:
            torch.testing.assert_close(grads[n], want_grads[n], **TOL)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
        else:  # the client axis and the width are symbols: another number of clients or width, the same program
            assert counters["stats"]["unique_graphs"] == graphs
    for k, rows in ((5, 12), (3, 20)):
        params, x, _, _, _ = stacked_clients(algo, k, rows, seed=k)
        z = compiled.features(params, x)
        torch.testing.assert_close(z, stacked_forward(algo.forward_features, params, x), **TOL)


@pytest.mark.slow  # ten compiles, about 50 s on two cores
@torch._dynamo.config.patch(recompile_limit=2)  # lowered for the test: 4 runs exceed it
def test_one_process_compiles_for_more_runs_than_the_recompile_limit():
    # every method object's step is a program of its own; they must not share dynamo's limit of 8 per code
    # object (a sweep or a test session runs many)
    for run in range(torch._dynamo.config.recompile_limit + 2):
        algo = get_algorithm("fedproto").from_options({"proto_weight": 1.0 + run}, TASK)
        params, x, y, weight, context = stacked_clients(algo, 3, 4, seed=run)
        grads, _ = CompiledRound(algo.loss, algo.forward_features).step(params, x, y, weight, context)
        want, _ = stacked_grad_and_value(algo.loss)(params, x, y, weight, context)
        for n in params:
            torch.testing.assert_close(grads[n], want[n], **TOL)


def make_clients(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(TASK.num_classes, *TASK.input_shape, generator=g) * 2
    out = []
    for k, n in enumerate(sizes):
        y = torch.randint(0, TASK.num_classes, (n + 6,), generator=g)
        x = means[y] + torch.randn(n + 6, *TASK.input_shape, generator=g)
        out.append(ClientData(k, x[:n], y[:n], x[n:], y[n:]))
    return out


def tensors(state, prefix=""):
    """The tensors of a (nested) client state by their path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else ()
    return {path: t for key, value in items for path, t in tensors(value, f"{prefix}/{key}").items()}


def simulate(compile: bool, name: str = "fedproto") -> Simulation:
    task = Task(TASK.input_shape, TASK.num_classes, TASK.model, compile=compile)
    algo = get_algorithm(name).from_options({"batch_size": 16, "momentum": 0.9}, task)
    # unequal sizes: short last batches, a client smaller than one batch, a client with more steps than the
    # others (the steps only some clients take)
    clients = make_clients((40, 23, 7, 16, 70))
    fed = FederationConfig(rounds=3, checkpoint_every=0, progress=False, execution="batched", compile=compile)
    sim = Simulation(algo, clients, clients[0].x_test, clients[0].y_test, fed, seed=5)
    sim.run()
    return sim


def test_a_compiled_batched_run_trains_the_eager_runs_parameters_and_says_so():
    eager, compiled = simulate(False), simulate(True)
    assert eager.transport.summary_fields()["batched_step"] == STACKED_STEP
    assert compiled.transport.summary_fields()["batched_step"] == f"{STACKED_STEP}, {COMPILED}"
    assert eager.client_states.keys() == compiled.client_states.keys()
    for k in eager.client_states:
        want, got = tensors(eager.client_states[k]), tensors(compiled.client_states[k])
        assert want and want.keys() == got.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, atol=2e-5, rtol=1e-4)
    for row_eager, row_compiled in zip(eager.history, compiled.history):
        assert row_compiled["train_loss"] == pytest.approx(row_eager["train_loss"], rel=1e-4, abs=1e-5)


def test_a_compile_failure_is_one_clear_error():
    def loss(params, x, y, weight, context):
        torch._dynamo.graph_break()  # a graph break: the whole step cannot be compiled as one program
        return (x.sum(-1) * weight).sum() + params["w"].sum()

    compiled = CompiledRound(loss, lambda params, x: x)
    params = {"w": torch.zeros(2, 3)}
    with pytest.raises(CompileError, match="^federation.compile: torch.compile of the batched round's local step") as e:
        compiled.step(params, torch.ones(2, 4, 5), torch.zeros(2, 4), torch.ones(2, 4), None)
    assert "\n" not in str(e.value)


def test_a_backend_failure_names_its_cause_and_the_recompile_limit_says_so():
    """A backend's failure (no C++ compiler, for one) reaches us wrapped in BackendCompilerFailed, whose own
    first line names only the backend; the recompile limit's error is not one of dynamo's exception
    classes. Both become one line that says what went wrong."""
    from protofl.compiled import _COMPILE_ERRORS, _compile_failed

    wrapped = torch._dynamo.exc.BackendCompilerFailed(
        lambda *a: None, RuntimeError("Compiler: cc is not found\nsecond line"), None
    )
    assert isinstance(wrapped, _COMPILE_ERRORS)
    message = str(_compile_failed("local step", wrapped))
    assert "RuntimeError: Compiler: cc is not found" in message and "\n" not in message
    limit = torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
    assert isinstance(limit, _COMPILE_ERRORS)
    message = str(_compile_failed("feature pass", limit))
    assert "Hard failure due to fullgraph=True" in message and "TORCH_LOGS=recompiles" in message


def test_compile_refuses_the_vmap_step_in_one_line():
    task = Task(TASK.input_shape, TASK.num_classes, TASK.model, compile=True)
    fpl = get_algorithm("fpl").from_options({}, task)
    assert fpl.batched_step() == VMAP_STEP  # the step its batched rounds would take, not compiled
    with pytest.raises(CompileError, match="^federation.compile: compiles the stacked step only.*vmap step") as e:
        simulate(True, "fpl")
    assert "\n" not in str(e.value)


def test_the_command_line_runs_a_compiled_round_and_refuses_what_it_cannot_compile_in_one_line(tmp_path, capsys):
    import json

    from protofl.cli import main

    common = [
        *("--set", "data.dataset=synthetic-gaussian:train=600,test=100,dim=12,classes=4,seed=0"),
        *("--set", "federation.rounds=2", "--set", "federation.progress=false", "--set", "federation.threads=1"),
        *("--set", "partition.num_clients=3", "--set", "method.name=fedproto", "--set", "federation.compile=true"),
    ]
    assert main(["run", *common, "--set", "federation.execution=batched", "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["batched_step"] == f"{STACKED_STEP}, {COMPILED}"
    capsys.readouterr()
    # compile without batched execution: the configuration is refused before any work
    assert main(["run", *common, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert 'compile: compiles the batched round\'s step: it needs execution = "batched"' in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # a model the stacked step cannot run (fpl's batched rounds take the vmap step): one line, no traceback
    fpl = ["--set", "method.name=fpl", "--set", "federation.execution=batched"]
    assert main(["run", *common, *fpl, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "error: federation.compile: compiles the stacked step only" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # refused before the run wrote anything: the same folder takes the run with the setting off
    assert not (tmp_path / "c" / "config.toml").exists() and not (tmp_path / "c" / "metrics.jsonl").exists()


def stacked_methods() -> list[str]:
    """The methods whose batched rounds take the stacked step at their defaults on ``TASK``."""
    from protofl.algorithms import ALGORITHMS

    names = []
    for name in sorted(ALGORITHMS):
        try:
            algo = get_algorithm(name).from_options({}, TASK)
        except ConfigError:  # needs a privacy mechanism or image inputs
            continue
        if algo.batched_unsupported() is None and algo.batched_step() == STACKED_STEP:
            names.append(name)
    return names


@pytest.mark.slow
@pytest.mark.parametrize("name", stacked_methods())
def test_every_stacked_method_trains_the_same_compiled(name):
    eager, compiled = simulate(False, name), simulate(True, name)
    assert compiled.transport.summary_fields()["batched_step"] == f"{STACKED_STEP}, {COMPILED}"
    for k in eager.client_states:
        want, got = tensors(eager.client_states[k]), tensors(compiled.client_states[k])
        assert want.keys() == got.keys()
        for path, value in want.items():
            torch.testing.assert_close(got[path], value, atol=2e-5, rtol=1e-4)
    for a, b in zip(tensors(eager.server_state).values(), tensors(compiled.server_state).values()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("wanted,built", [(True, False), (False, True)])
def test_the_engine_refuses_a_task_built_otherwise_than_federation_compile_says(wanted, built):
    """The method compiles as its Task says; a FederationConfig that says otherwise would record one thing
    and run the other, so the engine refuses it in one line."""
    task = Task(TASK.input_shape, TASK.num_classes, TASK.model, compile=built)
    algo = get_algorithm("fedproto").from_options({"batch_size": 16}, task)
    clients = make_clients((20, 12))
    fed = FederationConfig(rounds=1, checkpoint_every=0, progress=False, execution="batched", compile=wanted)
    with pytest.raises(ConfigError, match=rf"federation.compile = {str(wanted).lower()}, but the method was built"):
        Simulation(algo, clients, clients[0].x_test, clients[0].y_test, fed, seed=0)
