"""The client-state store (``federation.client_store``): states round-trip exactly through the disk
store, a run with it equals the run holding every state in memory, a killed run resumes to the
uninterrupted one, and the memory it holds between rounds is bounded by ``federation.client_cache``."""

import pytest
import torch

from protofl.algorithms import ALGORITHMS, ClientData, Task
from protofl.config import ConfigError, FederationConfig, ModelConfig, PrivacyConfig, RunConfig
from protofl.engine import RunInterrupted, Simulation
from protofl.engine.client_store import STORE_FOLDER, DiskClientStore, MemoryClientStore, rounded_to_float16
from protofl.errors import CheckpointError
from protofl.privacy.accounting import LEDGER_KEY

TASK = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))
SIZES = (30, 16, 25, 18, 17, 22)

#: Every registered method, with the privacy it needs (or a release mechanism, so its ledger is stored).
PRIVACY = {
    "dpfedavg": PrivacyConfig(mechanism="dp-sgd", accountant="rdp", planned_releases=6),
    "fedhypevae": PrivacyConfig(mechanism="dp-sgd", accountant="rdp", planned_releases=2),
    "fedproto": PrivacyConfig(mechanism="vpp", accountant="rdp", planned_releases=6),
    "dpgauss": PrivacyConfig(mechanism="class-statistics", accountant="rdp", planned_releases=6),
}

#: A method's own task: dpgauss projects an encoder's embeddings (1280-d) onto a public basis.
TASKS = {"dpgauss": Task(input_shape=(1280,), num_classes=4)}

#: Options a method needs on vector inputs (every method with mini-batches gets batches of 16).
OPTIONS = {
    "dpgauss": {"public_dims": 3, "synthetic_per_class": 5, "classifier_epochs": 1},
    "fedhpro": {"distill_augmentation": "none"},
    "fedhypevae": {
        "public_basis": "none",  # the raw vectors: a public basis needs an encoder's embeddings
        "output_variance": False,  # its Gaussian decoder needs a public basis (a linear output)
        "range_reference": "unit",
        "latent_dim": 4,
        "hidden_dim": 16,
        "code_dim": 3,
        "hyper_hidden": 8,
        "steps_per_round": 2,
        "meta_rounds": 1,
        "meta_steps": 2,
        "synthetic_per_class": 5,
        "classifier_epochs": 1,
        "classifier_hidden": 8,
    },
}


def make_clients(sizes=SIZES, seed=0, task=TASK):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(task.num_classes, *task.input_shape, generator=g) * 2
    out = []
    for k, n in enumerate(sizes):
        y = torch.randint(0, task.num_classes, (n + 6,), generator=g)
        x = means[y] + torch.randn(n + 6, *task.input_shape, generator=g)
        out.append(ClientData(k, x[:n], y[:n], x[n:], y[n:]))
    return out


def simulation(name, checkpoint_dir=None, rounds=2, **federation):
    task = TASKS.get(name, TASK)
    batches = {} if name == "dpgauss" else {"batch_size": 16}  # dpgauss releases statistics, in no batches
    algo = ALGORITHMS[name].from_options({**batches, **OPTIONS.get(name, {})}, task, PRIVACY.get(name))
    fed = FederationConfig(rounds=rounds, progress=False, **{"checkpoint_every": 0, **federation})
    clients = make_clients(task=task)
    return Simulation(
        algo, clients, clients[0].x_test, clients[0].y_test, fed, seed=3, checkpoint_dir=checkpoint_dir, fingerprint="f"
    )


