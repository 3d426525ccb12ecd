import os
import random
import sys
import zlib

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every test starts from torch, numpy and random seeded from one base seed and the test's id, so a run
# is reproducible and a failure names the seed that reproduces it. PARALLAX_TEST_SEED=<int> picks another
# base seed (to explore), PARALLAX_TEST_SEED=random draws one (printed in the header and in failures).
_SEED_VARIABLE = "PARALLAX_TEST_SEED"
_requested = os.environ.get(_SEED_VARIABLE, "").strip()
BASE_SEED = random.SystemRandom().randrange(2**31) if _requested == "random" else int(_requested or 20240520)


def seed_for(nodeid: str) -> int:
    """The seed a test runs under: a function of the base seed and the test's id only."""
    return (BASE_SEED * 1_000_003 + zlib.crc32(nodeid.encode())) % 2**31


def pytest_report_header(config):
    return f"test seed base: {BASE_SEED} (rerun with {_SEED_VARIABLE}={BASE_SEED})"


@pytest.fixture(autouse=True)
def seeded(request, record_property):
    """Seeds torch (CPU and CUDA), numpy and random for this test; returns the seed."""
    seed = seed_for(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    record_property("seed", seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("test seed", f"seed {seed_for(item.nodeid)} from base seed {BASE_SEED}: "
                                             f"rerun with {_SEED_VARIABLE}={BASE_SEED}"))
