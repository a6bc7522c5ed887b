#!/usr/bin/env bash
# One-command benchmark of wsbus: builds release binaries, starts its own
# redis-server and two nodes on free ports, runs the load-test scenarios with
# fixed parameters, samples CPU/RSS of the nodes and of Redis around each
# scenario, writes the raw JSON reports and one HTML report per scenario to
# <target>/bench/<timestamp>/ (with index.html linking them above the summary
# table) and prints the summary table. Stops everything it started on exit or
# Ctrl-C. Exits 1 when any scenario failed, 2 when it could not run at all.
#
# Environment knobs (defaults in brackets):
#   PEER [wsbus]        what the nodes are: wsbus, or pubsub (the pub/sub reference node in
#                       loadtest/pubsub-ref/, Node.js; one Redis; no dm-multi, history or
#                       drops runs, and room runs without the XADD count check)
#   FPW [1]             --frames-per-write of every dm-* and room-* run (1: one frame per
#                       write, as browsers send); the *-fpw64 runs write up to 64 at once
#   JWT_SECRET          start the nodes with --jwt-secret (not --insecure) and have the load
#                       tester mint a token per user with it (at least 32 bytes)
#   RUN_TIME [10]       seconds of measuring per scenario
#   USERS [400]         users of the dm-* and small idle scenarios
#   RATE [2000]         open-loop total msg/s
#   IN_FLIGHT [8]       closed-loop messages in flight per user
#   BIG_IDLE [20000]    connections of the large idle scenario (0 = skip); lowered (and
#                       said so) to what the open-file limit allows;
#                       100k: BIG_IDLE=100000 IDLE_HATCH=5000 loadtest/bench.sh (needs root
#                       or a hard open-file limit >= 101000)
#   IDLE_HATCH [5000]   connect rate of the large idle scenario
#   CHURN_RATE [200]    churn cycles/s
#   ROOMS [20]          room-fanout-open and room-churn: rooms ...
#   ROOM_MEMBERS [200]  ... of this many members each, spread over both nodes
#   ROOM_RATE [1000]    room messages/s in total (open loop, room-churn too)
#   ROOM_CLOSED_ROOMS [1]  room-fanout-closed: rooms of ROOM_MEMBERS members
#   ROOM_IN_FLIGHT [2]  room-fanout-closed: room messages in flight per member (done when every
#                       other member has it; keep (ROOM_MEMBERS - 1) x this under --session-queue)
#   ROOM_JOIN_RATE [100]  room-churn: join/leave cycles/s ...
#   ROOM_CHURNERS [50]  ... by this many extra users
#   SKIP_BUILD          set to skip `cargo build --release --workspace`
#   WSBUS_BIN, LOADTEST_BIN  override the binaries [<target>/release/...]
#   OUT                 results dir [<target>/bench/<timestamp>]
# <target> is cargo's target directory (CARGO_TARGET_DIR, or as `cargo metadata` says).
#   CLUSTER             set to run against a 3-shard Redis Cluster instead of one Redis
#   NODE_THREADS        Tokio worker threads of each node (TOKIO_WORKER_THREADS) [one per CPU]
#   ONLY                space-separated names of what to run, as in the summary (sched-noise,
#                       idle-400, dm-cross-open, dm-cross-closed, dm-cross-closed-fpw64,
#                       dm-local-open, dm-local-closed, dm-local-closed-fpw64, idle-20000,
#                       churn, dm-multi-open, dm-multi-closed, room-fanout-open,
#                       room-fanout-closed, room-churn); default: all
#   REPEAT [1]          run each chosen scenario this many times (name-1, name-2, ...)
#   SLOW_US             dm-*: list messages slower than this (µs) in their JSON report
#   HISTORY [1000]      --history of the nodes in the history runs below (messages kept per stream)
#   DROPS_USERS [300]   drops: users over three history nodes (a third on the cut path) ...
#   DROPS_RATE [2000]   ... sending this many messages/s in total (direct and room in turn) ...
#   DROPS_ROOMS [10]    ... into this many rooms (100 room messages/s each: a client away for
#                       the 5 s node TTL misses ~500, under the nodes' --recover-max) ...
#   DROPS_RUN_TIME [30] ... for this long, cut 2 s every 10 s, the third node killed (SIGKILL)
#                       at 40 % and restarted DROPS_DOWN_FOR [3] s later (under the nodes'
#                       5 s node TTL: the node comes back before anyone saw it dead)
#   RECOVER_MAX         --recover-max of the history nodes [the node's default, 1000]
#   FILL_MSGS [100]     history-memory: messages per user stored by a dm-cross open-loop fill of
#                       USERS users (Redis used_memory before/after, XLEN and MEMORY USAGE)
# History names for ONLY: drops, ab-history-off, ab-history-on (dm-cross closed loop on nodes
# restarted without / with --history, back to back: msg/s and Redis CPU per message),
# history-memory. They run last, each on nodes restarted for it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUN_TIME=${RUN_TIME:-10}
USERS=${USERS:-400}
RATE=${RATE:-2000}
IN_FLIGHT=${IN_FLIGHT:-8}
BIG_IDLE=${BIG_IDLE:-20000}
IDLE_HATCH=${IDLE_HATCH:-5000}
CHURN_RATE=${CHURN_RATE:-200}
ROOMS=${ROOMS:-20}
ROOM_MEMBERS=${ROOM_MEMBERS:-200}
ROOM_RATE=${ROOM_RATE:-1000}
ROOM_CLOSED_ROOMS=${ROOM_CLOSED_ROOMS:-1}
ROOM_IN_FLIGHT=${ROOM_IN_FLIGHT:-2}
ROOM_JOIN_RATE=${ROOM_JOIN_RATE:-100}
ROOM_CHURNERS=${ROOM_CHURNERS:-50}
HISTORY=${HISTORY:-1000}
DROPS_USERS=${DROPS_USERS:-300}
DROPS_RATE=${DROPS_RATE:-2000}
DROPS_ROOMS=${DROPS_ROOMS:-10}
DROPS_RUN_TIME=${DROPS_RUN_TIME:-30}
FILL_MSGS=${FILL_MSGS:-100}
DROPS_DOWN_FOR=${DROPS_DOWN_FOR:-3}
FPW=${FPW:-1}
PEER=${PEER:-wsbus}
case $PEER in
    wsbus) PEER_NAME=wsbus ;;
    pubsub) PEER_NAME="pub/sub reference" ;;
    *) echo "bench: PEER must be wsbus or pubsub" >&2; exit 2 ;;
