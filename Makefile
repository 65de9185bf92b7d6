# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone with nothing installed.
#   EXTRAS=gpu make install     official vLLM (CUDA) instead of the CPU build
#   PIP_ARGS="--extra-index-url URL" make install    extra pip options (e.g. a PyTorch wheel index)

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
PIP_ARGS ?=
PRESET ?= tiny
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test test-fast lint format server serve status bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(PIP_ARGS) -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/t2i run --preset $(PRESET)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A local Prefect server with its UI on http://127.0.0.1:4200 (offline; no analytics).
server: install
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Publish every flow as a deployment to the server above and serve them (run in a second terminal).
serve: install
	PREFECT_API_URL=http://127.0.0.1:4200/api $(BIN)/t2i serve --preset $(PRESET)

status: install
	$(BIN)/t2i status --preset $(PRESET)

bench: install
	$(BIN)/python tests/benchmarks/bench_recaption.py
	$(BIN)/python tests/benchmarks/bench_train.py

# One short run on a single H100/H200, offline: the real training loop (resume included), samples/s and MFU,
# VAE and T5 encode throughput, sampling. `python tests/gpu/check.py --smoke` is the same code on CPU.
gpu-check: install
	$(BIN)/python tests/gpu/check.py

clean:
	rm -rf $(VENV) workspace .pytest_cache .ruff_cache *.egg-info
