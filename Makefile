# The two README commands: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test smoke readme-check lint bench bench-quick bench-heartbeat bench-redis-recovery bench-admin-live history nemesis clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# A random SECRET_KEY for this checkout, private to it (settings reads it when SECRET_KEY is unset).
var/secret_key:
	mkdir -p var
	umask 077 && $(PYTHON) -c "import secrets; print(secrets.token_urlsafe(50))" > $@

run: $(VENV)/.runtime var/secret_key
	mkdir -p var
	$(PY) manage.py migrate --noinput
	$(PY) scripts/run.py

# The browser tests (tests/browser/) need Chromium at $(CHROMIUM); without it they are skipped, and said so.
CHROMIUM ?= /usr/bin/chromium
# Test processes (pytest-xdist): most tests wait on servers and timeouts, so two share two cores well.
TEST_WORKERS ?= 2

test: $(VENV)/.dev
	mkdir -p var
	$(PY) -m ruff check .
	@if [ -x "$(CHROMIUM)" ]; then echo "browser tests: running in $(CHROMIUM)"; \
	else echo "*** browser tests SKIPPED: no Chromium at $(CHROMIUM) (apt-get install -y chromium) ***"; fi
	CHROMIUM="$(CHROMIUM)" $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile
	@[ -x "$(CHROMIUM)" ] || echo "*** browser tests were SKIPPED: no Chromium at $(CHROMIUM) ***"

# A fresh clone of HEAD in a temporary folder: `make run` there, HTTP checks, the README's examples,
# Ctrl-C, nothing left running. Standard library only; needs no .venv here.
smoke:
	$(PYTHON) scripts/smoke.py --readme

# The README's examples against a `make run` already running here (on a fresh database: they create a token).
readme-check:
	$(PYTHON) scripts/readme_check.py

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The hot paths side by side with their anchors (etcd for heartbeats): a table, written to bench/RESULTS.md.
# Needs wrk and etcd (Debian: apt-get install wrk etcd-server). Takes several minutes; run on a quiet machine.
# BENCH_PG_URL=postgres://user@host:5432/db adds PostgreSQL runs (each on a scratch database made there).
bench: $(VENV)/.dev var/secret_key
	$(PY) bench/suite.py

bench-quick: $(VENV)/.dev var/secret_key
	$(PY) bench/suite.py --quick

bench-heartbeat: $(VENV)/.dev var/secret_key
	$(PY) bench/heartbeat.py

# The live admin's figures: API change to open page (Playwright), overview server time and queries per
# admin page with 10,000 services; screenshots to docs/screenshots/.
bench-admin-live: $(VENV)/.dev var/secret_key
	$(PY) bench/admin_live.py

bench-redis-recovery: $(VENV)/.runtime
	$(PY) bench/redis_recovery.py

# The consumer-group history check, long: 6 member processes, 3 minutes of faults, then the checker
# (exit 1 on any violation), after the takeover figures. HISTORY_ARGS adds options (see --help).
history: $(VENV)/.dev
	$(PY) bench/history.py --takeover 5
	$(PY) bench/history.py --seconds 180 $(HISTORY_ARGS)

# The long fault-injection runs whose short versions are in `make test`: leadership under master and holder
# faults for 3 minutes, schemathesis for 5 minutes, then the consumer-group history (`make history`).
nemesis: $(VENV)/.dev
	mkdir -p var
	LEADERSHIP_CHAOS_SECONDS=180 SCHEMATHESIS_MAX_TIME=300 $(PY) -m pytest -o timeout=900 \
		tests/test_leadership.py::test_randomised_faults_never_let_a_stale_term_write tests/test_schemathesis.py
	$(MAKE) history

clean:
	rm -rf var .pytest_cache .ruff_cache
