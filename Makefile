# The two commands: `make dev` runs the system, `make test` runs the tests.
# Both set themselves up from a fresh clone (virtualenv at .venv, every package pinned with
# hashes in requirements.lock). `make lock` updates the lock after pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
PIP := $(BIN)/python -m pip --disable-pip-version-check
# `make lock` resolves with uv (installed into .venv at this version on demand). Besides
# pyproject.toml's dependencies and its `dev` extra, the lock pins the installer and the build
# backend of the editable install, so nothing in `make install` floats.
UV_VERSION := 0.13.8
LOCK_ALSO := pip 'setuptools>=68' wheel
LOCK_FLAGS := --extra dev --universal --generate-hashes --custom-compile-command 'make lock'
# The page tests (tests/e2e/test_pages.py) drive Debian's Chromium. `make test` checks for it
# first; CHROMIUM names the binary it looks for (override it to try the "missing" path).
CHROMIUM ?= chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo )

.PHONY: install lock lock-upgrade chromium dev test lint typecheck bench clean

install: $(STAMP)

# 1. every locked package, hash-checked; 2. the project itself, editable and offline
# (--no-index): a requirement of pyproject.toml that the lock lacks or pins outside its range
# fails here instead of floating to whatever the index serves today.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing $(VENV) from $(LOCK)"
	$(PIP) install -q --require-hashes -r $(LOCK)
	@$(PIP) install -q --no-index --no-build-isolation -e '.[dev]' || { \
	  echo >&2; \
	  echo "$(LOCK) does not satisfy pyproject.toml (see pip's error above)." >&2; \
	  echo "Run \`make lock\` to update it, then commit $(LOCK) with pyproject.toml." >&2; \
	  exit 1; }
	touch $(STAMP)

# Re-resolve after editing dependencies in pyproject.toml: pins already in the lock are kept
# where they still fit. `make lock-upgrade` moves every pin to the newest allowed release.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q 'uv==$(UV_VERSION)'
	printf '%s\n' $(LOCK_ALSO) | $(BIN)/uv pip compile -q pyproject.toml - $(LOCK_FLAGS) \
	  $(UV_UPGRADE) -o $(LOCK)
	@echo "$(LOCK) updated: \`make install\` applies it; commit it with pyproject.toml"

lock-upgrade: UV_UPGRADE := --upgrade
lock-upgrade: lock

# Present, or installed from Debian when we are root with apt-get; otherwise stop at once with
# the command to run (before minutes of tests end in page-test errors).
chromium:
	@if command -v '$(CHROMIUM)' >/dev/null 2>&1; then exit 0; fi; \
	if [ '$(CHROMIUM)' = chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; \
	then \
	  echo "chromium not found: installing Debian's chromium (apt-get) for the page tests"; \
	  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	    >/dev/null; then \
	    command -v chromium >/dev/null && exit 0; \
	    echo >&2; echo "apt-get installed chromium, but it is not on PATH." >&2; \
	  else echo >&2; echo "apt-get could not install chromium (see above)." >&2; fi; \
	fi; \
	echo >&2; \
	echo "make test needs Debian's Chromium for tests/e2e/test_pages.py: '$(CHROMIUM)' is not on PATH." >&2; \
	echo "Run this, then \`make test\` again:" >&2; \
	echo >&2; \
	echo "    $(SUDO)apt-get update && $(SUDO)apt-get install -y chromium" >&2; \
	echo >&2; \
	exit 1

dev: install
	$(BIN)/tierq dev

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

# chromium first: a machine without it stops in seconds, not after the install and the suite.
test: chromium install lint typecheck
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/broker.py

clean:
	rm -rf $(VENV) .tierq .pytest_cache .mypy_cache .ruff_cache .hypothesis
