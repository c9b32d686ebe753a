# medflow: `make run` (pipeline on the embedded data, offline) and `make test` (whole suite).
SHELL := /bin/bash
PY    := .venv/bin/python
STAMP := .venv/.installed-stamp

export TF_CPP_MIN_LOG_LEVEL ?= 2
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export MPLBACKEND := Agg
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup run test test-fast browser-deps demo-monitor serve-flows stop-flows demo-retrain clean help

help:            ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(STAMP)  ## create .venv with every dependency (idempotent)
# Bytecode is compiled at install (uv skips it by default): without .pyc files every process recompiles
# the sources it imports (TensorFlow, Evidently, Great Expectations: imports about 2x slower).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip uv
	.venv/bin/uv pip install --python $(PY) --compile-bytecode -e '.[dev]'
	.venv/bin/dvc config --local core.analytics false 2>/dev/null || true
	touch $@

browser-deps:    ## Debian chromium for the real-browser test (apt; needs root)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

run: setup       ## ingest -> validate -> split -> preprocess -> train -> evaluate -> report (dvc repro)
	.venv/bin/dvc repro
	@echo "Report: $(CURDIR)/reports/index.html"

test: setup browser-deps  ## the whole test suite
	$(PY) -m pytest -n 2 --dist loadgroup tests

test-fast: setup ## tests not marked slow
	$(PY) -m pytest -n 2 -m "not slow and not browser" tests

demo-monitor: setup ## monitor a clean and a stain-shifted batch of held-out images (runs the pipeline first if needed)
	$(MAKE) run  # dvc repro: a no-op when the pipeline is up to date (a fresh clone has no trained model)
	rm -rf data/batches/demo-clean data/batches/demo-stain
	medflow simulate-batch data/batches/demo-clean --shift none --n 100 --seed 1
	medflow simulate-batch data/batches/demo-stain --shift stain --strength 0.6 --n 100 --seed 2
	medflow monitor data/batches/demo-clean
	medflow monitor data/batches/demo-stain
	@column -s, -t < reports/monitoring/history.csv | cut -c1-160
	@echo "Reports: $(CURDIR)/reports/monitoring/<batch>/report.html"

serve-flows: setup ## local Prefect server (127.0.0.1) + deployments with cron schedules
	scripts/serve_flows.sh

stop-flows:      ## stop the server and deployments (PID files in .prefect/)
	scripts/stop_flows.sh

demo-retrain: setup ## end-to-end: drifted labelled batch -> monitoring -> retraining -> promotion decision
	scripts/demo_retrain.sh

clean:           ## remove generated data (keeps .venv and the DVC cache)
	rm -rf data/interim data/processed data/embeddings reports/eval reports/metrics reports/index.html
