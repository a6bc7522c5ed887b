#!/usr/bin/env bash
# Soak: dm-cross at about half the measured maximum for several minutes, sampling node RSS,
# Redis memory, inbox lengths and the key count; fails if any user key outlives its user.
#   SOAK_SECONDS [300]  SOAK_RATE [70000 msg/s]  SOAK_EVERY [10 s]  USERS [400]
# The rest (build, Redis, two nodes, cleanup) is loadtest/bench.sh's.
set -euo pipefail
export SOAK_SECONDS=${SOAK_SECONDS:-300}
exec "$(dirname "$0")/bench.sh"
