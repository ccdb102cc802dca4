"""Method defaults per dataset: what a method's options are when a configuration leaves them unset.

The built-in defaults of local training (one epoch, batches of 50, lr 0.05) suit Fashion-MNIST and
MNIST, where a client holds thousands of samples. OptDigits clients hold about a hundred samples each:
one epoch is two or three steps, and every method stays near chance. A preset names only options
that a method's ``Config`` has; an option set in the configuration always wins, and the resolved
``config.toml`` records the values used.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

#: Dataset name -> option -> value. Measured with ``protofl run --set data.dataset=optdigits
#: --set method.name=M`` for every method (docs/configuration.md lists the accuracies).
DATASET_PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
    {
        "optdigits": types.MappingProxyType({"local_epochs": 5, "lr": 0.05, "batch_size": 16}),
    }
)


#: (dataset, method) -> option -> value, over the dataset's presets: FPL's contrastive losses diverge at
#: lr 0.05 with five epochs on OptDigits (40 % after 3 rounds; 77 % at lr 0.02).
METHOD_PRESETS: Mapping[tuple[str, str], Mapping[str, Any]] = types.MappingProxyType(
    {
        ("optdigits", "fpl"): types.MappingProxyType({"lr": 0.02}),
    }
)


#: Methods no preset touches: DP-SGD methods, whose batch size and learning rate were tuned with their
#: budget (the batch size sets the Poisson sampling rate, hence sigma and the privacy events).
PRIVATE_BY_CONSTRUCTION = frozenset({"dpfedavg", "fedhypevae"})


def preset_options(dataset: str, method: str, config_cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """The preset options of ``dataset`` (and of ``method`` on it) that ``config_cls`` declares and
    ``given`` does not set."""
    if method in PRIVATE_BY_CONSTRUCTION:
        return {}  # their batch size sets the sampling rate, hence the noise: never changed behind the config
    fields = {f.name for f in dataclasses.fields(config_cls)}
    preset = {**DATASET_PRESETS.get(dataset, {}), **METHOD_PRESETS.get((dataset, method), {})}
    return {k: v for k, v in preset.items() if k in fields and k not in given}
