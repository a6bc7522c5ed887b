#!/usr/bin/env bash
# Per-message counts of one wsbus node that depend little on how busy the machine is:
# loadtest/percount.sh TOOL [WSBUS_BINARY]
#
# Starts a redis-server and two nodes on free ports (node a watched by TOOL, node b plain) and
# runs dm-cross open loop twice, at LOW_RATE and HIGH_RATE msg/s for RUN_TIME s each, on fresh
# processes, with FPW frames per write. Every figure is for both nodes per message (twice node
# a's: in dm-cross each node sends half the messages and delivers the other half), as ab.sh
# reports node CPU.
#
# TOOL, and how it counts:
#   callgrind  instructions, and calls to jemalloc's allocation entry points (valgrind runs
#              the node ~50x slower: low rates). Node a runs under the tool for the whole run;
#              what it spent on starting, connecting and idling is the same in both runs, so
#              `/msg added` (the difference in counts over the difference in messages) is the
#              cost of a message.
#   heaptrack  calls to allocation functions, as callgrind (glibc malloc only: a jemalloc
#              build's allocations are invisible to it; count them with callgrind).
#   perf       context switches, CPU migrations, page faults and task clock (ms): perf stat's
#              software events (no hardware counters needed), PER_THREAD=1 for each thread.
#   strace     syscalls by name (strace -c on every thread; it slows the node, so at high
#              rates it batches more than it would).
#   record     where the CPU time goes: perf record -e cpu-clock, perf report by symbol.
#   perf, strace and record watch node a over a window of steady sending (from 3 s into the
#   run to 2 s before its end) and count the messages of that window: `/msg low` and
#   `/msg high` are the figures at each rate.
#
# Environment knobs (defaults in brackets): LOW_RATE, HIGH_RATE [callgrind 100/300,
# heaptrack 1000/5000, else 2000/10000], USERS [40 for callgrind and heaptrack, else 400],
# RUN_TIME [10], FPW [1], NODE_THREADS (Tokio worker threads of both nodes), NODE_ARGS (extra
# `wsbus serve` flags), OUT [<target>/percount/<timestamp>-TOOL].
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TOOL=${1:-}
case $TOOL in
    callgrind | strace | perf | record | heaptrack) ;;
    *) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)}
WSBUS=${2:-$TARGET/release/wsbus}
LT=$TARGET/release/wsbus-loadtest
WINDOW= WARMUP=3
case $TOOL in
    callgrind) LOW_RATE=${LOW_RATE:-100} HIGH_RATE=${HIGH_RATE:-300} USERS=${USERS:-40} ;;
    heaptrack) LOW_RATE=${LOW_RATE:-1000} HIGH_RATE=${HIGH_RATE:-5000} USERS=${USERS:-40} ;;
    *) LOW_RATE=${LOW_RATE:-2000} HIGH_RATE=${HIGH_RATE:-10000} USERS=${USERS:-400} ;;
esac
RUN_TIME=${RUN_TIME:-10}
[ "$TOOL" = perf ] || [ "$TOOL" = strace ] || [ "$TOOL" = record ] && WINDOW=$((RUN_TIME - WARMUP - 2))
FPW=${FPW:-1}
read -r -a EXTRA <<<"${NODE_ARGS:-}"
OUT=${OUT:-$TARGET/percount/$(date +%Y%m%d-%H%M%S)-$TOOL}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LIB_NAME=percount
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"
lib_scope

