"""protofl on Flower: the same registered algorithms, run by a Flower ServerApp and ClientApps.

Install the extra (``pip install 'protofl[flower]'``). :func:`run_on_flower` runs a configuration on
this machine (a SuperLink and SuperNodes as processes, or Flower's simulation runtime);
``protofl flower`` is the command line; docs/flower.md shows a deployment across machines. Flower is
imported only when an app is loaded or a run is started.
"""

from protofl.flower._require import FlowerMissingError, require_flwr
from protofl.flower.launcher import Federation, FlowerRunError, run_on_flower, write_app
from protofl.flower.settings import FlowerSettings

__all__ = [
    "Federation",
    "FlowerMissingError",
    "FlowerRunError",
    "FlowerSettings",
    "require_flwr",
    "run_on_flower",
    "write_app",
]
