# One command per task; CI (.ci/run) calls the same ones.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := tools/node_modules/.bin/buf
JS_CLIENT := clients/js/node_modules/.installed
CHROMIUM := /usr/bin/chromium
PY_SOURCES := pigeon gate node dispatcher tests scripts bench clients/python/pigeon/client

.PHONY: help setup run test check gen docs lint-protos clean bench bench-quick soak

help:
	@echo "make run     start a local cluster (etcd, dispatcher, gate, two nodes) on SQLite"
	@echo "make test    run the checks and the whole test suite"
	@echo "make check   ruff format, ruff check, mypy --strict, buf lint, stub drift"
	@echo "make gen     regenerate clients/python/pigeon/v1 from protos/"
	@echo "make docs    regenerate the configuration reference in README.md"
	@echo "make bench        Pigeon beside a bare grpc.aio relay (~10 min): table, bench/results/"
	@echo "make bench-quick  every benchmark scenario scaled down (~1 min)"
	@echo "make soak         5,000 clients, 1,000 msgs/s for 10 min: delivered == acknowledged?"

# The virtual environment and the pinned dependencies, re-made when pyproject.toml changes.
# The client distribution (clients/python) goes in beside the server's, which needs it: `pigeon`
# is a namespace package of both.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e clients/python -e '.[dev]'
	touch $(STAMP)

$(BUF): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $(BUF)

$(JS_CLIENT): clients/js/package.json clients/js/package-lock.json
	npm ci --prefix clients/js --no-audit --no-fund --loglevel=error
	touch $(JS_CLIENT)

# The browser test drives Debian's Chromium (`playwright install` would download a browser of its
# own, which cannot be fetched here). A file target: installed only when missing.
$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

setup: $(STAMP) $(BUF) $(JS_CLIENT) $(CHROMIUM)

run: $(STAMP)
	$(BIN)/pigeon up

gen: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

docs: $(STAMP)
	$(BIN)/python scripts/gen_docs.py

lint-protos: $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code

check: $(STAMP) lint-protos
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/mypy pigeon gate node dispatcher bench clients/python/pigeon/client
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python scripts/gen_docs.py --check

# Without column ranges, Python 3.11's tracebacks parse no code to place their carets (see the
# note on addopts in pyproject.toml).
test: check $(JS_CLIENT) $(CHROMIUM)
	PYTHONNODEBUGRANGES=1 $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

soak: $(STAMP)
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) tools/node_modules clients/js/node_modules .mypy_cache .ruff_cache .pytest_cache
