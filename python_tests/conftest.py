import os
import random
import signal
import warnings
import zlib

import pytest
import torch

# Fresh random inputs on every run; STABLENETS_TEST_SEED=<n> replays a run.
SEED = int(os.environ.get("STABLENETS_TEST_SEED", random.SystemRandom().randrange(2**31)))

# Keep the 2-core CI machine responsive: tests are small, more threads only add noise.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda])]


# `make test` runs the suite on both cores with pytest-xdist (`-n 2 -m "not serial"`),
# then the serial tests alone (`-m serial`). Serial: tests that start worker
# processes or torch.distributed ranks (heartbeat limits of a few seconds, free
# ports) or bound a wait by wall-clock time; beside another test on a 2-core
# machine their limits would measure the neighbour. Whole modules, or single tests.
SERIAL_MODULES = {"test_ddp.py", "test_hostile.py", "test_hostile_faults.py", "test_pvd.py",
                  "test_resume.py", "test_runtime.py", "test_synthetic.py"}
SERIAL_TESTS = {"test_stages.py::test_sg_pipeline_processes_on_a_multistage_model",
                "test_stages.py::test_cli_ddp_two_ranks_on_a_multistage_model"}


def pytest_report_header(config):
    return f"stablenets test seed: STABLENETS_TEST_SEED={SEED}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "serial: starts processes or measures wall time; `make test` runs it alone")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name in SERIAL_MODULES or f"{name}::{item.originalname}" in SERIAL_TESTS:
            item.add_marker(pytest.mark.serial)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the trainers' tests and their timings)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def sigint_default():
    """Ctrl-C tests: SIGINT raises KeyboardInterrupt in this process and is not blocked in
    its main thread, so that the signal reaches the code under test (and a child started
    from here, which inherits the mask and an ignored disposition). A test run started
    with SIGINT ignored (a job a shell without job control starts in the background, as
    `(make test &)` does) would fail them otherwise: that state is warned about, put right
    for the test and restored after it."""
    handler = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if handler is not signal.default_int_handler or blocked:
        warnings.warn(f"SIGINT was not Python's default at the start of a Ctrl-C test "
                      f"(handler {handler!r}, blocked in the main thread: {blocked}; a run "
                      "started in the background without job control ignores it); reset")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler if handler is not None else signal.SIG_DFL)
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