esac
for tool in redis-server jq getconf timeout; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is required" >&2; exit 2; }
done
# Where cargo puts binaries: CARGO_TARGET_DIR, a config file, or <workspace>/target.
TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)}
OUT=${OUT:-$TARGET/bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --workspace
fi
WSBUS=${WSBUS_BIN:-$TARGET/release/wsbus}
LT=${LOADTEST_BIN:-$TARGET/release/wsbus-loadtest}
[ "$PEER" = pubsub ] || [ -x "$WSBUS" ] || { echo "bench: $WSBUS missing" >&2; exit 2; }
[ -x "$LT" ] || { echo "bench: $LT missing" >&2; exit 2; }

# Open files for the nodes and the load tester (raising the hard limit needs root). Node a
# and the load tester each hold one socket per idle connection, plus the dm users, Redis
# connections, listeners and libraries: keep 1,000 spare. What the limit cannot hold, the
# large idle run does not try (idle-connections fits RSS against sockets, so a smaller run
# still gives the memory per connection).
BIG_ASKED=$BIG_IDLE
big_wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" idle-$BIG_ASKED "* ]]; }
room_users=$((ROOMS * ROOM_MEMBERS + ROOM_CHURNERS))
need=$((BIG_IDLE + (USERS > room_users ? USERS : room_users) + 1000))
if big_wanted && [ "$BIG_IDLE" -gt 0 ] && [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need" ]; then
    ulimit -Hn "$need" 2>/dev/null || true
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if big_wanted && [ "$BIG_IDLE" -gt 0 ] && [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
    fit=$(( ($(ulimit -n) - USERS - 1000) / 1000 * 1000 ))
    if [ "$fit" -lt 1000 ]; then
        echo "bench: open-file limit $(ulimit -n) leaves no room for a large idle run; skipping it" >&2
        BIG_IDLE=0
    else
        echo "bench: open-file limit $(ulimit -n) (hard $(ulimit -Hn)) holds $fit idle connections, not $BIG_IDLE: running idle-$fit (raise the hard limit as root for more)" >&2
        BIG_IDLE=$fit
        [ -z "${ONLY:-}" ] || ONLY="$ONLY idle-$fit"
    fi
fi

LIB_NAME=bench
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"
# drops' third node runs from a script (the scenario kills and restarts it).
LIB_AT_EXIT='[ ! -f "$TMP/node-c.pid" ] || PIDS+=("$(cat "$TMP/node-c.pid")")'
lib_scope

[ "$PEER" != pubsub ] || pubsub_ready
start_redis
serve_args
free_port; APORT=$FREE_PORT
start_node bench-a "$APORT"
APID=$NODE_PID
free_port; BPORT=$FREE_PORT
start_node bench-b "$BPORT"
BPID=$NODE_PID
NODES=(--node "ws://127.0.0.1:$APORT" --node "ws://127.0.0.1:$BPORT")
echo "bench: redis :$RPORT (pid $RPID), $PEER_NAME bench-a :$APORT (pid $APID), bench-b :$BPORT (pid $BPID); results in $OUT"

SUMMARY=$OUT/summary.tsv
FAILED=()
printf 'scenario\trc\trate/s\tp50_us\tp99_us\tp999_us\tnode_cpu_us_per_msg\tredis_cpu_us_per_msg\tnode_a_rss_kib\tnode_b_rss_kib\tredis_rss_kib\tkib_per_conn\n' >"$SUMMARY"

# What the pub/sub reference cannot run: several sessions per user, history.
PEER_SKIPS=" dm-multi-open dm-multi-closed drops ab-history-off ab-history-on history-memory "
wanted() {
    if [ "$PEER" = pubsub ] && [[ $PEER_SKIPS == *" $1 "* ]]; then return 1; fi
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]
}
run() { # name scenario args...
    local name=$1 i; shift
    wanted "$name" || return 0
    if [ "${REPEAT:-1}" -gt 1 ]; then
        for i in $(seq "$REPEAT"); do run_once "$name-$i" "$@"; done
    else
        run_once "$name" "$@"
    fi
}
run_once() { # name scenario args...
    local name=$1; shift
    local a0 b0 r0 a1 b1 r1 rc=0
    # Redis's per-command counts of this scenario alone (batch sizes: messages per XREAD).
    for p in "${REDIS_PORTS[@]}"; do redis-cli -p "$p" CONFIG RESETSTAT >/dev/null; done
    a0=$(cpu_ticks "$APID"); b0=$(cpu_ticks "$BPID"); r0=$(redis_ticks)
    echo "bench: running $name: wsbus-loadtest $*" >&2
    local extra=()
    if [ -n "${SLOW_US:-}" ] && [[ $1 == dm-* ]]; then extra=(--slow-us "$SLOW_US"); fi
    if [[ $1 == dm-* || $1 == room-* ]]; then
        [[ " $* " == *" --frames-per-write "* ]] || extra+=(--frames-per-write "$FPW")
        # The nodes' CPU and RSS over the sending phase, in the scenario's own report.
        extra+=(--server-pid "$APID" --server-pid "$BPID")
    fi
    timeout 900 "$LT" "$@" "${extra[@]}" "${LT_AUTH[@]}" "${NODES[@]}" --json --report-file "$OUT/$name.html" \
        >"$OUT/$name.json" 2>"$OUT/$name.err" || rc=$?
    a1=$(cpu_ticks "$APID"); b1=$(cpu_ticks "$BPID"); r1=$(redis_ticks)
    for p in "${REDIS_PORTS[@]}"; do
        redis-cli -p "$p" INFO commandstats | tr -d '\r' | grep '^cmdstat_' >>"$OUT/$name.redis-commandstats"
    done
    if ! jq -e . "$OUT/$name.json" >/dev/null 2>&1; then
        echo "bench: $name produced no report (rc $rc): $(tail -n 3 "$OUT/$name.err")" >&2
        printf '%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\n' "$name" "$rc" >>"$SUMMARY"
        FAILED+=("$name")
        return
    fi
    jq -r --arg name "$name" --argjson rc "$rc" --argjson tck "$TCK" \
        --argjson node $(( (a1 - a0) + (b1 - b0) )) --argjson redis $(( r1 - r0 )) \
        --argjson arss "$(rss_kib "$APID")" --argjson brss "$(rss_kib "$BPID")" --argjson rrss "$(rss_kib "$RPID")" '
        def us(t; n): if n > 0 then (t / $tck * 1e6 / n * 10 | round / 10) else "-" end;
        (if .churn then .churn.completed elif .messages then .messages.delivered else .connect.connected end) as $n
        | (if .churn then .churn.sessions_per_sec elif .messages then .messages.delivered_per_sec else .connect.per_sec end) as $rate
        | (if .churn then .churn.cycle_latency_us elif .messages then .messages.latency_us else .connect.latency_us end) as $lat
        | [$name, $rc, ($rate | round), $lat.p50, $lat.p99, $lat.p999, us($node; $n), us($redis; $n),
           $arss, $brss, $rrss,
           (if (.memory | length) > 0 then ((.memory | map(.rss_after_kib - .rss_before_kib) | add) / ([.connect.connected, 1] | max) * 100 | round / 100) else "-" end)]
        | @tsv' "$OUT/$name.json" >>"$SUMMARY"
    if [ "$rc" != 0 ]; then
        echo "bench: $name FAILED (rc $rc): $(jq -r '.problems | join("; ")' "$OUT/$name.json")" >&2
        FAILED+=("$name")
    fi
}

html_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g'; }
# index.html: the summary table, each scenario's name linking to its own report.
write_index() {
    {
        printf '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>wsbus bench %s</title>\n' "$(basename "$OUT")"
        printf '<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}td{text-align:right}td:first-child{text-align:left}.failed{color:#b00020}</style></head><body>\n'
        printf '<h1>wsbus bench, %s</h1>\n<p>%s; %s CPUs, %s MiB; Redis %s%s. Nodes (%s): %s.</p>\n' \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(uname -srm | html_escape)" "$(getconf _NPROCESSORS_ONLN)" \
            "$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)" "$(redis-server --version | awk '{print $3}' | sed 's/v=//')" \
            "${CLUSTER:+ (3-shard cluster)}" "$PEER_NAME" "$(printf '%s ' "${NODES[@]}" | sed 's/--node //g' | html_escape)"
        [ -z "$NOISE" ] || printf '<p><a href="sched-noise.html">sched-noise</a>: %s</p>\n' "$(printf '%s' "$NOISE" | html_escape)"
        if [ "${#FAILED[@]}" -gt 0 ]; then
            printf '<p class="failed">FAILED: %s</p>\n' "${FAILED[*]}"
        fi
        printf '<p>rate/s: delivered msg/s (dm), sessions/s (churn), connections/s (idle); latency in µs (dm: send→receive, churn: whole cycle, idle: connect); CPU per delivered message, session or connection.</p>\n<table>\n'
        local first=1 line name
        while IFS= read -r line; do
            if [ "$first" = 1 ]; then
                printf '<tr><th>%s</th></tr>\n' "$(printf '%s' "$line" | html_escape | sed 's#\t#</th><th>#g')"
                first=0
                continue
            fi
            name=${line%%$'\t'*}
            line=$(printf '%s' "$line" | html_escape | sed 's#\t#</td><td>#g')
            if [ -f "$OUT/$name.html" ]; then
                line="<a href=\"$name.html\">$name</a>${line#"$name"}"
            fi
            printf '<tr><td>%s</td></tr>\n' "$line"
        done <"$SUMMARY"
        printf '</table>\n'
        for f in "$OUT"/idle-*.json; do
            [ -f "$f" ] || continue
            jq -r --arg f "$(basename "$f" .json)" '.memory_fit // empty | "<p>\($f): RSS ≈ \(.base_kib) KiB + \(.kib_per_conn) KiB × connections (r² \(.r2), \(.samples) samples up to \(.max_connections)); at 100,000 connections: \(.at_100k_mib) MiB</p>"' "$f"
        done
        printf '<p>Raw reports (JSON, Redis commandstats, logs) are next to this page.</p></body></html>\n'
    } >"$OUT/index.html"
}

