# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Without a GPU, ask for the +cpu build by name: PyPI's default Linux wheel pulls GBs of CUDA libraries.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= runs/poc-shapes
# Peer packages of the parity tests (pyproject's `peers` extra), installed one by one.
PEERS ?= tomesd==0.1.3 tgate==1.0.0
# The rating page's browser test drives Debian's Chromium (Playwright's own browser download needs the internet).
CHROMIUM ?= /usr/bin/chromium
# Idle OpenMP threads sleep rather than spin (spinning threads stall badly on shared cores).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if $(BIN)/python -c "import torch" 2>/dev/null; then :; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" \
	  || $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); fi
	$(BIN)/pip install -q -e ".[dev]"
	for peer in $(PEERS); do $(BIN)/pip install -q --no-deps "$$peer" \
	  || echo "peer $$peer did not install: its parity tests skip"; done
	test -x $(CHROMIUM) || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium did not install: the rating page's browser test skips"
	touch $(STAMP)

setup: $(STAMP)

# The main job: a proof of concept on 32 px shapes, one attention design per level against a reference
# (trains three small U-Nets side by side, samples and evaluates six variants, writes the report).
# Rerun to resume after a kill; a finished run redoes nothing.
demo: $(STAMP)
	$(BIN)/attnlab poc examples/poc-shapes.yaml --out $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.html (and report.md, results.json, results.csv)"

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check attnlab tests benchmarks
	$(BIN)/ruff format --check attnlab tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
