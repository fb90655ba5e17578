# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU build of torch: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnlab train examples/demo-shapes-unet.yaml --out runs/demo
	$(BIN)/attnlab sample runs/demo --prompt "a red circle" --prompt "a blue square" \
	  --prompt "a green triangle" --prompt "a yellow circle" --num 4 --out runs/demo/samples

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
