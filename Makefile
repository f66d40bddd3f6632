# Two commands do all the set-up on a fresh machine (see README):
#   make demo   builds .venv and runs the main job (DEMO_ARGS=--quick: the 3-minute version)
#   make test   builds .venv and runs lint + format check + import layers + the whole test suite
# torch is installed first so DeepSpeed (an sdist that builds against the installed torch) can
# be installed without build isolation instead of downloading a second torch into a build env.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install torch torchvision
	$(BIN)/python -m pip install --no-build-isolation -e '.[dev,deepspeed,bench]'
	touch $(STAMP)

DEMO_ARGS ?=

demo: $(STAMP)
	$(BIN)/sdtrain demo --out runs/demo --overwrite $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Two workers (pytest-xdist): most tests keep one core busy (subprocess start-ups, single-thread
# fits, waits); tests/conftest.py keeps a module on one worker and the SLURM modules together.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/unet_step.py

clean:
	rm -rf $(VENV) runs