redis_cli() { redis-cli -c -p "$RPORT" "$@"; }

# Soak mode (SOAK_SECONDS set, see loadtest/soak.sh): dm-cross open loop for a long time,
# sampling memory, inbox lengths and key counts every SOAK_EVERY seconds, then checking that
# no per-user key outlives the users.
if [ -n "${SOAK_SECONDS:-}" ]; then
    SOAK_RATE=${SOAK_RATE:-70000}
    SOAK_EVERY=${SOAK_EVERY:-10}
    echo "soak: dm-cross open loop, $USERS users, $SOAK_RATE msg/s for $SOAK_SECONDS s" >&2
    timeout $((SOAK_SECONDS + 300)) "$LT" dm-cross --users "$USERS" --rate "$SOAK_RATE" \
        --run-time "$SOAK_SECONDS" "${LT_AUTH[@]}" "${NODES[@]}" --json >"$OUT/soak.json" 2>"$OUT/soak.err" &
    LTPID=$!
    T=$OUT/soak.tsv
    printf 't_s\tnode_a_rss_kib\tnode_b_rss_kib\tredis_rss_kib\tredis_used_kib\tinbox_a\tinbox_b\tkeys\n' >"$T"
    start=$SECONDS
    while kill -0 "$LTPID" 2>/dev/null; do
        used=$(redis_cli INFO memory | awk -F: '/^used_memory:/ {print int($2 / 1024)}')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' $((SECONDS - start)) "$(rss_kib "$APID")" "$(rss_kib "$BPID")" \
            "$(rss_kib "$RPID")" "$used" "$(redis_cli XLEN wsbus:inbox:bench-a)" \
            "$(redis_cli XLEN wsbus:inbox:bench-b)" "$(redis_cli DBSIZE)" >>"$T"
        sleep "$SOAK_EVERY"
    done
    rc=0; wait "$LTPID" || rc=$?
    # Users have disconnected: only the nodes' own keys may remain.
    users_left=$(redis_cli --scan --pattern 'wsbus:{u:*}:sessions' | wc -l)
    column -t -s $'\t' "$T"
    jq -r '"soak: sent \(.messages.sent), delivered \(.messages.delivered) (\(.messages.delivered_per_sec | round)/s), lost \(.messages.lost), dup \(.messages.duplicated), reordered \(.messages.out_of_order), p50 \(.messages.latency_us.p50) us, p99 \(.messages.latency_us.p99) us, p99.9 \(.messages.latency_us.p999) us"' "$OUT/soak.json" 2>/dev/null \
        || echo "soak: no report (rc $rc): $(tail -n 3 "$OUT/soak.err")"
    echo "soak: keys left after the users left: $(redis_cli DBSIZE) (user keys: $users_left); rc $rc; results: $OUT"
    [ "$rc" = 0 ] && [ "$users_left" = 0 ]
    exit
