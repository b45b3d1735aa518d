#!/usr/bin/env bash
# The main gridckpt job on the embedded default (memory:// bus, no broker needed).
# Run as root: sudo deploy/demo.sh [EXTRA ARGS for `gridckpt run`...]
#
# Runs deploy/setup.sh, then `<venv>/bin/gridckpt run --demo examples/demo.toml`: a real
# multi-unit job is started, checkpointed, one unit is killed and the job is restarted from
# the checkpoint; the stage timings are printed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRIDCKPT_VENV:-$REPO/.venv}"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

(( EUID == 0 )) || { printf '[demo] error: run as root (sudo %s)\n' "$0" >&2; exit 2; }

"$REPO/deploy/setup.sh"
cd "$REPO"
printf '[demo] %s\n' "$VENV/bin/gridckpt run --demo examples/demo.toml $*" >&2
exec "$VENV/bin/gridckpt" run --demo examples/demo.toml "$@"
