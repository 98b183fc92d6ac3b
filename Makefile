# Two commands a newcomer needs: `make run` and `make test`. Both (re)create .venv idempotently
# and install the system packages the controller and the tests rely on when they are missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
APT_PACKAGES_RUN := mosquitto espeak-ng
APT_PACKAGES_TEST := mosquitto espeak-ng mbpoll libcoap3-bin chromium

.PHONY: run test lint typecheck unit venv system-deps-run system-deps-test bench clean vendor

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The console's JavaScript comes from the npm registry at build time, never from a CDN at run time:
# pinned packages are unpacked into a git-ignored directory the controller serves (/static/vendor/).
HTMX_VERSION := 2.0.4
LEAFLET_VERSION := 1.9.4
VENDOR_DIR := controller/console/static/vendor
VENDOR_STAMP := $(VENDOR_DIR)/.vendored-htmx-$(HTMX_VERSION)-leaflet-$(LEAFLET_VERSION)

vendor: $(VENDOR_STAMP)

$(VENDOR_STAMP):
	@mkdir -p $(VENDOR_DIR)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  npm pack --silent --pack-destination "$$tmp" htmx.org@$(HTMX_VERSION) leaflet@$(LEAFLET_VERSION) >/dev/null && \
	  mkdir "$$tmp/htmx" "$$tmp/leaflet" && \
	  tar -xzf "$$tmp"/htmx.org-$(HTMX_VERSION).tgz -C "$$tmp/htmx" package/dist/htmx.min.js && \
	  cp "$$tmp"/htmx/package/dist/htmx.min.js $(VENDOR_DIR)/htmx.min.js && \
	  tar -xzf "$$tmp"/leaflet-$(LEAFLET_VERSION).tgz -C "$$tmp/leaflet" package/dist && \
	  rm -rf $(VENDOR_DIR)/leaflet && cp -r "$$tmp"/leaflet/package/dist $(VENDOR_DIR)/leaflet
	@rm -f $(VENDOR_DIR)/.htmx-* $(VENDOR_DIR)/.vendored-* && touch $@

system-deps-run:
	@bash scripts/ensure-system-packages.sh $(APT_PACKAGES_RUN)

system-deps-test:
	@bash scripts/ensure-system-packages.sh $(APT_PACKAGES_TEST)

run: $(STAMP) vendor system-deps-run
	$(BIN)/wardcast demo --config config.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The integration tests spend most of their time waiting on subprocesses (controller, broker, fleet):
# two pytest workers keep both cores busy. Each test owns its broker, port, database and directory.
TEST_WORKERS ?= 2

test: $(STAMP) vendor system-deps-test lint typecheck
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

bench: $(STAMP) system-deps-test
	$(BIN)/python bench/fanout.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
