# `make test` is the one command that installs what the tests need and runs them all.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test deps lint unit crds demo bench

test: deps lint unit

# System packages the tests use: a PostgreSQL server (started per test run by the harness in
# tests/support/pg.rs, never as a system service) and its client tools.
deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing PostgreSQL from Debian packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null; \
	fi
	@id postgres >/dev/null 2>&1 || { echo "the postgres user is missing; reinstall the postgresql package"; exit 1; }
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@# Segment's official Python SDK, the real client of the engine in tests/segment_sdk.rs.
	@test -x .venv-segment/bin/python && .venv-segment/bin/python -c 'import segment.analytics' 2>/dev/null || \
		{ rm -rf .venv-segment && python3 -m venv .venv-segment && .venv-segment/bin/pip install -q -r tests/sdk/requirements.txt; }

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test

# Regenerate crds/ from the Rust types (the tests fail while they differ).
crds:
	$(CARGO) run --quiet -- crdgen --out-dir crds

demo:
	$(CARGO) run --release -- demo

bench:
	$(CARGO) bench
