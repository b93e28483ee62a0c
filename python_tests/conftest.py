import os
import random
import zlib

import pytest
import torch

# Fresh random inputs on every run; STABLENETS_TEST_SEED=<n> replays a run.
SEED = int(os.environ.get("STABLENETS_TEST_SEED", random.SystemRandom().randrange(2**31)))

# Keep the 2-core CI machine responsive: tests are small, more threads only add noise.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda])]


def pytest_report_header(config):
    return f"stablenets test seed: STABLENETS_TEST_SEED={SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
