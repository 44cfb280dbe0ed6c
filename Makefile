# rmos-runs developer / CI entry points. `make ci` is what CI runs (via .ci/run).
#
#   make deps   install test dependencies (nats-server, moto S3 venv); idempotent, fast when done
#   make test   THE test command (README, .ci/run): deps, fmt + clippy, deploy checks, the
#               whole suite (integration tests start real nats-server / S3 servers on free
#               ports), then every fuzz target for FUZZ_SECONDS (15) each
#   make check  formatting + clippy, warnings are errors
#   make run    run the worker on its defaults (local store, local NATS started if needed)
#   make bench  store benchmarks (figures + the command that produced them)

CARGO ?= cargo

.PHONY: all deps test check fmt clippy ci run bench validate-deploy fuzz

all: test

deps:
	bash scripts/install-deps.sh

# Benchmarks are compiled by clippy (--all-targets) but not run here: they measure, they
# do not assert, and `make bench` runs them in release mode.
test: deps check validate-deploy
	$(CARGO) test --locked --lib --bins --tests
	$(MAKE) fuzz

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
	$(CARGO) bench --locked --bench store
	$(CARGO) bench --locked --bench e2e

# Offline checks of deploy/ (hadolint, compose config, nats-server -t, systemd-analyze).
validate-deploy:
	bash deploy/validate.sh