fi

# The machine's own noise first, with the servers idle: how late a thread that slept 100 µs
# wakes up. Stalls of milliseconds here bound the latency tail of every scenario below.
NOISE=""
if wanted sched-noise; then
    if "$LT" sched-noise --run-time 5 --json --report-file "$OUT/sched-noise.html" \
        >"$OUT/sched-noise.json" 2>"$OUT/sched-noise.err"; then
        NOISE=$(jq -r '.noise | "machine noise (idle, \(.threads) threads, 5 s): wake-ups late by > 1 ms: \(.over_1ms_per_sec)/s, > 3 ms: \(.over_3ms); lateness p99.9 \(.late_us.p999) µs, max \(.late_us.max) µs"' "$OUT/sched-noise.json")
        echo "bench: $NOISE" >&2
    fi
fi

# Idle memory first, on fresh nodes: later scenarios leave allocator pages behind.
run "idle-$USERS" idle-connections --users "$USERS" --run-time 3 --server-pid "$APID" --server-pid "$BPID"
run dm-cross-open dm-cross --users "$USERS" --rate "$RATE" --run-time "$RUN_TIME"
run dm-cross-closed dm-cross --users "$USERS" --in-flight "$IN_FLIGHT" --run-time "$RUN_TIME"
# What a generator that coalesces gets (this tool before --frames-per-write): up to 64 frames
# per write (closed loop: up to IN_FLIGHT, what a user has due at once).
run dm-cross-closed-fpw64 dm-cross --users "$USERS" --in-flight "$IN_FLIGHT" --run-time "$RUN_TIME" \
    --frames-per-write 64
