# CPU setup pins torch 2.13.0 (a local CPU wheel here); DeepSpeed builds against it without build isolation.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

DEMO_RUN ?= runs/demo

.PHONY: setup data test lint demo study reasoning clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[dev,data,eval,serve,hf]'
	touch $(STAMP)

setup: $(STAMP)

data: setup
	test -f artifacts/data/dataset.json || $(BIN)/python -m data.embedded --out artifacts/data

# Train the tiny config on CPU with two processes under ZeRO-2, evaluate, then caption and answer held-out scenes.
demo: data
	rm -rf $(DEMO_RUN)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc_per_node=2 train.py --config configs/tiny.yaml run_dir=$(DEMO_RUN)
	$(BIN)/python -m train.demo $(DEMO_RUN)

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The reasoning modes on the demo model (docs/REASONING.md): tasks, two fine-tuning stages, measurements.
reasoning: setup
	BIN=$(BIN) bash benchmarks/reasoning.sh

# The scaling study on this host's GPUs (docs/study/STUDY.md), with a CUDA build of torch on the path.
study:
	bash benchmarks/study.sh

lint: setup
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache .ruff_cache
