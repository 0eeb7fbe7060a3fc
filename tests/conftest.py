import os
import random

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter; it must be on before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Fresh inputs every run (a fast wrong kernel must fail on any valid input); the seed is
# printed so a failure can be replayed with FLASHDELTA_TEST_SEED=<seed>.
SEED = int(os.environ.get("FLASHDELTA_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"flashdelta test seed: {SEED} (set FLASHDELTA_TEST_SEED to replay)"


@pytest.fixture
def seed():
    return SEED


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
