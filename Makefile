# facesvc: `make run` and `make test` do all set-up on a fresh Debian machine with Python 3.11.
#
#   make run     venv + install + model conversion + Redis (if none answers) + facesvc serve
#   make test    venv + install + Redis (if none answers) + pytest in parallel
#   make lint    ruff + mypy
#   make proto   regenerate facesvc/_proto from proto/ (commit the result)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Tests share two cores with everything else on small machines; override with PYTEST_WORKERS=4.
PYTEST_WORKERS ?= auto
PYTEST_ARGS ?=
REDIS_URL := $(or $(FACESVC_REDIS_URL),redis://127.0.0.1:6379/0)
TEST_REDIS_URL := $(or $(FACESVC_TEST_REDIS_URL),redis://127.0.0.1:6379/0)

.PHONY: run test lint proto venv models redis redis-stop browser-deps keys

venv: $(INSTALLED)

# Reinstall when the dependencies change. face-recognition is only the benchmarks'
# dlib reference; --no-deps keeps it from building dlib from source.
$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), "facesvc needs Python 3.11 or 3.12"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps face-recognition
	touch $@

# Converts the default pack's models into the cache once (later runs find them there).
models: venv
	@if $(PY) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("facesvc.models.convert") is None)'; \
	then $(PY) -m facesvc.models.convert; \
	else echo "facesvc.models.convert is not there yet: no models to convert"; fi

# Starts a local redis-server (var/redis/) only when nothing answers at the URL.
redis: venv
	$(PY) -m facesvc.redis_local ensure --url "$(REDIS_URL)"

redis-stop:
	$(PY) -m facesvc.redis_local stop

# First run only: a token signing key and a template encryption key under var/keys/.
keys: venv
	@test -n "$$(ls var/keys/tokens/*.json 2>/dev/null)" || $(VENV)/bin/facesvc keys generate
	@test -s var/keys/templates.key || $(VENV)/bin/facesvc templates keygen

run: venv models redis keys
	$(VENV)/bin/facesvc serve

# Exit code 5 means pytest collected nothing: a broken collection, never a pass.
test: venv models browser-deps
	$(PY) -m facesvc.redis_local ensure --url "$(TEST_REDIS_URL)"
	FACESVC_TEST_REDIS_URL="$(TEST_REDIS_URL)" $(PY) -m pytest -n $(PYTEST_WORKERS) -q $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

proto: venv
	$(PY) -m facesvc.protogen

# ---------------------------------------------------------------- browser tests
# tests/test_browser.py (marker `browser`) drives Debian's chromium through Playwright for
# Python, which the dev extra installs; `playwright install` is never needed. Without a
# chromium those tests skip, unless FACESVC_REQUIRE_BROWSER=1 (as .ci/run sets). `make test`
# installs Debian's chromium first when it runs as root.
# Needs root for apt; FACESVC_CHROMIUM names another binary.
browser-deps:
	@if command -v $${FACESVC_CHROMIUM:-chromium} >/dev/null 2>&1; then \
		$${FACESVC_CHROMIUM:-chromium} --version; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null && chromium --version; \
	else \
		echo "no chromium and no root to install it: the browser tests will skip"; \
	fi
