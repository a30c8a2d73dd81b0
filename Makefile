# The two commands of the README. Each creates .venv on first use (CPU torch for development).
# demo: erase one concept from the bundled world model, write out/demo/REPORT.md (2-5 min on a CPU).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) -m bench.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e . || $(VENV)/bin/pip install -q --no-deps -e .
	touch $@
