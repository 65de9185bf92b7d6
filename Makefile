# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone with nothing installed.
#   EXTRAS=gpu make install     official vLLM (CUDA) instead of the CPU build
#   PIP_ARGS="--extra-index-url URL" make install    extra pip options (e.g. a PyTorch wheel index)

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
PIP_ARGS ?=
PRESET ?= tiny
TEST_WORKERS ?= 2
HOST ?= 127.0.0.1
PORT ?= 4200
POOL ?= t2i
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install browser demo test test-fast lint format server serve deploy worker docker-env status bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(PIP_ARGS) -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/t2i run --preset $(PRESET)

# Two pytest workers: much of the suite waits (servers, subprocess start-up, heartbeats) rather than computes.
test: install browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=30

# Headless Chromium from Debian's packages for the UI test (tests/service/test_ui.py); Playwright drives it, so
# nothing is downloaded. Needs root (CI); elsewhere install `chromium` yourself or the UI test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends chromium >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
		|| echo "make browser: could not install chromium; the UI test will be skipped"

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A local Prefect server with its UI on http://$(HOST):$(PORT) (offline; no analytics). PORT=4300 make server
# serves a UI that calls port 4300.
server: install
	$(BIN)/t2i server --host $(HOST) --port $(PORT)

# Publish every flow as a deployment to the server above and serve them from one process (the laptop way).
serve: install
	PREFECT_API_URL=http://$(HOST):$(PORT)/api $(BIN)/t2i serve --preset $(PRESET)

# The team way: every flow deployed to a work pool, and this machine's workers (one per GPU).
deploy: install
	PREFECT_API_URL=http://$(HOST):$(PORT)/api $(BIN)/t2i deploy --preset $(PRESET) --pool $(POOL)

worker: install
	PREFECT_API_URL=http://$(HOST):$(PORT)/api $(BIN)/t2i worker --pool $(POOL)

# docker/.env for docker/compose.yaml with generated secrets (kept if it exists; never committed).
docker-env:
	@test -f docker/.env || (umask 077 && printf 'POSTGRES_PASSWORD=%s\nPREFECT_API_AUTH_STRING=t2i:%s\n' \
		"$$(openssl rand -hex 16)" "$$(openssl rand -hex 16)" > docker/.env && echo "wrote docker/.env")

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
