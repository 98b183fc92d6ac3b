# Two commands a newcomer needs: `make run` and `make test`. Both (re)create .venv idempotently
# and install the system packages the controller and the tests rely on when they are missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
APT_PACKAGES_RUN := mosquitto espeak-ng
APT_PACKAGES_TEST := mosquitto espeak-ng mbpoll libcoap3-bin

.PHONY: run test lint typecheck unit venv system-deps-run system-deps-test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

system-deps-run:
	@bash scripts/ensure-system-packages.sh $(APT_PACKAGES_RUN)

system-deps-test:
	@bash scripts/ensure-system-packages.sh $(APT_PACKAGES_TEST)

run: $(STAMP) system-deps-run
	$(BIN)/wardcast demo --config config.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The integration tests spend most of their time waiting on subprocesses (controller, broker, fleet):
# two pytest workers keep both cores busy. Each test owns its broker, port, database and directory.
TEST_WORKERS ?= 2

test: $(STAMP) system-deps-test lint typecheck
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

bench: $(STAMP) system-deps-test
	$(BIN)/python bench/fanout.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
