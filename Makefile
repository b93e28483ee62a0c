# The two commands for a new user:  make demo  and  make test.
# Both create .venv, install the dependencies, build the extension, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEPS := numpy tqdm matplotlib h5py scikit-learn psutil pytest pytest-benchmark pytest-timeout pytest-xdist expecttest ninja setuptools wheel
MAX_JOBS ?= 2
STAMP := $(VENV)/.deps-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
SO_STAMP := $(VENV)/.ext-built

# Bytecode is written, under the venv. An environment with PYTHONDONTWRITEBYTECODE=1
# (this project's machines set it) makes every process compile torch's modules
# again on import, about 2 s each: the serial tests' workers, ranks and CLI
# children paid that hundreds of times (serial phase 290-310 s from a clean clone
# against 172 s with bytecode). The prefix keeps __pycache__ out of the source tree.
export PYTHONDONTWRITEBYTECODE :=
export PYTHONPYCACHEPREFIX ?= $(abspath $(VENV))/pycache

.PHONY: demo test build venv bench ctest clean docs

# --no-compile: no .pyc for the ~10,000 files installed (about 30 s of one core);
# Python writes them on first import for the modules actually used (see above).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH_SPEC) $(DEPS)
	touch $@

venv: $(STAMP)

# Incremental (ninja) in-place build, then an editable install (for the
# `stablenets` console script) that reuses it instead of compiling again.
$(SO_STAMP): $(STAMP) $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace
	STABLENETS_PREBUILT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(SO_STAMP)

demo: build
	$(VENV)/bin/stablenets train

# The C++ tests link the CPU kernel libraries just built in place (every ISA
# variant this CPU runs) instead of compiling csrc/cpu a fourth time;
# `bash csrc/tests/run_ctest.sh` alone still builds them from source with CMake.
CTEST := PYTHON=$(PY) bash csrc/tests/run_ctest.sh --prebuilt stablenets_ext

# Python tests on PYTEST_JOBS cores (pytest-xdist), then the tests marked serial
# (processes, wall-clock limits: python_tests/conftest.py) alone.
PYTEST_JOBS ?= 2
PYTEST := $(PY) -m pytest python_tests -q -p no:cacheprovider --timeout=600

test: build
	$(PYTEST) -n $(PYTEST_JOBS) -m "not serial"
	$(PYTEST) -m serial
	$(CTEST)

ctest: build
	$(CTEST)

# The API reference, docs/api.md, from docs/guide.md and the docstrings
# (python_tests/test_docs.py fails when it is stale).
docs: build
	$(PY) docs/build.py

bench: build
	$(PY) benchmarks/compare.py

clean:
	rm -rf build build-cmake build-cmake-prebuilt *.egg-info stablenets_ext/_C*.so stablenets_ext/_cpu_*.so $(SO_STAMP)
