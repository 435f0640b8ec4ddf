# qdelta: two commands on a fresh machine:
#   make demo   the main job
#   make test   the whole test suite (what CI runs)
# Each creates .venv and builds the Rust extension when needed.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-installed
EXTRAS  := dev,hf
RESULTS ?= results

.PHONY: demo test test-rust test-python lint bench wheel develop fuzz emu-asan gpu-check gpu-wheelhouse clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Dependencies once per change of pyproject.toml (this also builds the
# extension the first time); `develop` rebuilds it incrementally every run.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

develop: $(STAMP)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --skip-install
	$(PY) -c "import qdelta._core"

demo: develop
	$(VENV)/bin/qdelta demo --out $(RESULTS)

test-rust:
	cargo test --quiet
	cargo clippy --features python --all-targets --quiet -- -D warnings

lint: $(STAMP)
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

test-python: develop
	$(PY) -m pytest -q tests

test: test-rust lint test-python

# Every emulated kernel suite with the kernels built under AddressSanitizer
# (out-of-bounds reads and writes are reports; `make test` runs the delta and
# ring suites so, tests/test_cuda_emulated_asan.py).
emu-asan: develop
	$(PY) -m qdelta.kernels.emulator asan -- $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_cuda_emulated.py tests/test_cuda_emulated_modules.py \
		tests/test_ring_emulated.py tests/test_cuda_emulated_races.py

bench: develop
	mkdir -p benches/results
	$(PY) -m pytest -q benches/bench_bitplane.py -o python_files='bench_*.py' --benchmark-only --benchmark-json=benches/results/bitplane.json
	$(PY) benches/report.py benches/results/bitplane.json
	$(PY) -m pytest -q benches/bench_gemv.py -o python_files='bench_*.py' --benchmark-only --benchmark-json=benches/results/gemv.json
	$(PY) benches/report_gemv.py benches/results/gemv.json
	$(PY) benches/bench_store.py
	$(PY) benches/bench_store.py --cold --out benches/results/store_cold.json
	$(PY) benches/bench_fused.py
	$(PY) benches/bench_runtime.py
	$(PY) benches/bench_tenant_load.py
	PYTHONPATH=python $(PY) benches/bench_ring_cpu.py --out benches/results
	PYTHONPATH=python $(PY) benches/bench_ring_cpu.py --out benches/results --window 512 --layout contiguous
	PYTHONPATH=python $(PY) benches/bench_host_cuda.py --out benches/results
	PYTHONPATH=python $(PY) benches/distill_convergence.py

FUZZ_SECONDS ?= 60
# Fuzzes the .qdelta header parser for FUZZ_SECONDS with libFuzzer (cargo-fuzz,
# nightly; cargo-fuzz is installed when missing); without a nightly toolchain,
# the stable-Rust mutation fuzz instead.
fuzz:
	@if rustc +nightly --version >/dev/null 2>&1 && ! cargo +nightly fuzz --version >/dev/null 2>&1; then \
	  cargo install cargo-fuzz --locked; \
	fi
	@if cargo +nightly fuzz --version >/dev/null 2>&1; then \
	  mkdir -p fuzz/corpus/header && cd fuzz && \
	  cargo +nightly fuzz run header corpus/header seeds -- \
	    -max_total_time=$(FUZZ_SECONDS) -dict=header.dict; \
	else \
	  echo "cargo-fuzz not found (cargo install cargo-fuzz); running the stable mutation fuzz"; \
	  QDELTA_FUZZ_ITERS=300000 cargo test --release --quiet mutation_fuzz -- --nocapture; \
	fi

# The abi3 wheel linked against glibc 2.28 symbols (manylinux_2_28, the floor torch
# wheels have too) through zig, whatever this machine's glibc is; ziglang comes from pip.
WHEEL_BUILD = PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release \
	--compatibility manylinux_2_28 --zig

$(VENV)/.ziglang: $(STAMP)
	$(PY) -m pip install --quiet 'ziglang>=0.11'
	touch $@

wheel: $(VENV)/.ziglang
	$(WHEEL_BUILD) --out dist

# On a GPU machine (torch + cupy, no Rust, no network): GPU tests + kernel benchmarks into $$OUT.
gpu-check:
	bash scripts/gpu_check.sh

# Here: what gpu-check needs carried: the abi3 wheel and pure-python test deps.
GPU_TEST_DEPS := pytest pluggy iniconfig packaging hypothesis sortedcontainers attrs pytest-timeout tqdm
gpu-wheelhouse: $(VENV)/.ziglang
	rm -rf wheelhouse && mkdir -p wheelhouse
	$(WHEEL_BUILD) --out wheelhouse
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--dest wheelhouse $(GPU_TEST_DEPS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --dest wheelhouse safetensors
	ls wheelhouse

clean:
	rm -rf target dist $(VENV) python/qdelta/*.so
