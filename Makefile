# The two commands: `make run` (everything on loopback) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .venv-tools

.PHONY: setup run test test-fast bench bench-full reliability clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# checkov (tests/integration/test_infra.py) pins packaging<24 while pytest needs >=24: it gets a venv of its own.
$(TOOLS)/.installed: requirements-tools.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-tools.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: setup
	$(PY) -m scripts.run_local

test: setup $(TOOLS)/.installed
	$(PY) -m pytest

# The inner loop: the unit tier only (no I/O, no Azurite), seconds.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) -m scripts.bench --requests 60
	$(PY) -m scripts.bench_intake --clients 8 --seconds 15

bench-full: setup
	$(PY) -m scripts.bench --requests 300

# The long fault-injection runs behind RELIABILITY.md (make test runs shortened versions).
reliability: setup
	RELIABILITY_REQUESTS=100 RELIABILITY_KILLS=20 $(PY) -m pytest -s -q tests/system/test_scale_out.py::test_i2_sigkilled_hosts_lose_nothing_and_never_break_the_limit tests/system/test_faults.py
	$(PY) -m pytest -s -q tests/unit/test_intake_crash.py tests/unit/test_coalescing_properties.py
	RELIABILITY_INTAKE_MESSAGES=40 RELIABILITY_INTAKE_KILLS=12 $(PY) -m pytest -s -q tests/system/test_intake_kills.py

clean:
	rm -rf $(VENV) $(TOOLS) node_modules .run .pytest_cache .hypothesis
