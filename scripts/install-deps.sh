#!/usr/bin/env bash
# Install the non-Rust test dependencies of rmos-runs. Idempotent; a rerun with
# everything in place does no network access and takes a few milliseconds.
#
#   - nats-server        Debian package (apt-get), if not already on PATH
#   - .tools/s3-venv     Python venv with the pinned S3 test server (moto),
#                        from scripts/s3-requirements.txt; rebuilt from scratch
#                        when that file changes (tracked by a sha256 marker)
#
# Meant to run as root on Debian 12 with CPython 3.11 available (CI and dev
# machines). Prints one line per thing installed, then "deps ok".
# Env: PYTHON=/path/to/python3 to choose the interpreter for the venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/scripts/s3-requirements.txt"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/s3-venv"
MARKER="$VENV/.requirements.sha256"

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

# ---- nats-server (Debian package) ------------------------------------------
if ! command -v nats-server >/dev/null 2>&1; then
    if [[ -x /usr/sbin/nats-server ]]; then
        # Installed, but /usr/sbin is not on this PATH: nothing to install.
        echo "install-deps: note: nats-server is at /usr/sbin/nats-server (not on PATH)" >&2
    else
        export DEBIAN_FRONTEND=noninteractive
        quiet apt-get update -q
        quiet apt-get install -y -q --no-install-recommends nats-server
        echo "installed nats-server $(dpkg-query -W -f='${Version}' nats-server 2>/dev/null || true) (apt)"
    fi
fi

# ---- openssl CLI (the security tests make keys and certificates with it) -----
if ! command -v openssl >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -q
    quiet apt-get install -y -q --no-install-recommends openssl
    echo "installed openssl (apt)"
fi

# ---- S3 test server venv (.tools/s3-venv) ----------------------------------
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
venv_ok() {
    [[ -x "$VENV/bin/python" && -f "$MARKER" && "$(<"$MARKER")" == "$want" ]]
}

if ! venv_ok; then
    mkdir -p "$TOOLS"
    # Serialise concurrent runs (e.g. two test jobs starting at once).
    exec 9>"$TOOLS/.install.lock"
    flock 9
    if ! venv_ok; then
        py="${PYTHON:-}"
        if [[ -z "$py" ]]; then
            for cand in python3.11 python3; do
                if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
            done
        fi
        [[ -n "$py" ]] || { echo "install-deps: no python3 found" >&2; exit 1; }

        rm -rf "$VENV"
        if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
            # Debian's own python3 needs python3-venv for ensurepip.
            rm -rf "$VENV"
            export DEBIAN_FRONTEND=noninteractive
            quiet apt-get update -q
            quiet apt-get install -y -q --no-install-recommends python3-venv
            echo "installed python3-venv (apt)"
            quiet "$py" -m venv "$VENV"
        fi
        quiet "$VENV/bin/python" -m pip install --disable-pip-version-check \
            --no-input -q -r "$REQ"
        printf '%s\n' "$want" >"$MARKER"
        moto_v="$(sed -n 's/^moto\[[^]]*\]==//p' "$REQ" | head -n1)"
        echo "installed S3 test server: moto ${moto_v:-?} in .tools/s3-venv (pip)"
    fi
    exec 9>&-
fi

echo "deps ok"
