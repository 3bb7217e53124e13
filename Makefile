# llmmesh: `make up` runs the local mesh, `make test` runs every test.
# Everything installs into .venv on first use; nothing else is needed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help venv gen check-gen lint fmt test test-fast up bench loadtest prometheus chromium wrk clean docs docs-check

help:
	@echo "make up        start the local mesh (CPU backends, adapters, router, Envoy)"
	@echo "               [REPLICAS=N] [BACKENDS=\"qwen2=http://h:p,http://h2:p ...\"]"
	@echo "               [API_KEYS_FILE=FILE] [TLS=1]"
	@echo "make test      install what is missing and run every check and test"
	@echo "make test-fast unit and component tests only"
	@echo "make gen       regenerate gen/ from protos/"
	@echo "make lint      ruff and mypy"
	@echo "make bench     benchmarks; prints figures"
	@echo "make loadtest URL=http://host:8000 [ARGS=...]  load-test a deployment"
	@echo "make docs      serve the documentation site on http://127.0.0.1:8010"

$(STAMP): pyproject.toml gen/python/pyproject.toml scripts/install_llama_cpp.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e gen/python -e '.[dev]'
	bash scripts/install_llama_cpp.sh $(VENV)
	@touch $@

venv: $(STAMP)

gen: $(STAMP)
	$(PY) scripts/gen.py
	$(PY) envoy/render.py
	$(PY) observability/render.py
	# kustomize reads only files below its folder: the Envoy ConfigMap takes copies.
	cp envoy/envoy.k8s.yaml deploy/k8s/base/envoy/envoy.yaml
	cp gen/llmmesh.binpb deploy/k8s/base/envoy/llmmesh.binpb

# Generated code must match protos/; the contract must lint and must not
# break what is on main.
check-gen: $(STAMP)
	$(PY) scripts/gen.py --check
	$(PY) envoy/render.py --check
	$(PY) observability/render.py --check
	buf lint
	@if git rev-parse --verify -q main >/dev/null; then \
		buf breaking --against '.git#branch=main'; \
	else echo "buf breaking: no main branch here, skipped"; fi

lint: $(STAMP)
	ruff check services tests scripts envoy observability tools
	mypy

fmt: $(STAMP)
	ruff check --fix services tests scripts envoy observability tools

# Prometheus is a Debian package; the observability tests use the real
# server (prometheus) and its rule checker (promtool): both must be there.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		echo "installing prometheus (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The playground's browser test drives Debian's chromium with Playwright.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "installing chromium (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# wrk is a Debian package: the load generator of `make bench` (costs little CPU).
wrk:
	@command -v wrk >/dev/null || { \
		echo "installing wrk (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends wrk >/dev/null; }

test: $(STAMP) check-gen lint docs-check prometheus chromium wrk
	$(PY) -m pytest -q -p no:cacheprovider -p tests.strict_skips

# In-process tests only (tests/harness/__init__.py says what goes where).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/component

# make up [REPLICAS=N] [BACKENDS="qwen2=http://h:p,http://h2:p ..."] [API_KEYS_FILE=keys.txt] [TLS=1]
up: $(STAMP)
	$(PY) -m services.launcher $(if $(BACKENDS),--backends "$(BACKENDS)") \
		$(if $(REPLICAS),--replicas "$(REPLICAS)") \
		$(if $(API_KEYS_FILE),--api-keys-file "$(API_KEYS_FILE)") \
		$(if $(filter 1 yes true on,$(TLS)),--tls)

bench: $(STAMP) wrk
	$(PY) -m tests.bench

# Any deployment: make loadtest URL=http://gpu-host:8000 ARGS="--concurrency 1,4,8"
# (python -m tools.loadtest --help lists every option).
LOADTEST_OUT := .run/loadtest
loadtest: $(STAMP)
	$(PY) -m tools.loadtest --url "$(or $(URL),http://127.0.0.1:8000)" \
		--json $(LOADTEST_OUT)/results.json --plot $(LOADTEST_OUT)/results.png $(ARGS)

# The documentation site from docs/ (mkdocs.yml). Port 8010: Envoy has 8000.
docs: $(STAMP)
	mkdocs serve -f mkdocs.yml -a 127.0.0.1:8010

# A broken link or anchor, or a page missing from the nav, fails the build.
docs-check: $(STAMP)
	mkdocs build --strict -f mkdocs.yml -d .run/site

clean:
	rm -rf .run .mypy_cache .ruff_cache .pytest_cache
