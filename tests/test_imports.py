"""What a training process imports. A Flower node starts a fresh ClientApp process for every message
(Flower 1.41 has no long-running ClientApp), so every module a node imports is paid once a message;
the audit statistics need ``scipy.stats`` (about half a second of imports) and the releases' class sums
``scipy.sparse`` (0.08 s): each is imported on first use."""

import subprocess
import sys

import pytest


def test_a_node_does_not_import_the_audit_statistics():
    code = (
        "import sys\n"
        "import protofl.flower.client_app, protofl.flower.node, protofl.privacy\n"
        "from protofl.algorithms import get_algorithm\n"
        "from protofl.runner import prepare_data, resolve_config\n"
        "print(sorted(m for m in ('scipy.stats', 'scipy.sparse', 'protofl.privacy.audit_bounds') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def test_the_audit_statistics_are_there_on_first_use():
    import protofl.privacy as privacy
    from protofl.privacy import audit_bounds

    assert privacy.guess_and_bound is audit_bounds.guess_and_bound
    assert privacy.GUESS_FRACTIONS == audit_bounds.GUESS_FRACTIONS
    from protofl.privacy import two_worlds_epsilon_lower  # the ``from`` form goes through the same hook

    assert two_worlds_epsilon_lower is audit_bounds.two_worlds_epsilon_lower
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        privacy.nothing_here  # noqa: B018