run dm-local-open dm-local --users "$USERS" --rate "$RATE" --run-time "$RUN_TIME"
run dm-local-closed dm-local --users "$USERS" --in-flight "$IN_FLIGHT" --run-time "$RUN_TIME"
run dm-local-closed-fpw64 dm-local --users "$USERS" --in-flight "$IN_FLIGHT" --run-time "$RUN_TIME" \
    --frames-per-write 64
if [ "$BIG_IDLE" -gt 0 ]; then
    run "idle-$BIG_IDLE" idle-connections --users "$BIG_IDLE" --hatch-rate "$IDLE_HATCH" --run-time 5 \
        --server-pid "$APID" --server-pid "$BPID"
fi
run churn churn --users 20 --rate "$CHURN_RATE" --run-time "$RUN_TIME"
# Rooms: each reads Redis's commandstats around its own sending phase (XADD per room message).
# (Not with the pub/sub reference: it makes no XADD, and room-fanout would fail on that.)
ROOM_REDIS=()
if [ "$PEER" != pubsub ]; then
    for p in "${REDIS_PORTS[@]}"; do ROOM_REDIS+=(--redis "127.0.0.1:$p"); done
fi
run room-fanout-open room-fanout --rooms "$ROOMS" --users $((ROOMS * ROOM_MEMBERS)) \
    --rate "$ROOM_RATE" --run-time "$RUN_TIME" --hatch-rate 2000 "${ROOM_REDIS[@]}"
