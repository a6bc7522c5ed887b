#!/usr/bin/env bash
# 100,000 connections on one machine (issue 23 item 7): NODES wsbus nodes on one redis-server,
# TOTAL WebSocket connections spread evenly over them by NODES load-tester processes (this
# sandbox allows 20,000 open files per process: no process may hold more), then dm-cross among
# them at RATE msg/s in total (open loop) for RUN_TIME seconds.
#
# Generator i holds TOTAL/NODES users on nodes i and i+1 (so every node holds TOTAL/NODES
# connections and every message crosses nodes); all of them start sending at the same
# wall-clock time (--start-at), once everyone is connected and the servers were measured idle.
#
# It prints and writes to $OUT/summary.txt: the connect rate (all connections over the time
# from the first connect to the last); idle: RSS per node and in total, Redis used_memory, node
# and Redis CPU (heartbeats and nothing else) and Redis calls per second; under load: delivered
# msg/s, node and Redis CPU per message, p50/p99/p99.9/max delivery latency per generator and
# the worst of them; RSS and Redis memory after. Stops everything it started on exit.
#
# Environment knobs (defaults in brackets):
#   TOTAL [100000]  connections     NODES [6]  nodes (and generators)
#   RATE [2000]     msg/s in total  RUN_TIME [30]  seconds of sending
#   HATCH [1500]    connects/s in total (more than 2 cores handshake: connects then time out)   IDLE_SECS [10]  seconds measured idle
#   NODE_ARGS       extra `wsbus serve` flags      SKIP_BUILD  use the release binaries as they are
#   OUT             results dir [<target>/100k/<timestamp>]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TOTAL=${TOTAL:-100000}
NODES=${NODES:-6}
RATE=${RATE:-2000}
RUN_TIME=${RUN_TIME:-30}
HATCH=${HATCH:-1500}
IDLE_SECS=${IDLE_SECS:-10}
read -r -a EXTRA_NODE_ARGS <<<"${NODE_ARGS:-}"
for tool in redis-server redis-cli jq curl; do
    command -v "$tool" >/dev/null || { echo "100k: $tool is required" >&2; exit 2; }
done
PER_GEN=$(( (TOTAL + NODES - 1) / NODES ))
# Each process (node or generator) holds about PER_GEN sockets, plus Redis connections and files.
NEED_FILES=$((PER_GEN + 1000))
ulimit -n "$NEED_FILES" 2>/dev/null || {
    echo "100k: cannot raise the open-file limit to $NEED_FILES (hard $(ulimit -Hn)): use more NODES" >&2
    exit 2
}

TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)}
OUT=${OUT:-$TARGET/100k/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LIB_NAME=100k
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"
lib_scope

if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --workspace
fi
WSBUS=$TARGET/release/wsbus
LT=$TARGET/release/wsbus-loadtest
[ -x "$WSBUS" ] && [ -x "$LT" ] || lib_die "$WSBUS or $LT missing"

start_redis
serve_args
NODE_PIDS=() NODE_URLS=()
for i in $(seq 0 $((NODES - 1))); do
    free_port
    start_node "n$i" "$FREE_PORT" "${EXTRA_NODE_ARGS[@]}"
    NODE_PIDS+=("$NODE_PID")
    NODE_URLS+=("ws://127.0.0.1:$FREE_PORT")
done
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"
say "100k: $TOTAL connections over $NODES nodes ($PER_GEN each, by $NODES load testers), one Redis; then dm-cross at $RATE msg/s for $RUN_TIME s"
say "100k: machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg), $(git describe --always --dirty)"

nodes_ticks() { local t=0 p; for p in "${NODE_PIDS[@]}"; do t=$((t + $(cpu_ticks "$p"))); done; echo "$t"; }
nodes_rss() { local t=0 p; for p in "${NODE_PIDS[@]}"; do t=$((t + $(rss_kib "$p"))); done; echo "$t"; }
redis_mem() { redis-cli -p "$RPORT" INFO memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)/\1/p'; }
redis_calls() { redis-cli -p "$RPORT" INFO stats | tr -d '\r' | sed -n 's/^total_commands_processed:\([0-9]*\)/\1/p'; }
node_rss_list() { local p out=""; for p in "${NODE_PIDS[@]}"; do out+="$(( $(rss_kib "$p") / 1024 )) "; done; echo "$out"; }

RSS0=$(nodes_rss)
MEM0=$(redis_mem)
ramp=$(( TOTAL / HATCH + 1 ))
START_AT=$(( $(date +%s) + 2 * ramp + 30 + IDLE_SECS ))
DEADLINE=$(( START_AT - $(date +%s) + RUN_TIME + 60 ))
GEN_PIDS=()
connect_started=$(date +%s.%N)
for i in $(seq 0 $((NODES - 1))); do
    j=$(( (i + 1) % NODES ))
    "$LT" dm-cross --node "${NODE_URLS[$i]}" --node "${NODE_URLS[$j]}" \
        --users "$PER_GEN" --rate "$(( RATE / NODES ))" --hatch-rate "$(( HATCH / NODES ))" \
        --run-time "$RUN_TIME" --start-at "$START_AT" --deadline "$DEADLINE" --grace 5 \
        --json >"$OUT/gen-$i.json" 2>"$OUT/gen-$i.err" &
    GEN_PIDS+=("$!")
    PIDS+=("$!")
done

# Connected: every generator has said so (or connected late and started sending).
all_connected() { local i; for i in $(seq 0 $((NODES - 1))); do grep -q 'users connected' "$OUT/gen-$i.err" || return 1; done; }
until all_connected; do
    for p in "${GEN_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || lib_die "a load tester exited early: $(tail -n 3 "$OUT"/gen-*.err)"; done
    [ "$(date +%s)" -lt "$START_AT" ] || break
    sleep 0.2
done
connected_at=$(date +%s.%N)
connected=$(cat "$OUT"/gen-*.err | sed -n 's/^dm: \([0-9]*\) users connected.*/\1/p' | awk '{n += $1} END {print n + 0}')
say "$(awk -v n="$connected" -v a="$connect_started" -v b="$connected_at" 'BEGIN {
    printf "connect: %d connections in %.1f s: %.0f connections/s (asked %d/s)", n, b - a, n / (b - a), '"$HATCH"' }')"

