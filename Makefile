# rmos-runs developer / CI entry points. `make ci` is what CI runs (via .ci/run).
#
#   make deps   install test dependencies (nats-server, moto S3 venv); idempotent, fast when done
#   make test   deps + the whole test suite (integration tests start real servers on free ports)
#   make check  formatting + clippy, warnings are errors
#   make ci     deps, check, test
#   make run    deps + run the service (`serve`)
#   make bench  (placeholder)

CARGO ?= cargo

.PHONY: all deps test check fmt clippy ci run bench

all: test

deps:
	bash scripts/install-deps.sh

test: deps
	$(CARGO) test --all-targets --locked

fmt:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --all-targets --locked -- -D warnings

check: fmt clippy

ci: deps check test

run: deps
	$(CARGO) run --release -- serve

bench:
	@echo "bench: no benchmarks yet"