run room-fanout-closed room-fanout --rooms "$ROOM_CLOSED_ROOMS" \
    --users $((ROOM_CLOSED_ROOMS * ROOM_MEMBERS)) --in-flight "$ROOM_IN_FLIGHT" \
    --run-time "$RUN_TIME" "${ROOM_REDIS[@]}"
run room-churn room-churn --rooms "$ROOMS" --users $((ROOMS * ROOM_MEMBERS)) --rate "$ROOM_RATE" \
    --join-rate "$ROOM_JOIN_RATE" --churners "$ROOM_CHURNERS" --run-time "$RUN_TIME" \
    --hatch-rate 2000 "${ROOM_REDIS[@]}"

# dm-multi holds two sessions per user. Allowing that also turns the bus writer's route cache
# off, so the nodes restart with it for these runs alone, after everything else.
# Restarts nodes a and b with SERVE_ARGS and the extra arguments given.
restart_nodes() {
    stop_pids "$APID" "$BPID"
    forget_pids "$APID" "$BPID"
    start_node bench-a "$APORT" "$@"
    APID=$NODE_PID
    start_node bench-b "$BPORT" "$@"
    BPID=$NODE_PID
    echo "bench: nodes restarted with: ${*:-(defaults)} (pids $APID, $BPID)" >&2
}
if wanted dm-multi-open || wanted dm-multi-closed; then
    restart_nodes --max-sessions-per-user 2
fi
run dm-multi-open dm-multi --users "$USERS" --rate "$RATE" --run-time "$RUN_TIME"
run dm-multi-closed dm-multi --users "$USERS" --in-flight "$IN_FLIGHT" --run-time "$RUN_TIME"

