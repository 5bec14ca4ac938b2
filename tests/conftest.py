"""Shared test configuration: Triton interpreter on CPU, deterministic hypothesis runs."""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined (kernels/__init__ does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cli_support import TINY  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The tests use small tensors, where intra-op threads cost more than they give; on a loaded
# 2-core machine, two OpenMP threads per process made some tests 50x slower (22 s against 0.3 s).
torch.set_num_threads(1)

# CI is a 2-core machine and the Triton interpreter is slow: cap examples, no deadline, and
# derandomise so that a green run is reproducible. Individual tests may lower max_examples.
settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A --config file holding cli_support.TINY (the CLI tests' tiny run)."""
    p = tmp_path_factory.mktemp("cfg") / "tiny.json"
    p.write_text(json.dumps(TINY))
    return str(p)


@pytest.fixture(scope="module")
def cpp_steps_built():
    """The C++ step kernels built (the first test that needs them pays the build): a skip naming the
    missing tool where this machine cannot build them, a failure where the build itself broke."""
    from kernels import cpu_steps

    reason = cpu_steps.status()
    if reason is not None:
        if reason.startswith("the C++ build failed"):
            pytest.fail(reason)
        pytest.skip(reason)
