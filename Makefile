# lcm: `make train` and `make test` each do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/mqar_attention
CONFIG ?= configs/mqar.py:attention
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

# The first interpreter that is Python >= 3.12: $(PYTHON) if given, then the usual names,
# then pyenv / uv installs (whose shims may exist without a working interpreter).
define find_python
for c in $${PYTHON:-} python3.13 python3.12 python3 /root/.pyenv/versions/3.1[2-9]*/bin/python3 \
         $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 $$HOME/.local/share/uv/python/*3.1[2-9]*/bin/python3; do \
  [ -n "$$c" ] || continue; \
  if "$$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then \
    echo "$$c"; exit 0; fi; \
done; exit 1
endef

.PHONY: train test venv venv-dev bench check-results clean clean-runs

$(VENV)/.base: setup.cfg pyproject.toml
	@py=$$($(find_python)) || { \
	  echo "lcm needs Python >= 3.12 (jax 0.12 does). None found on PATH or under pyenv."; \
	  echo "Install one, e.g. 'apt-get install python3.12 python3.12-venv', 'pyenv install 3.12', or 'uv python install 3.12',"; \
	  echo "or point to it: make PYTHON=/path/to/python3.12 ..."; exit 1; }; \
	echo "Using $$py ($$($$py --version))"; \
	[ -x $(PY) ] || $$py -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip; \
	$(PY) -m pip install -q -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev,notebooks]'
	@touch $@

$(VENV)/.bench: $(VENV)/.base
	$(PY) -m pip install -q -e '.[bench]'
	@touch $@

venv: $(VENV)/.base
venv-dev: $(VENV)/.dev

train: $(VENV)/.base
	$(PY) -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)
	@echo "Results: $(WORKDIR)/summary.json, metrics $(WORKDIR)/metrics.jsonl, TensorBoard: $(WORKDIR)/tb, checkpoints $(WORKDIR)/checkpoints"

# `-m "not experiment"` (also setup.cfg's default): experiment-scale tests stay out; run them
# with `$(PY) -m pytest -m experiment ...` (docs/performance.md, "Test-suite time").
test: $(VENV)/.dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not experiment" --durations=25 $(PYTEST_ARGS)

# Layer throughput vs the published peers (mamba2-jax, titans-pytorch), in one process.
bench: $(VENV)/.bench
	$(PY) -m experiments.bench layers --repeats=3 --out=results/bench_layers

# Lists results files older than the code they measure (not part of `make test`).
check-results: $(VENV)/.base
	$(PY) -m experiments.check_results

# `clean` keeps runs/ (trained models and their metrics); `clean-runs` deletes it.
clean:
	rm -rf $(VENV) .pytest_cache
	@[ ! -d runs ] || echo "kept runs/ (trained runs); 'make clean-runs' deletes it"

clean-runs:
	@[ ! -d runs ] || { echo "deleting runs/: $$(ls runs | wc -l) run(s)"; rm -rf runs; }