# History. drops: three history nodes; the third runs from a script with a pid file, so that
# the scenario can kill it (SIGKILL, a crash) and start it again mid-run.
if wanted drops; then
    HISTORY_ARGS=(--history "$HISTORY")
    [ -z "${RECOVER_MAX:-}" ] || HISTORY_ARGS+=(--recover-max "$RECOVER_MAX")
    restart_nodes "${HISTORY_ARGS[@]}"
    free_port; CPORT=$FREE_PORT
    {
        printf '#!/usr/bin/env bash\n'
        printf 'case $1 in\n'
        printf '  start) env %s %q serve --bind 127.0.0.1:%s --node-id bench-c' "${NODE_ENV[*]:-}" "$WSBUS" "$CPORT"
        printf ' %q' "${SERVE_ARGS[@]}" "${HISTORY_ARGS[@]}"
        printf ' >>%q 2>&1 &\n    echo $! >%q ;;\n' "$OUT/bench-c.log" "$TMP/node-c.pid"
        printf '  kill) kill -9 "$(cat %q)" ;;\n' "$TMP/node-c.pid"
        printf 'esac\n'
    } >"$TMP/node-c.sh"
    chmod +x "$TMP/node-c.sh"
    "$TMP/node-c.sh" start
    wait_port "$CPORT" "$(cat "$TMP/node-c.pid")" bench-c
    run drops drops --node "ws://127.0.0.1:$CPORT" --kill-node 0 --users "$DROPS_USERS" \
        --rate "$DROPS_RATE" --rooms "$DROPS_ROOMS" --run-time "$DROPS_RUN_TIME" --grace 15 \
        --down-for "$DROPS_DOWN_FOR" --kill-cmd "$TMP/node-c.sh kill" --restart-cmd "$TMP/node-c.sh start"
    "$TMP/node-c.sh" kill 2>/dev/null || true
fi
# The cost of history: the same closed loop on nodes without, then with --history.
if wanted ab-history-off; then
    restart_nodes
    run ab-history-off dm-cross --users "$USERS" --in-flight "$IN_FLIGHT" --run-time "$RUN_TIME"
fi
if wanted ab-history-on; then
    restart_nodes --history "$HISTORY"
    run ab-history-on dm-cross --users "$USERS" --in-flight "$IN_FLIGHT" --run-time "$RUN_TIME"
fi
# Redis memory of stored history: used_memory before and after an open-loop fill of USERS
# users with FILL_MSGS messages each (the inbox streams are trimmed as delivered; the history
# streams stay for --history-ttl), against the messages the history streams hold (XLEN).
MEMORY_LINE=""
if wanted history-memory; then
    restart_nodes --history "$HISTORY"
    sleep 1
    used() { redis_cli INFO memory | tr -d '\r' | awk -F: '/^used_memory:/ {print $2}'; }
    used0=$(used)
    # Once whatever REPEAT says: the memory is read around this one fill.
    run_once history-memory dm-cross --users "$USERS" --rate $((USERS * FILL_MSGS / RUN_TIME)) --run-time "$RUN_TIME"
    sleep 2
    used1=$(used)
    prefix=$(jq -r '.run_prefix // empty' "$OUT/history-memory.json" 2>/dev/null || true)
    if [ -n "$prefix" ]; then
        streams=0; stored=0; sample_bytes=0; sample_len=0
        while IFS= read -r key; do
            len=$(redis_cli XLEN "$key")
            streams=$((streams + 1)); stored=$((stored + len))
            if [ "$streams" -le 20 ]; then
                sample_bytes=$((sample_bytes + $(redis_cli MEMORY USAGE "$key" SAMPLES 0)))
                sample_len=$((sample_len + len))
            fi
        done < <(redis_cli --scan --pattern "wsbus:{u:$prefix-*}:history")
        if [ "$stored" -gt 0 ]; then
            MEMORY_LINE=$(awk -v d=$((used1 - used0)) -v s="$stored" -v n="$streams" -v sb="$sample_bytes" -v sl="$sample_len" 'BEGIN {
                printf "history-memory: %d user streams hold %d messages (%.1f per user); Redis used_memory +%.1f MiB: %.0f bytes per stored message, %.0f bytes per user; MEMORY USAGE of 20 streams: %.0f bytes per message", n, s, s / n, d / 1048576, d / s, d / n, sb / sl }')
            echo "$MEMORY_LINE" | tee "$OUT/history-memory.txt" >&2
        fi
    fi
fi

echo
echo "rate/s = delivered msg/s (dm; room-*: deliveries, one per message and receiver), sessions/s"
echo "(churn), connections/s (idle); latency in µs (dm, room-*: send->receive; churn: full cycle;"
echo "idle: connect). CPU per delivered message (room-*: per delivery),"
echo "per completed session (churn) or per connection (idle), over the whole scenario run."
echo "Nodes: $PEER_NAME. dm-* and room-* write $FPW frame(s) per write; *-fpw64: up to 64."
column -t -s $'\t' "$SUMMARY"
[ -z "$NOISE" ] || echo "$NOISE"
for f in "$OUT"/idle-*.json; do
    [ -f "$f" ] || continue
    jq -r --arg f "$(basename "$f" .json)" '.memory_fit // empty | "\($f): RSS ≈ \(.base_kib) KiB + \(.kib_per_conn) KiB × connections (r² \(.r2), \(.samples) samples up to \(.max_connections)); at 100,000 connections: \(.at_100k_mib) MiB"' "$f"
