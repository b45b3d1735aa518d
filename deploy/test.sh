#!/usr/bin/env bash
# Run the whole gridckpt test suite on this machine. Run as root: sudo deploy/test.sh [PYTEST ARGS...]
#
# 1. deploy/setup.sh (installs what is missing: RabbitMQ, CRIU, compiler, the venv);
# 2. starts the local RabbitMQ broker if it is not running, and waits until it is up;
# 3. runs `<venv>/bin/python -m pytest -q tests [ARGS...]` from the repository root (or
#    `pytest -q ARGS...` when the first argument is a path, not an option) with
#    GRIDCKPT_TEST_BROKER=amqp://guest:guest@localhost/ (unless already set; a broker on
#    another host is used as it is).
# Environment: GRIDCKPT_VENV (as setup.sh), GRIDCKPT_SKIP_SETUP=1 (skip step 1),
#    GRIDCKPT_BROKER_WAIT (seconds to wait for the broker, default 90).
# Exit status: pytest's, except that "no tests ran" (pytest's 5) counts as a failure (1).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRIDCKPT_VENV:-$REPO/.venv}"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export GRIDCKPT_TEST_BROKER="${GRIDCKPT_TEST_BROKER:-amqp://guest:guest@localhost/}"
BROKER_WAIT_S="${GRIDCKPT_BROKER_WAIT:-90}"

log() { printf '[test] %s\n' "$*" >&2; }
die() { printf '[test] error: %s\n' "$*" >&2; exit 1; }

(( EUID == 0 )) || { printf '[test] error: run as root (sudo %s)\n' "$0" >&2; exit 2; }

if [[ "${GRIDCKPT_SKIP_SETUP:-0}" == 1 ]]; then
    log "GRIDCKPT_SKIP_SETUP=1: not running deploy/setup.sh"
else
    "$REPO/deploy/setup.sh"
fi

# The host part of an amqp URL: amqp://user:pass@host:port/vhost -> host
broker_host() {
    local rest="${1#*://}"
    rest="${rest%%/*}"
    rest="${rest##*@}"
    if [[ "$rest" == \[* ]]; then rest="${rest#[}"; rest="${rest%%]*}"; else rest="${rest%%:*}"; fi
    printf '%s\n' "$rest"
}

rabbit_up() { rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

start_rabbit() {
    if rabbit_up; then
        log "RabbitMQ is running"
        return 0
    fi
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        log "starting RabbitMQ (systemctl start rabbitmq-server)"
        systemctl start rabbitmq-server || log "systemctl start failed; trying rabbitmq-server -detached"
    fi
    if ! rabbit_up; then
        log "starting RabbitMQ (rabbitmq-server -detached)"
        rabbitmq-server -detached >/dev/null 2>&1 || true
    fi
    log "waiting for RabbitMQ (up to ${BROKER_WAIT_S} s)"
    timeout "$BROKER_WAIT_S" rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    local deadline=$(( SECONDS + BROKER_WAIT_S ))
    until rabbit_up; do
        (( SECONDS < deadline )) ||
            die "RabbitMQ did not start within ${BROKER_WAIT_S} s (see /var/log/rabbitmq/)"
        sleep 1
    done
    log "RabbitMQ is up"
}

case "$(broker_host "$GRIDCKPT_TEST_BROKER")" in
    localhost|127.0.0.1|::1|"") start_rabbit ;;
    *) log "using the broker at $(broker_host "$GRIDCKPT_TEST_BROKER") (not starting a local one)" ;;
esac

cd "$REPO"
# The whole suite, unless the first argument names what to run (deploy/test.sh tests/test_x.py -k y).
if (( $# == 0 )) || [[ "$1" == -* ]]; then set -- tests "$@"; fi
log "$VENV/bin/python -m pytest -q $*"
rc=0
"$VENV/bin/python" -m pytest -q "$@" </dev/null || rc=$?
if (( rc == 5 )); then
    log "error: no tests ran"
    exit 1
fi
exit "$rc"
