"""Algorithms from other packages: the entry-point group ``protofl.algorithms``.

A package declares, in its pyproject.toml::

    [project.entry-points."protofl.algorithms"]
    mymethod = "mypackage.mymethod:MyMethod"

where ``MyMethod`` is a :class:`protofl.algorithms.Algorithm` subclass (its ``name`` is what
``method.name`` selects; the entry point's own name is only a label). Once the package is installed,
``protofl methods`` lists the method and configurations can use it. A method defined in your own
script needs no entry point: decorate it with ``protofl.register``.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata

ENTRY_POINT_GROUP = "protofl.algorithms"

log = logging.getLogger("protofl.plugins")


@functools.cache
def load_plugins() -> dict[str, str]:
    """Load and register every installed ``protofl.algorithms`` entry point (once per process).
    Returns ``{entry point: problem}`` for those that could not be loaded (each also logged as a
    warning naming the entry point; the built-in methods and the other plugins stay available)."""
    from protofl.algorithms import ALGORITHMS, Algorithm, register

    problems = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        label = f"{entry.name} = {entry.value}"
        try:
            cls = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the built-in methods down with it
            problems[label] = f"cannot be imported: {type(exc).__name__}: {exc}"
        else:
            if not (
                isinstance(cls, type) and issubclass(cls, Algorithm) and isinstance(getattr(cls, "name", None), str)
            ):
                problems[label] = "is not an Algorithm subclass with a name"
            elif ALGORITHMS.get(cls.name) not in (None, cls):
                problems[label] = f"its name {cls.name!r} is taken by {ALGORITHMS[cls.name].__module__}"
            elif cls.name not in ALGORITHMS:
                register(cls)
    for label, problem in problems.items():
        log.warning("entry point %s (group %s) %s; skipped", label, ENTRY_POINT_GROUP, problem)
    return problems
