# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Without a GPU, ask for the +cpu build by name: PyPI's default Linux wheel pulls GBs of CUDA libraries.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= runs/demo
# The demo trains as two single-threaded processes (torchrun, gloo): on 2 cores that is as fast as
# one process with two threads, and it degrades gracefully when the cores are shared.
DEMO_PROCS ?= 2
# Idle OpenMP threads sleep rather than spin (spinning threads stall badly on shared cores).
export OMP_WAIT_POLICY ?= PASSIVE
DEMO_PROMPTS := --prompt "a red circle" --prompt "a blue square" --prompt "a green triangle" \
  --prompt "a yellow circle" --prompt "a red triangle" --prompt "a green square"

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if $(BIN)/python -c "import torch" 2>/dev/null; then :; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" \
	  || $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Trains the demo model (rerun to resume after a kill), then samples a grid for six prompts.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(DEMO_PROCS) \
	  -m attnlab train examples/demo-shapes-unet.yaml --out $(DEMO_OUT)
	$(BIN)/attnlab sample $(DEMO_OUT) $(DEMO_PROMPTS) --num 8 --out $(DEMO_OUT)/samples
	@echo "demo grid (rows = prompts): $(DEMO_OUT)/samples/grid.png"

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
