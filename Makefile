# make demo   the main job (see README)
# make test   the test suite, then the CUDA compile check
# make bench  every benchmark (slow)
# make lint   ruff (lint + format check) and mypy on the typed modules; .ci/run runs it
# Everything runs in .venv, created on first use; torch is pinned to the 2.13.0 CPU wheel by
# constraints.txt on every pip call, and the extension builds without pip's build isolation.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEPS := $(VENV)/.deps-installed
BUILT := build/.fastprune-built
NATIVE_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' \)) CMakeLists.txt pyproject.toml
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

.PHONY: demo test lint format bench cuda-check build clean deepsparse-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): constraints.txt pyproject.toml | $(PY)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt numpy tqdm pytest hypothesis scikit-build-core ninja cmake scikit-learn matplotlib transformers
	touch $@

LINT_DEPS := $(VENV)/.lint-deps-installed
$(LINT_DEPS): $(DEPS)
	$(PIP) install -q -c constraints.txt ruff==0.17.5 mypy==2.4.1
	touch $@

BENCH_DEPS := $(VENV)/.bench-deps-installed
$(BENCH_DEPS): $(DEPS)
	$(PIP) install -q -c constraints.txt torch-pruning onnx
	touch $@

# DeepSparse and ONNX Runtime for bench_vs_deepsparse.py, in their own venv (DeepSparse pins an old
# numpy and onnx). Optional: when the registry lacks them the benchmark skips their columns.
DS_VENV := build/ds-venv
$(DS_VENV)/.installed:
	@($(PYTHON) -m venv $(DS_VENV) && $(DS_VENV)/bin/pip install -q --disable-pip-version-check \
		deepsparse==1.8.0 onnxruntime && touch $@) \
		|| echo "bench: DeepSparse 1.8.0 could not be installed in $(DS_VENV): its columns will be skipped"

deepsparse-venv: $(DS_VENV)/.installed

$(BUILT): $(DEPS) $(NATIVE_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -c constraints.txt -e .
	@mkdir -p build && touch $@

build: $(BUILT)

demo: $(BUILT)
	$(PY) -m fastprune.cli demo --out build/demo

test: $(BUILT)
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory cuda-check

lint: $(LINT_DEPS)
	$(VENV)/bin/ruff check python tests benchmarks tools
	$(VENV)/bin/ruff format --check python tests benchmarks tools
	$(VENV)/bin/mypy

format: $(LINT_DEPS)
	$(VENV)/bin/ruff format python tests benchmarks tools
	$(VENV)/bin/ruff check --fix python tests benchmarks tools

cuda-check: $(DEPS)
	PY=$(PY) bash tools/cuda_check.sh

bench: $(BUILT) $(BENCH_DEPS) deepsparse-venv
	$(PY) benchmarks/bench_woodbury.py
	$(PY) benchmarks/bench_woodfisher.py
	$(PY) benchmarks/bench_fisher_engines.py
	$(PY) benchmarks/bench_nisp.py
	$(PY) benchmarks/quality_magnitude.py
	$(PY) benchmarks/quality_woodfisher.py
	$(PY) benchmarks/quality_nisp.py
	$(PY) benchmarks/quality_sfp.py
	$(PY) benchmarks/bench_sfp.py
	$(PY) benchmarks/quality_singe.py
	$(PY) benchmarks/bench_distributed.py
	$(PY) benchmarks/bench_structured.py
	$(PY) benchmarks/bench_sparse.py
	$(PY) benchmarks/bench_sparse_jit.py
	$(PY) benchmarks/bench_sparse_tokens.py
	$(PY) benchmarks/bench_vs_deepsparse.py
	$(PY) benchmarks/bench_depth_first.py
	$(PY) benchmarks/bench_bottleneck.py
	$(PY) benchmarks/bench_pool.py

clean:
	rm -rf build $(VENV)