done
for f in "$OUT"/room-*.json; do
    [ -f "$f" ] || continue
    jq -r --arg f "$(basename "$f" .json)" '.rooms // empty | "\($f): \(.room_messages) room messages into \(.rooms) rooms of \(.members_per_room) (\(.room_messages_per_sec | round)/s)"
        + (if .redis then "; Redis per room message: XADD \(.redis.xadd_per_room_message * 1000 | round / 1000) (at most \(.redis.xadd_expected)), SMEMBERS \(.redis.per_room_message.smembers // 0 | . * 1000 | round / 1000)" else "" end)
        + (if .churn then "; churn: \(.churn.completed) join/leave cycles, \(.churn.after_left) messages after left, \(.churn.stale) stale" else "" end)' "$f"
done
# dm-multi's summary rows count deliveries (three per message); per message written:
for f in "$OUT"/dm-multi-*.json; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .json)
    msgs=$(jq -r '.fanout.messages // 0' "$f")
    [ "$msgs" -gt 0 ] && [ -f "$OUT/$name.redis-commandstats" ] || continue
    awk -F'[:=,]' -v n="$msgs" -v name="$name" '
        { calls[$1] += $3; total += $3 }
        END { printf "%s: %d messages; Redis commands per message: XADD %.3f, HKEYS %.3f, all %.3f\n",
              name, n, calls["cmdstat_xadd"] / n, calls["cmdstat_hkeys"] / n, total / n }' \
        "$OUT/$name.redis-commandstats"
done
# The A/B, averaged over REPEAT runs (ab-history-off, or ab-history-off-1, -2, ...).
awk -F'\t' '$1 ~ /^ab-history-off(-[0-9]+)?$/ && $8 != "-" { r0 += $3; c0 += $8; n0++ }
    $1 ~ /^ab-history-on(-[0-9]+)?$/ && $8 != "-" { r1 += $3; c1 += $8; n1++ }
    END { if (n0 > 0 && n1 > 0) printf "history cost (dm-cross closed loop, %d+%d runs): %.0f msg/s off, %.0f msg/s on (%.2fx); Redis CPU %.2f us/msg off, %.2f us/msg on (%.2fx)\n", n0, n1, r0 / n0, r1 / n1, (r1 / n1) / (r0 / n0), c0 / n0, c1 / n1, (c1 / n1) / (c0 / n0) }' \
    "$SUMMARY" | tee "$OUT/history-cost.txt"
[ -z "$MEMORY_LINE" ] || echo "$MEMORY_LINE"
if [ -f "$OUT/drops.json" ]; then
    jq -r '"drops: sent \(.messages.sent) deliveries (\(.drops.sent_direct) direct, \(.drops.sent_room) room messages), delivered \(.messages.delivered), lost \(.messages.lost) (\(.drops.lost_absent) to clients never back, \(.drops.lost_silent) silently, \(.drops.lost_announced) after recovered:false), \(.drops.unsettled) clients never back, duplicated \(.messages.duplicated), out of order \(.messages.out_of_order); in doubt \(.drops.in_doubt); \(.drops.cuts) cuts, \(.drops.reconnects) reconnects, recovered \(.drops.recovered) / not \(.drops.not_recovered), re-joins \(.drops.rejoined) / not \(.drops.rejoin_not_recovered); replayed \(.drops.replayed): send→recv p50 \(.drops.replay_latency_us.p50) p99 \(.drops.replay_latency_us.p99) max \(.drops.replay_latency_us.max) us, reconnect→recv p99 \(.drops.replay_after_reconnect_us.p99) us"' "$OUT/drops.json"
fi
write_index
echo "results: $OUT (open $OUT/index.html)"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "bench: FAILED: ${FAILED[*]}" >&2
    exit 1
fi
