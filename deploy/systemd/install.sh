#!/usr/bin/env bash
# Install the gridckpt systemd units, pointing ExecStart at this checkout's venv.
# Usage: sudo deploy/systemd/install.sh [VENV]   (default: $GRIDCKPT_VENV, else <repo>/.venv)
# Writes /etc/systemd/system/gridckpt-{orchestrator,agent@}.service and, if absent, a
# commented /etc/gridckpt/gridckpt.env. Enables nothing: see README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${GRIDCKPT_VENV:-$repo/.venv}}"
(( EUID == 0 )) || { echo "[systemd] error: run as root" >&2; exit 2; }
[[ -x "$venv/bin/gridckpt" ]] || { echo "[systemd] error: $venv/bin/gridckpt missing: run deploy/setup.sh first" >&2; exit 1; }
for unit in gridckpt-orchestrator.service gridckpt-agent@.service; do
    sed -e "s#/opt/gridckpt/.venv#${venv}#g" -e "s#/opt/gridckpt/README.md#${repo}/README.md#g" \
        "$here/$unit" > "/etc/systemd/system/$unit"
    echo "[systemd] wrote /etc/systemd/system/$unit" >&2
done
if [[ ! -e /etc/gridckpt/gridckpt.env ]]; then
    mkdir -p /etc/gridckpt
    cat > /etc/gridckpt/gridckpt.env <<'ENV'
# gridckpt site settings, read by gridckpt-orchestrator and gridckpt-agent@NODE.
# The VO's broker URL (deploy/rabbitmq/setup-vo.sh prints one):
#GRIDCKPT_BROKER=amqp://gridckpt:PASSWORD@broker.example.org/vo1
# The checkpoint store: a local directory, or NFS/CephFS/Lustre shared by the site's nodes:
#GRIDCKPT_STORE=/var/lib/gridckpt
# This node's site (agents):
#GRIDCKPT_SITE=default
ENV
    chmod 600 /etc/gridckpt/gridckpt.env
    echo "[systemd] wrote /etc/gridckpt/gridckpt.env (edit it)" >&2
fi
if [[ -d /run/systemd/system ]]; then systemctl daemon-reload; fi
