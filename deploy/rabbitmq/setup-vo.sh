#!/usr/bin/env bash
# Create a virtual organisation (VO) on the local RabbitMQ broker: a vhost, and a user with
# full permissions on it (the orchestrator and agents declare their own exchange and queues).
# Idempotent: an existing vhost is kept; an existing user keeps its password unless one is given.
#
# Usage: sudo deploy/rabbitmq/setup-vo.sh VO USER [PASSWORD]
#   PASSWORD  also from $GRIDCKPT_VO_PASSWORD; a new user without one gets a random password.
# Prints the broker URL to use (GRIDCKPT_BROKER) on stdout, e.g. amqp://USER:PASS@HOST/VO
set -euo pipefail
export PATH="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

log() { printf '[setup-vo] %s\n' "$*" >&2; }
usage() { printf 'usage: %s VO USER [PASSWORD]\n' "$0" >&2; exit 2; }

(( $# == 2 || $# == 3 )) || usage
vo="$1" user="$2" password="${3:-${GRIDCKPT_VO_PASSWORD:-}}"
name_re='^[A-Za-z0-9][A-Za-z0-9._-]*$'
[[ "$vo" =~ $name_re ]] || { printf '[setup-vo] error: VO %q: use letters, digits, . _ -\n' "$vo" >&2; exit 2; }
[[ "$user" =~ $name_re ]] || { printf '[setup-vo] error: USER %q: use letters, digits, . _ -\n' "$user" >&2; exit 2; }
(( EUID == 0 )) || { printf '[setup-vo] error: run as root (rabbitmqctl needs the node cookie)\n' >&2; exit 2; }

if rabbitmqctl -q list_vhosts --no-table-headers name | grep -qxF "$vo"; then
    log "vhost $vo exists"
else
    log "adding vhost $vo"
    rabbitmqctl -q add_vhost "$vo" >/dev/null
fi

if rabbitmqctl -q list_users --no-table-headers | cut -f1 | grep -qxF "$user"; then
    if [[ -n "$password" ]]; then
        log "setting the password of user $user"
        rabbitmqctl -q change_password "$user" "$password" >/dev/null
    else
        log "user $user exists (password unchanged)"
    fi
else
    if [[ -z "$password" ]]; then
        password=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
        log "generated a password for user $user"
    fi
    log "adding user $user"
    rabbitmqctl -q add_user "$user" "$password" >/dev/null
fi

log "granting $user configure/write/read on vhost $vo"
rabbitmqctl -q set_permissions -p "$vo" "$user" '.*' '.*' '.*' >/dev/null

printf 'amqp://%s:%s@%s/%s\n' "$user" "${password:-PASSWORD}" "$(hostname -f 2>/dev/null || hostname)" "$vo"
