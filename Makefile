# The two commands of the README, from nothing (Python 3.10+, git, GNU make):
#
#   make train    # a tiny LET-nGPT on Tiny Shakespeare (ARGS="--key=value ..." for overrides)
#   make test     # the whole test suite (PYTEST_ARGS="-k renorm" to select)
#
# Both create .venv on first use and install the CPU build of PyTorch and every pinned
# dependency (constraints/cpu.txt); later calls reuse it in seconds. The environment is
# rebuilt when pyproject.toml or the constraints change. Only DeepSpeed is built without
# build isolation (its setup.py imports torch); every other package, sdists included, is
# built the ordinary way, so a cold pip cache (CI sets PIP_NO_CACHE_DIR=1) cannot hide a
# missing build dependency.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.letngpt-installed
CONSTRAINTS := constraints/cpu.txt
PIP := $(BIN)/python -m pip install -q -c $(CONSTRAINTS)

# Offline machines of this project keep tiktoken's GPT-2 files next to the checkout.
SHARED_TIKTOKEN := $(abspath ../shared/data/tiktoken)
ifneq ($(wildcard $(SHARED_TIKTOKEN)),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_TIKTOKEN)
endif

.PHONY: train test setup system lint clean-venv image

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP) system
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

# SLURM and munge for the cluster tests: installed with apt when root (or passwordless sudo),
# otherwise those tests skip with the reason (and fail under CI=true).
system:
	@bash .ci/install_system.sh

# letngpt:cpu from Debian's packages and PyPI alone (docker/build.sh: a debootstrap base, cached
# as an image, then docker/Dockerfile with FLAVOUR=cpu); needs a running dockerd and root. GPU
# clusters build on NGC's image instead: DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t letngpt:latest .
image:
	@PYTHON=$(PYTHON) bash docker/build.sh image

lint: $(STAMP)
	$(BIN)/ruff check .

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation --no-deps deepspeed
	$(PIP) -e '.[dev]'
	@touch $@
	@echo "setup: $(VENV) is ready"

clean-venv:
	rm -rf $(VENV)
