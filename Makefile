# `make demo` and `make test` each install what they need into .venv first (CPU torch 2.13.0,
# Triton, the package with its C++ extension), so both work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fire-installed

.PHONY: install demo demo-full test bench bench-smoke clean

$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: any other request would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q ninja setuptools wheel
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[triton,cli,eval,hf,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fire-eval demo --out fire-demo-out

demo-full: $(STAMP)
	$(BIN)/fire-eval demo --full --out fire-demo-full

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -q --durations=15

BENCH_JSON ?= benchmarks/results/latest.json
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-min-rounds=5 --benchmark-max-time=0.5 \
		--benchmark-json=$(BENCH_JSON)
	$(BIN)/python benchmarks/summarize.py $(BENCH_JSON)

bench-smoke: $(STAMP)
	FIRE_BENCH_SMOKE=1 $(BIN)/python -m pytest benchmarks -q --benchmark-disable

clean:
	rm -rf build *.egg-info python/*.egg-info python/fire_repair/_C*.so