# Idle: heartbeats only.
left=$(( START_AT - $(date +%s) - 2 ))
[ "$left" -ge "$IDLE_SECS" ] || say "idle: only $left s left before sending (wanted $IDLE_SECS)"
idle=$(( left < IDLE_SECS ? left : IDLE_SECS ))
if [ "$idle" -gt 0 ]; then
    n0=$(nodes_ticks); r0=$(cpu_ticks "$RPID"); c0=$(redis_calls); t0=$(date +%s.%N)
    sleep "$idle"
    n1=$(nodes_ticks); r1=$(cpu_ticks "$RPID"); c1=$(redis_calls); t1=$(date +%s.%N)
    RSS1=$(nodes_rss); MEM1=$(redis_mem)
    say "$(awk -v n="$((n1 - n0))" -v r="$((r1 - r0))" -v c="$((c1 - c0))" -v a="$t0" -v b="$t1" -v tck="$TCK" \
        -v rss0="$RSS0" -v rss1="$RSS1" -v m0="$MEM0" -v m1="$MEM1" -v conns="$connected" 'BEGIN {
        s = b - a
        printf "idle (%.0f s, %d connections): nodes %.1f %% CPU, Redis %.2f %% CPU, %.0f Redis calls/s\n", s, conns, n / tck / s * 100, r / tck / s * 100, c / s
        printf "idle memory: nodes RSS %.0f MiB in total (%.0f MiB before connecting; %.1f KiB per connection), Redis used_memory %.1f MiB (+%.0f bytes per connection)",
            rss1 / 1024, rss0 / 1024, (rss1 - rss0) / conns, m1 / 1048576, (m1 - m0) / conns }')"
    say "idle RSS per node (MiB): $(node_rss_list)"
fi

# Under load: from START_AT to the end of the generators.
while [ "$(date +%s)" -lt "$START_AT" ]; do sleep 0.1; done
n0=$(nodes_ticks); r0=$(cpu_ticks "$RPID")
sleep "$RUN_TIME"
n1=$(nodes_ticks); r1=$(cpu_ticks "$RPID")
RSS2=$(nodes_rss); MEM2=$(redis_mem)
rc=0
for p in "${GEN_PIDS[@]}"; do wait "$p" || rc=$?; done
forget_pids "${GEN_PIDS[@]}"
delivered=$(jq -s '[.[].messages.delivered] | add' "$OUT"/gen-*.json)
lost=$(jq -s '[.[].messages.lost] | add' "$OUT"/gen-*.json)
errored=$(jq -s '[.[].messages.errored] | add' "$OUT"/gen-*.json)
say "$(awk -v n="$((n1 - n0))" -v r="$((r1 - r0))" -v tck="$TCK" -v d="$delivered" -v s="$RUN_TIME" 'BEGIN {
    printf "load (%d s): %d delivered, %.0f msg/s; nodes %.1f %% CPU (%.1f µs/msg), Redis %.1f %% CPU (%.1f µs/msg)",
        s, d, d / s, n / tck / s * 100, n / tck * 1e6 / d, r / tck / s * 100, r / tck * 1e6 / d }')"
say "load: lost $lost, errored $errored; nodes RSS $((RSS2 / 1024)) MiB, Redis used_memory $(( MEM2 / 1048576 )) MiB"
say "latency per generator (ms: p50 p99 p99.9 max):"
for i in $(seq 0 $((NODES - 1))); do
    say "  gen-$i: $(jq -r '.messages.latency_us | "\(.p50 / 1000) \(.p99 / 1000) \(.p999 / 1000) \(.max / 1000)"' "$OUT/gen-$i.json")"
done
say "worst p99 $(jq -s '[.[].messages.latency_us.p99] | max / 1000' "$OUT"/gen-*.json) ms, worst p99.9 $(jq -s '[.[].messages.latency_us.p999] | max / 1000' "$OUT"/gen-*.json) ms"
say "100k: results in $OUT"
[ "$rc" = 0 ] || { echo "100k: a load tester failed (rc $rc); see $OUT/gen-*.err" >&2; exit 1; }
