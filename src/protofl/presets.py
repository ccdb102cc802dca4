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
#: lr 0.05 with five epochs on OptDigits (40 % after 3 rounds; 77 % at lr 0.02), and at its general defaults
#: on MNIST (90.9, 52.6, 10.3 % after rounds 1-3 as its loss rises from 1.0 to 5.5; 97.0 % at lr 0.02).
#: FedHypeVAE on OptDigits (about 100 embeddings a client): at its earlier general defaults the generator
#: was short of steps in 3 rounds (5.2 %: two of them learnt the meta-code, leaving 20 DP-SGD steps at lr
#: 1e-3 for 277,476 DP-trained numbers). A smaller generator (22,604 DP-trained numbers) in a 32-d public
#: space, batches of 96 (q ~ 0.95; clients need at least 96 embeddings), lr 1e-2, one meta round and 100
#: steps a round (sigma 8.5-8.6 at epsilon 8) reached 52.6 % (29.1 % with the label at the decoder's first
#: layer only; 50.4 % with the per-class path's defaults, output_lr 3e-2 here 3x lr); 50 steps (sigma 6.3) 24.4 % before the label reached the output layer
#: (docs/configuration.md lists the variants measured).
#: FedHypeVAE on digits-domains (about 820 embeddings a client, four digit domains): its general defaults
#: reach 21.4 % in 3 rounds (40 generator steps, sigma 0.75). The FedHypeVAE benchmark's sizes (84,628
#: DP-trained numbers), batches of 128 and 300 steps a round (620 steps, sigma 2.5 at epsilon 8) reach
#: 31.8 % (150 steps a round: 29.3 %; 150 steps at the general sizes: 27.7 %; 10 rounds, sigma 5.0: 32.2 %).
METHOD_PRESETS: Mapping[tuple[str, str], Mapping[str, Any]] = types.MappingProxyType(
    {
        ("optdigits", "fpl"): types.MappingProxyType({"lr": 0.02}),
        ("mnist", "fpl"): types.MappingProxyType({"lr": 0.02}),
        ("optdigits", "fedhypevae"): types.MappingProxyType(
            {
                "latent_dim": 8,
                "hidden_dim": 64,
                "code_dim": 8,
                "hyper_hidden": 16,
                "public_dims": 32,
                "batch_size": 96,
                "steps_per_round": 100,
                "lr": 0.01,
                "private_lr": 0.01,
                "meta_rounds": 1,
            }
        ),
        ("digits-domains", "fedhypevae"): types.MappingProxyType(
            {"latent_dim": 16, "hidden_dim": 128, "code_dim": 16, "batch_size": 128, "steps_per_round": 300}
        ),
    }
)


#: Methods the dataset presets do not touch: DP-SGD methods, whose batch size and learning rate are tuned
#: with their budget (the batch size sets the Poisson sampling rate, hence sigma and the privacy events).
#: Only a preset of their own (METHOD_PRESETS), measured at the default budget, applies to them; sigma is
#: then calibrated for the resolved options, which config.toml records.
PRIVATE_BY_CONSTRUCTION = frozenset({"dpfedavg", "fedhypevae"})


def preset_options(dataset: str, method: str, config_cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """The preset options of ``dataset`` (and of ``method`` on it) that ``config_cls`` declares and
    ``given`` does not set."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    general = {} if method in PRIVATE_BY_CONSTRUCTION else DATASET_PRESETS.get(dataset, {})
    preset = {**general, **METHOD_PRESETS.get((dataset, method), {})}
    return {k: v for k, v in preset.items() if k in fields and k not in given}