# One run at RATE: node a's counters go to $OUT/RATE.*; prints the messages delivered (the
# whole run), or for perf and strace the messages delivered while they watched.
run_at() { # rate
    local rate=$1 a b apid bpid ltpid wrapper=() watch=() node_pid
    start_redis
    serve_args
    free_port; a=$FREE_PORT
    case $TOOL in
        callgrind) wrapper=(valgrind --tool=callgrind --callgrind-out-file="$OUT/$rate.callgrind") ;;
        heaptrack) wrapper=(heaptrack -o "$OUT/$rate.heaptrack") ;;
    esac
    env "${NODE_ENV[@]}" "${wrapper[@]}" "$WSBUS" serve --bind "127.0.0.1:$a" --node-id pc-a \
        "${SERVE_ARGS[@]}" "${EXTRA[@]}" >>"$OUT/$rate.a.log" 2>&1 &
    apid=$!; PIDS+=("$apid")
    wait_port "$a" "$apid" "$rate.a"
    free_port; b=$FREE_PORT
    WSBUS=$WSBUS start_node "$rate.b" "$b" "${EXTRA[@]}"; bpid=$NODE_PID
    timeout 300 "$LT" dm-cross --users "$USERS" --rate "$rate" --run-time "$RUN_TIME" \
        --frames-per-write "$FPW" "${LT_AUTH[@]}" --node "ws://127.0.0.1:$a" \
        --node "ws://127.0.0.1:$b" --json >"$OUT/$rate.json" 2>"$OUT/$rate.err" &
    ltpid=$!
    if [ -n "$WINDOW" ]; then
        # Every thread of node a, from WARMUP s into the run for WINDOW s.
        sleep "$WARMUP"
        case $TOOL in
            perf) watch=(perf stat ${PER_THREAD:+--per-thread} -e context-switches,cpu-migrations,page-faults,task-clock
                         -o "$OUT/$rate.perf" -p "$apid" -- sleep "$WINDOW") ;;
            record) watch=(perf record -e cpu-clock -F 4000 -o "$OUT/$rate.perf.data" -p "$apid"
                           -- sleep "$WINDOW") ;;
            strace) watch=(timeout -s INT "$WINDOW" strace -c -o "$OUT/$rate.strace"
                           $(printf -- '-p %s ' $(ls "/proc/$apid/task"))) ;;
        esac
        "${watch[@]}" >/dev/null 2>&1 || true
    fi
    wait "$ltpid" || echo "percount: load test at $rate msg/s exited $?" >&2
    # Valgrind and heaptrack write their summaries as the node exits: TERM to the node (the
    # wrapper's child, if it has one), and time to write.
    node_pid=$(pgrep -P "$apid" | head -n 1 || true)
    kill "${node_pid:-$apid}" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$apid" 2>/dev/null || break; sleep 0.1; done
    stop_pids "$apid" "$bpid" "$RPID"
    forget_pids "$apid" "$bpid" "$RPID"
    if [ -n "$WINDOW" ]; then
        jq -r --argjson w "$WINDOW" '.messages.delivered_per_sec * $w | round' "$OUT/$rate.json"
    else
        jq -r .messages.delivered "$OUT/$rate.json"
    fi
}

LOW_N=$(run_at "$LOW_RATE")
HIGH_N=$(run_at "$HIGH_RATE")
echo "percount: $TOOL, dm-cross open loop, $USERS users, $FPW frame(s) per write, $RUN_TIME s at $LOW_RATE and $HIGH_RATE msg/s: $LOW_N and $HIGH_N delivered; $WSBUS"

# name low high: the counts, per message at each rate (whole run, both nodes: twice node a's
# count over all messages delivered), and per message added (the difference, as above).
per_msg() {
    awk -v n="$1" -v lo="$2" -v hi="$3" -v ln="$LOW_N" -v hn="$HIGH_N" 'BEGIN {
        printf "%-22s %12.0f %12.0f %10.2f %10.2f %10.2f\n", n, lo, hi, 2 * lo / ln, 2 * hi / hn,
            2 * (hi - lo) / (hn - ln) }'
}
printf '%-22s %12s %12s %10s %10s %10s\n' counter "at $LOW_RATE/s" "at $HIGH_RATE/s" "/msg low" \
    "/msg high" "/msg added"
case $TOOL in
    callgrind)
        total() { awk '/^(summary|totals):/ { print $2; exit }' "$1"; }
        per_msg instructions "$(total "$OUT/$LOW_RATE.callgrind")" "$(total "$OUT/$HIGH_RATE.callgrind")" ;;
    strace)
        # Columns: % time, seconds, usecs/call, calls, [errors], syscall.
        calls() { awk '$NF != "total" && $4 ~ /^[0-9]+$/ { print $NF, $4 }' "$1"; }
        join -a1 -a2 -e0 -o 0,1.2,2.2 <(calls "$OUT/$LOW_RATE.strace" | sort) \
            <(calls "$OUT/$HIGH_RATE.strace" | sort) | sort -k3 -n -r \
            | while read -r name lo hi; do per_msg "$name" "$lo" "$hi"; done | awk '$5 >= 0.01'
        per_msg "all syscalls" "$(awk '$NF == "total" { print $4 }' "$OUT/$LOW_RATE.strace")" \
            "$(awk '$NF == "total" { print $4 }' "$OUT/$HIGH_RATE.strace")" ;;
    perf)
        for ev in context-switches cpu-migrations page-faults task-clock; do
            val() { awk -v ev="$ev" '$0 ~ ev { gsub(",", "", $1); print $1; exit }' "$1"; }
            per_msg "$ev" "$(val "$OUT/$LOW_RATE.perf")" "$(val "$OUT/$HIGH_RATE.perf")"
        done ;;
    record)
        for rate in "$LOW_RATE" "$HIGH_RATE"; do
            echo "-- at $rate msg/s: where node a's CPU time went (perf report, cpu-clock samples)"
            perf report -i "$OUT/$rate.perf.data" --no-children --sort dso,sym --percent-limit 0.7 \
                --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40
        done ;;
    heaptrack)
        allocs() { heaptrack_print "$(ls "$1".*)" 2>/dev/null | awk '/^calls to allocation functions:/ { print $5; exit }'; }
        per_msg "allocation calls" "$(allocs "$OUT/$LOW_RATE.heaptrack")" "$(allocs "$OUT/$HIGH_RATE.heaptrack")" ;;
esac
echo "percount: raw outputs in $OUT"
