#!/usr/bin/env bash
# The knee of the open-loop room fan-out (issue 23 item 6): room-fanout at rising rates of room
# messages into ROOMS rooms of ROOM_MEMBERS members (spread over two nodes), each rate on a
# fresh redis-server and two fresh nodes, until the delivery p99 passes P99_MS at two rates in
# a row (one run's p99 is noisy); prints per rate the delivered rate, p50/p99/p99.9 and
# node/Redis CPU, and the highest rate that held.
#
#   loadtest/knee.sh [BIN...]     each BIN a wsbus binary (default: this tree's release build;
#                                 `pubsub`: the pub/sub reference node), measured in turn at
#                                 each rate (interleaved), so every rate compares them alike
#
# Environment knobs (defaults in brackets):
#   RATES ["100 200 300 400 600 800 1000"]  room messages/s in total, in order
#   ROOMS [20]  ROOM_MEMBERS [200]  RUN_TIME [10]  FPW [1]  P99_MS [5]
#   NODE_ARGS   extra `wsbus serve` flags      OUT  results dir [<target>/knee/<timestamp>]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RATES=${RATES:-100 200 300 400 600 800 1000}
ROOMS=${ROOMS:-20}
ROOM_MEMBERS=${ROOM_MEMBERS:-200}
RUN_TIME=${RUN_TIME:-10}
FPW=${FPW:-1}
P99_MS=${P99_MS:-5}
read -r -a EXTRA_NODE_ARGS <<<"${NODE_ARGS:-}"
TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)}
BINS=("$@")
[ "${#BINS[@]}" -gt 0 ] || BINS=("$TARGET/release/wsbus")
LT=$TARGET/release/wsbus-loadtest
OUT=${OUT:-$TARGET/knee/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LIB_NAME=knee
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"
lib_scope
[ -x "$LT" ] || lib_die "$LT missing (cargo build --release --workspace)"
for bin in "${BINS[@]}"; do
    [ "$bin" = pubsub ] && { pubsub_ready; continue; }
    [ -x "$bin" ] || lib_die "$bin is not an executable"
done

echo "knee: room-fanout open loop, $ROOMS rooms of $ROOM_MEMBERS, $FPW frame(s) per write, $RUN_TIME s per rate; held while p99 <= $P99_MS ms"
echo "knee: load average before: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
printf 'bin\trate\tdelivered_per_s\tp50_ms\tp99_ms\tp999_ms\tnode_us\tredis_us\n' >"$OUT/knee.tsv"
declare -A HELD DONE MISSES
for rate in $RATES; do
    for k in "${!BINS[@]}"; do
        [ -z "${DONE[$k]:-}" ] || continue
        bin=${BINS[$k]}
        dir=$OUT/$k-$rate
        mkdir -p "$dir"
        saved_out=$OUT; OUT=$dir
        if [ "$bin" = pubsub ]; then PEER=pubsub WSBUS=; else PEER=wsbus WSBUS=$bin; fi
        start_redis
        serve_args
        free_port; a=$FREE_PORT
        start_node "knee-a" "$a" "${EXTRA_NODE_ARGS[@]}"; apid=$NODE_PID
        free_port; b=$FREE_PORT
        start_node "knee-b" "$b" "${EXTRA_NODE_ARGS[@]}"; bpid=$NODE_PID
        rc=0
        timeout 600 "$LT" room-fanout --rooms "$ROOMS" --users $((ROOMS * ROOM_MEMBERS)) --rate "$rate" \
            --hatch-rate 2000 --run-time "$RUN_TIME" --frames-per-write "$FPW" "${LT_AUTH[@]}" \
            --node "ws://127.0.0.1:$a" --node "ws://127.0.0.1:$b" \
            --server-pid "$apid" --server-pid "$bpid" --server-pid "$RPID" \
            --json >"$dir/report.json" 2>"$dir/report.err" || rc=$?
        stop_pids "$apid" "$bpid" "$RPID"
        forget_pids "$apid" "$bpid" "$RPID"
        OUT=$saved_out
        row=$(jq -r --arg bin "$k" --arg rate "$rate" '
            [$bin, $rate, (.messages.delivered_per_sec | round),
             (.messages.latency_us.p50 / 1000), (.messages.latency_us.p99 / 1000), (.messages.latency_us.p999 / 1000),
             ((.servers[0].cpu_us_per_delivery + .servers[1].cpu_us_per_delivery) * 100 | round / 100),
             .servers[2].cpu_us_per_delivery] | @tsv' "$dir/report.json" 2>/dev/null) \
            || { echo "knee: $bin at $rate: no report (rc $rc): $(tail -n 2 "$dir/report.err")" >&2; DONE[$k]=1; continue; }
        printf '%s\n' "$row" >>"$OUT/knee.tsv"
        awk -F'\t' -v name="$(basename "$bin")" -v rc="$rc" '{
            printf "%-40s %5d room msg/s: %8d deliveries/s  p50 %7.2f  p99 %8.2f  p99.9 %8.2f ms  node %5.2f  redis %5.2f µs/delivery%s\n",
                name, $2, $3, $4, $5, $6, $7, $8, (rc == 0 ? "" : "  (rc " rc ")") }' <<<"$row"
        p99=$(cut -f5 <<<"$row")
        if [ "$rc" = 0 ] && awk -v p="$p99" -v lim="$P99_MS" 'BEGIN { exit !(p <= lim) }'; then
            HELD[$k]=$rate MISSES[$k]=0
        else
            # One run's p99 is noisy on a small VM: a binary stops after two misses in a row.
            MISSES[$k]=$(( ${MISSES[$k]:-0} + 1 ))
            [ "${MISSES[$k]}" -lt 2 ] || DONE[$k]=1
        fi
    done
done
echo "knee: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
for k in "${!BINS[@]}"; do
    echo "knee: $(basename "${BINS[$k]}"): highest rate with p99 <= $P99_MS ms: ${HELD[$k]:-none of $RATES} room msg/s" \
        | tee -a "$OUT/summary.txt"
done
