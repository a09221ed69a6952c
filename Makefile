# `make repro` and `make test` work from a fresh clone: they create or update
# .venv from uv.lock (installing uv with pip first if it is missing).
PYTHON ?= python3
VENV := .venv
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
# Stage commands run `python`: make it the project's interpreter.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Byte-compile at install time: imports of torch & co are then fast in every stage.
export UV_COMPILE_BYTECODE := 1

.PHONY: env repro test bench bench-transfer clean plots-vendor

env: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --extra train --python 3.11
	@touch $@

repro: env
	dvc repro
	@echo "next: medtl exps (compare runs), dvc plots show (charts), medtl audit (evidence; commit first) -- README.md"

test: env
	pytest

bench: env
	python -m benchmarks

# Transfer to a new site (docs/transfer.md): the multi-site demo and HAM10000's sites, source-only vs multi-source vs
# a previous model + few labels; then source-only vs target AdaBN vs DANN. Trains many small models: tens of minutes.
bench-transfer: env
	python -m benchmarks.transfer demo
	python -m benchmarks.transfer ham
	python -m benchmarks.domain_adaptation

clean:
	rm -rf $(VENV)

# Replace the vendored chart libraries from the npm registry and rebuild plots/index.html.
VEGA ?= 5.33.1
VEGA_LITE ?= 5.23.0
VEGA_EMBED ?= 6.29.0
plots-vendor: env
	python plots/vendor.py --fetch $(VEGA) $(VEGA_LITE) $(VEGA_EMBED)