def assert_equal_states(a, b, where="state"):
    """Exactly equal: same keys, types, dtypes, shapes and bits."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_methods_state_round_trips_through_the_disk_store(name, tmp_path):
    sim = simulation(name, client_fraction=0.5)
    sim.run()
    assert len(sim.client_states), f"{name}: no client kept a state"
    store = DiskClientStore(tmp_path, cache=0)
    for k, state in sim.client_states.items():
        store[k] = state
    assert store.in_memory == 0 and len(list(tmp_path.glob("*/*.pt"))) == len(sim.client_states)
    for k, state in sim.client_states.items():
        assert_equal_states(state, store[k], f"{name} client {k}")
    assert list(store) == list(sim.client_states)


@pytest.mark.parametrize("name", ["fedproto", "fedavg", "fedhpro", "dpfedavg", "fedtgp"])
@pytest.mark.parametrize("execution", ["per-client", "batched"])
def test_a_run_with_the_disk_store_equals_the_memory_run(name, execution, tmp_path):
    memory = simulation(name, rounds=3, client_fraction=0.5, execution=execution)
    memory.run()
    disk = simulation(
        name, tmp_path, rounds=3, client_fraction=0.5, execution=execution, client_store="disk", client_cache=1
    )
    disk.run()
    assert disk.client_states.in_memory <= 1
    assert memory.history and len(disk.history) == len(memory.history)
    for a, b in zip(memory.history, disk.history):
        for key in a:
            if not key.endswith("seconds"):
                assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key
    assert_equal_states(memory.server_state, disk.server_state)
    assert list(memory.client_states) == list(disk.client_states)
    for k in memory.client_states:
        assert_equal_states(memory.client_states[k], disk.client_states[k], f"client {k}")
    assert disk.transport.privacy_report() == memory.transport.privacy_report()


@pytest.mark.parametrize("cache", [0, 2, 100])
def test_a_killed_run_with_the_disk_store_resumes_to_the_uninterrupted_one(cache, tmp_path):
    options = dict(rounds=5, client_fraction=0.5, client_store="disk", client_cache=cache, checkpoint_every=2)
    whole = simulation("fedproto", tmp_path / "whole", **options)
    whole.run()
    first = simulation("fedproto", tmp_path / "run", **options)
    with pytest.raises(RunInterrupted):
        first.run(stop_after=3)  # the last checkpoint is of round 2
    # the process dies after writing the states of round 3 to disk (no checkpoint names them)
    first.client_states.checkpoint()
    assert len(list((tmp_path / "run" / STORE_FOLDER).glob("*/*.pt"))) > len(first.client_states)
    del first
    resumed = simulation("fedproto", tmp_path / "run", **options)
    assert resumed.resume() and resumed.round == 2
    resumed.run()
    assert_equal_states(whole.server_state, resumed.server_state)
    assert [{k: v for k, v in r.items() if "seconds" not in k} for r in whole.history] == [
        {k: v for k, v in r.items() if "seconds" not in k} for r in resumed.history
    ]
    assert list(whole.client_states) == list(resumed.client_states)
    for k in whole.client_states:
        assert_equal_states(whole.client_states[k], resumed.client_states[k], f"client {k}")
    # only the files the final checkpoint (and the one before it) name are left
    files = list((tmp_path / "run" / STORE_FOLDER).glob("*/*.pt"))
    assert len(resumed.client_states) <= len(files) <= 2 * len(resumed.client_states)


def test_a_checkpoint_of_either_store_resumes_on_the_other(tmp_path):
    whole = simulation("fedproto", rounds=3, client_fraction=0.5)
    whole.run()
    for first_kind, second_kind in (("memory", "disk"), ("disk", "memory")):
        folder = tmp_path / first_kind
        first = simulation(
            "fedproto",
            folder,
            rounds=3,
            client_fraction=0.5,
            client_store=first_kind,
            client_cache=1,
            checkpoint_every=1,
        )
        with pytest.raises(RunInterrupted):
            first.run(stop_after=1)
        resumed = simulation("fedproto", folder, rounds=3, client_fraction=0.5, client_store=second_kind)
        assert resumed.resume()
        resumed.run()
        assert_equal_states(whole.server_state, resumed.server_state)
        for k in whole.client_states:
            assert_equal_states(whole.client_states[k], resumed.client_states[k], f"client {k}")


def test_the_lru_holds_at_most_the_cache_and_keeps_the_most_recent(tmp_path):
    store = DiskClientStore(tmp_path, cache=3)
    for k in range(10):
        store[k] = {"params": {"w": torch.full((4,), float(k))}, "steps": k}
        assert store.in_memory == min(k + 1, 3)
    assert list(store._hot) == [7, 8, 9]
    assert store[2]["steps"] == 2  # read back from disk, now the most recent
    assert list(store._hot) == [8, 9, 2] and store.in_memory == 3
    assert len(store) == 10 and 11 not in store
    with pytest.raises(KeyError):
        store[11]
    # a run: between rounds the engine holds at most client_cache states
    sim = simulation("fedproto", tmp_path / "run", rounds=3, client_store="disk", client_cache=2)
    held = []
    sim.on_round = lambda row: held.append(sim.client_states.in_memory)
    sim.run()
    assert len(sim.client_states) == len(SIZES) and held and max(held) <= 2


def test_superseded_files_are_deleted_and_none_a_checkpoint_names(tmp_path):
    store = DiskClientStore(tmp_path, cache=0)
    store[0] = {"w": torch.zeros(3)}
    store[0] = {"w": torch.ones(3)}
    assert len(list(tmp_path.glob("*/*.pt"))) == 1  # no checkpoint names the first version
    store.checkpoint()
    store[0] = {"w": torch.full((3,), 2.0)}
    assert len(list(tmp_path.glob("*/*.pt"))) == 2  # the checkpoint's version stays
    store.checkpoint()
    store[0] = {"w": torch.full((3,), 3.0)}
    store.checkpoint()  # the first checkpoint's version is now two checkpoints old
    names = sorted(p.name for p in tmp_path.glob("*/*.pt"))
    assert names == ["0.2.pt", "0.3.pt"]
    assert torch.equal(store[0]["w"], torch.full((3,), 3.0))


def test_a_state_stored_as_a_view_is_written_alone(tmp_path):
    big = torch.randn(1000, 50)
    store = DiskClientStore(tmp_path, cache=0)
    store[0] = {"w": big[3]}
    (path,) = tmp_path.glob("*/*.pt")
    assert path.stat().st_size < 20_000
    assert torch.equal(store[0]["w"], big[3])


def test_float16_precision_rounds_the_state_but_not_the_ledger(tmp_path):
    state = {
        "params": {"w": torch.tensor([1.0001, 3.14159265, -2.5]), "big": torch.tensor([1e6, 1.0])},
        "counts": torch.tensor([3, 4]),
        LEDGER_KEY: {"noise": torch.tensor([1.23456789], dtype=torch.float64)},
    }
    rounded = rounded_to_float16(state)
    assert rounded["params"]["w"].dtype == torch.float32
    assert torch.equal(rounded["params"]["w"], state["params"]["w"].half().float())
    assert not torch.equal(rounded["params"]["w"], state["params"]["w"])
    assert torch.equal(rounded["params"]["big"], state["params"]["big"])  # beyond float16's range: kept
    assert torch.equal(rounded[LEDGER_KEY]["noise"], state[LEDGER_KEY]["noise"])
    exact, half = (
        DiskClientStore(tmp_path / "a", cache=0),
        DiskClientStore(tmp_path / "b", cache=0, precision="float16"),
    )
    payload = {"params": {"w": torch.randn(5000)}}
    exact[0], half[0] = payload, payload
    assert_equal_states(half[0], rounded_to_float16(payload))
    size = {name: next((tmp_path / name).glob("*/*.pt")).stat().st_size for name in "ab"}
    assert size["b"] < 0.6 * size["a"]  # held as float16 on disk
    memory = MemoryClientStore(precision="float16")
    memory[0] = payload
    assert_equal_states(memory[0], rounded_to_float16(payload))


def test_float16_precision_changes_results_and_says_so(tmp_path):
    import protofl

    def config(**federation):
        return {
            "seed": 0,
            "data": {"dataset": "synthetic-gaussian:train=600,test=100,dim=8,classes=4,seed=0"},
            "partition": {"scheme": "iid", "num_clients": 6, "min_client_size": 2},
            "federation": {"rounds": 2, "progress": False, **federation},
            "model": {"feature_dim": 6, "hidden_dim": 10},
            "method": {"name": "fedproto", "batch_size": 16},
        }

    exact = protofl.run(config(), out=tmp_path / "exact")
    disk = protofl.run(config(client_store="disk", client_cache=1), out=tmp_path / "disk")
    half = protofl.run(config(client_state_precision="float16"), out=tmp_path / "half")
    assert "client_state_precision" not in exact.summary and half.summary["client_state_precision"] == "float16"
    assert disk.summary["client_store"] == "disk" and "client_state_precision" not in disk.summary
    assert disk.summary["final"] == exact.summary["final"]
    assert disk.history[-1]["train_loss"] == exact.history[-1]["train_loss"]
    # round 2 trains from the rounded states of round 1
    assert half.history[-1]["train_loss"] != exact.history[-1]["train_loss"]
    assert (tmp_path / "disk" / "checkpoint" / STORE_FOLDER).is_dir()
    assert not (tmp_path / "exact" / "checkpoint" / STORE_FOLDER).exists()


def test_the_store_settings_are_validated_and_only_precision_enters_the_fingerprint():
    from protofl.api import fingerprint

    with pytest.raises(ConfigError, match="client_store"):
        FederationConfig(client_store="redis")
    with pytest.raises(ConfigError, match="client_cache"):
        RunConfig.from_dict({"federation": {"client_cache": -1}})
    with pytest.raises(ConfigError, match="client_cache"):
        RunConfig.from_dict({"federation": {"client_cache": 10**9}})
    with pytest.raises(ConfigError, match="client_state_precision"):
        FederationConfig(client_state_precision="int8")
    base = RunConfig()
    assert fingerprint(base) == fingerprint(base.replace("federation.client_store=disk"))
    assert fingerprint(base) == fingerprint(base.replace("federation.client_cache=5"))
    assert fingerprint(base) != fingerprint(base.replace("federation.client_state_precision=float16"))


def test_files_of_a_killed_process_are_removed_on_resume(tmp_path):
    store = DiskClientStore(tmp_path, cache=0)
    store[0] = {"w": torch.zeros(3)}
    named = store.checkpoint()
    store[1] = {"w": torch.ones(3)}  # after the checkpoint: no checkpoint names it
    (tmp_path / "0" / ".1.7.pt-abc.tmp").write_bytes(b"half a write")
    (tmp_path / "0" / "notes.txt").write_text("not the store's")
    resumed = DiskClientStore(tmp_path, cache=0)
    resumed.restore(named)
    assert sorted(p.name for p in (tmp_path / "0").iterdir()) == ["0.0.pt", "notes.txt"]
    assert list(resumed) == [0] and torch.equal(resumed[0]["w"], torch.zeros(3))
    resumed[2] = {"w": torch.ones(1)}
    assert (tmp_path / "0" / "2.2.pt").exists()  # versions go on after the highest seen, never over one
    (tmp_path / "0" / "0.0.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        DiskClientStore(tmp_path, cache=0).restore(named)


def test_a_disk_store_run_into_a_folder_protofl_did_not_make_writes_nothing(tmp_path):
    import protofl
    from protofl.errors import RunFolderError

    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("my only copy")
    config = {
        "data": {"dataset": "synthetic-gaussian:train=300,test=50,dim=8,classes=4,seed=0"},
        "partition": {"scheme": "iid", "num_clients": 3, "min_client_size": 2},
        "federation": {"rounds": 1, "progress": False, "client_store": "disk", "client_cache": 0},
        "method": {"name": "fedproto"},
    }
    with pytest.raises(RunFolderError):
        protofl.run(config, out=folder)
    assert sorted(p.name for p in folder.rglob("*")) == ["chapter1.tex"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_a_damaged_state_file_is_one_error_naming_it(damage, tmp_path):
    store = DiskClientStore(tmp_path, cache=0)
    store[4] = {"w": torch.randn(100)}
    named = store.checkpoint()
    (path,) = tmp_path.glob("*/*.pt")
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    resumed = DiskClientStore(tmp_path, cache=0)
    resumed.restore(named)
    with pytest.raises(CheckpointError, match=str(path)):
        resumed[4]


def test_protofl_run_with_the_disk_store_resumes_to_the_uninterrupted_run(tmp_path):
    import protofl

    config = {
        "seed": 1,
        "data": {"dataset": "synthetic-gaussian:train=800,test=100,dim=8,classes=4,seed=0"},
        "partition": {"scheme": "iid", "num_clients": 8, "min_client_size": 2},
        "federation": {
            "rounds": 3,
            "client_fraction": 0.5,
            "progress": False,
            "client_store": "disk",
            "client_cache": 1,
        },
        "model": {"feature_dim": 6, "hidden_dim": 10},
        "method": {"name": "fedproto", "batch_size": 16},
    }
    whole = protofl.run(config, out=tmp_path / "whole")
    with pytest.raises(RunInterrupted):
        protofl.run(config, out=tmp_path / "cut", stop_after=1)
    assert list((tmp_path / "cut" / "checkpoint" / STORE_FOLDER).glob("*/*.pt"))
    resumed = protofl.run(None, out=tmp_path / "cut", resume=True)
    strip = [{k: v for k, v in row.items() if "seconds" not in k} for row in whole.history]
    assert strip == [{k: v for k, v in row.items() if "seconds" not in k} for row in resumed.history]
    assert resumed.summary["final"] == whole.summary["final"] and resumed.summary["client_store"] == "disk"
