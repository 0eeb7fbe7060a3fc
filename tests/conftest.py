import os
import random

import pytest

# Fresh inputs every run (a fast wrong kernel must fail on any valid input); the seed is
# printed so a failure can be replayed with FLASHDELTA_TEST_SEED=<seed>.
SEED = int(os.environ.get("FLASHDELTA_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"flashdelta test seed: {SEED} (set FLASHDELTA_TEST_SEED to replay)"


@pytest.fixture
def seed():
    return SEED
