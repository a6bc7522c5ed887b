#!/usr/bin/env bash
# A/B of wsbus revisions: loadtest/ab.sh BASE_REV [SCENARIO]
#
# Builds BASE_REV in a git worktree under the target directory (<target>/ab/src, one worktree
# checked out at each base in turn, with its own CARGO_TARGET_DIR <target>/ab/target; the
# base's wsbus binaries are kept as <target>/ab/bin/wsbus-<commit>) and the working tree as it
# is (uncommitted changes included), both with `cargo build --release --workspace`, then runs SCENARIO for ROUNDS rounds, interleaved
# base/new/base/new..., each run on a fresh redis-server and two fresh nodes on free ports, all
# driven by the working tree's load tester. Per run it reads the nodes' and Redis's CPU time
# (utime + stime from /proc/<pid>/stat) over the sending phase and drain (the load tester's
# --server-pid) and prints msg/s, node CPU µs per message (both nodes together), Redis CPU
# µs per message, and XADD calls and XADD µs per message over the whole run (Redis `INFO
# commandstats`, kept as commandstats.txt per run); then per side the mean and min–max
# spread, and new/base of the means, and Redis calls (and Redis's own µs) per message by
# command from the same commandstats. It
# stops everything it started on exit or Ctrl-C. Exits 1 when a run failed, 2 when it could
# not run.
#
# BASE_REV: any git revision, or `pubsub`: the base side is then the pub/sub reference node
# (loadtest/pubsub-ref/, Node.js) on the same Redis and generator, so new/base is wsbus
# against the pub/sub design.
#
# SCENARIO [dm-cross]: dm-cross (closed loop), dm-cross-open, dm-local, dm-local-open,
# room-fanout (closed loop), room-fanout-open. (`-closed` suffixes are accepted too.)
#
# Environment knobs (defaults in brackets):
#   ROUNDS [3]          runs per side
#   RUN_TIME [10]       seconds of measuring per run
#   FPW [1]             --frames-per-write (1: one frame per write, as browsers send; 64: coalesced)
#   USERS [400]  IN_FLIGHT [8]  RATE [2000]               dm-*
#   ROOMS [20]  ROOM_MEMBERS [200]  ROOM_RATE [1000]       room-fanout-open
#   ROOM_CLOSED_ROOMS [1]  ROOM_IN_FLIGHT [2]             room-fanout (closed loop; ROOM_MEMBERS each)
#   NODE_THREADS        Tokio worker threads of each wsbus node
#   BASE_NODE_ENV, NEW_NODE_ENV  environment of one side's nodes, `VAR=value` words (e.g.
#                       NEW_NODE_ENV="TOKIO_WORKER_THREADS=1" to compare runtime shapes)
#   NODE_ARGS           extra `wsbus serve` flags for both sides (e.g. "--history 100");
#   BASE_NODE_ARGS, NEW_NODE_ARGS  the same for one side (default: NODE_ARGS)
#   LT_ARGS             extra load-tester flags
#   JWT_SECRET          nodes check tokens (--jwt-secret) and the load tester mints them
#   SKIP_BUILD          use the working tree's release binaries as they are
#   OUT                 results dir [<target>/ab/runs/<timestamp>]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASE_REV=${1:-}
SCENARIO=${2:-dm-cross}
[ -n "$BASE_REV" ] || { sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
ROUNDS=${ROUNDS:-3}
RUN_TIME=${RUN_TIME:-10}
FPW=${FPW:-1}
USERS=${USERS:-400}
IN_FLIGHT=${IN_FLIGHT:-8}
RATE=${RATE:-2000}
ROOMS=${ROOMS:-20}
ROOM_MEMBERS=${ROOM_MEMBERS:-200}
ROOM_RATE=${ROOM_RATE:-1000}
ROOM_CLOSED_ROOMS=${ROOM_CLOSED_ROOMS:-1}
ROOM_IN_FLIGHT=${ROOM_IN_FLIGHT:-2}
read -r -a BASE_NODE_ARGS <<<"${BASE_NODE_ARGS:-${NODE_ARGS:-}}"
read -r -a NEW_NODE_ARGS <<<"${NEW_NODE_ARGS:-${NODE_ARGS:-}}"
read -r -a LT_EXTRA <<<"${LT_ARGS:-}"
read -r -a BASE_ENV <<<"${BASE_NODE_ENV:-}"
read -r -a NEW_ENV <<<"${NEW_NODE_ENV:-}"
for tool in redis-server jq getconf git; do
    command -v "$tool" >/dev/null || { echo "ab: $tool is required" >&2; exit 2; }
done

case ${SCENARIO%-closed} in
    dm-cross | dm-local)
        WHAT="${SCENARIO%-closed} closed loop, $USERS users x $IN_FLIGHT in flight"
        LT_RUN=("${SCENARIO%-closed}" --users "$USERS" --in-flight "$IN_FLIGHT") ;;
    dm-cross-open | dm-local-open)
        WHAT="${SCENARIO%-open} open loop, $USERS users, $RATE msg/s"
        LT_RUN=("${SCENARIO%-open}" --users "$USERS" --rate "$RATE") ;;
    room-fanout)
        WHAT="room-fanout closed loop, $ROOM_CLOSED_ROOMS room(s) of $ROOM_MEMBERS x $ROOM_IN_FLIGHT in flight (per delivery)"
        LT_RUN=(room-fanout --rooms "$ROOM_CLOSED_ROOMS" --users $((ROOM_CLOSED_ROOMS * ROOM_MEMBERS))
            --in-flight "$ROOM_IN_FLIGHT") ;;
    room-fanout-open)
        WHAT="room-fanout open loop, $ROOMS rooms of $ROOM_MEMBERS, $ROOM_RATE room msg/s (per delivery)"
        LT_RUN=(room-fanout --rooms "$ROOMS" --users $((ROOMS * ROOM_MEMBERS)) --rate "$ROOM_RATE"
            --hatch-rate 2000) ;;
    *) echo "ab: unknown scenario $SCENARIO (dm-cross, dm-cross-open, dm-local, dm-local-open, room-fanout, room-fanout-open)" >&2
       exit 2 ;;
esac
LT_RUN+=(--run-time "$RUN_TIME" --frames-per-write "$FPW")

TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)}
AB=$TARGET/ab
OUT=${OUT:-$AB/runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" "$AB/bin"
LIB_NAME=ab
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"
lib_scope

# The new side: the working tree, load tester included (it drives both sides).
if [ -z "${SKIP_BUILD:-}" ]; then
    echo "ab: building the working tree (cargo build --release --workspace)" >&2
    cargo build --release --workspace
fi
NEW_BIN=$TARGET/release/wsbus
LT=$TARGET/release/wsbus-loadtest
[ -x "$NEW_BIN" ] && [ -x "$LT" ] || lib_die "$NEW_BIN or $LT missing"
NEW_LABEL="$(git describe --always --dirty --abbrev=10) (working tree)"

# The base side.
if [ "$BASE_REV" = pubsub ]; then
    BASE_PEER=pubsub
    BASE_LABEL="pub/sub reference"
    BASE_BIN=
    pubsub_ready
else
    BASE_PEER=wsbus
    SHA=$(git rev-parse --verify "$BASE_REV^{commit}") || lib_die "no such revision: $BASE_REV"
    BASE_LABEL="${SHA:0:10} ($BASE_REV)"
    BASE_BIN=$AB/bin/wsbus-$SHA
    if [ ! -x "$BASE_BIN" ]; then
        if [ -d "$AB/src" ]; then
            git -C "$AB/src" checkout -q --detach "$SHA"
        else
            git worktree add -q --detach "$AB/src" "$SHA"
        fi
        if [ ! -d "$AB/target/release" ] && [ -d "$TARGET/release/.fingerprint" ]; then
            # A first base build starts from the working tree's compiled dependencies (same
            # sources and flags: cargo reuses them), so only the workspace's crates compile.
            echo "ab: seeding $AB/target with $TARGET/release" >&2
            mkdir -p "$AB/target"
            cp -a --reflink=auto "$TARGET/release" "$AB/target/release"
        fi
        echo "ab: building $BASE_LABEL in $AB/src (CARGO_TARGET_DIR=$AB/target)" >&2
        # As the new side is built (and bench.sh builds): with the whole workspace, whose
        # members' dependency features unify, so both binaries get the same dependency builds.
        (cd "$AB/src" && CARGO_TARGET_DIR=$AB/target cargo build --release --workspace) \
            || lib_die "building $BASE_REV failed"
        cp "$AB/target/release/wsbus" "$BASE_BIN.tmp" && mv "$BASE_BIN.tmp" "$BASE_BIN"
    fi
fi

# One run of one side on fresh Redis and nodes: appends a row to $OUT/runs.tsv.
printf 'round\tside\trc\tmsg_per_s\tnode_us_per_msg\tredis_us_per_msg\tnode_us_per_msg_whole_run\tredis_us_per_msg_whole_run\txadd_calls_per_msg\txadd_us_per_msg\n' >"$OUT/runs.tsv"
FAILED=0
run_side() { # round side
    local round=$1 side=$2 dir rc=0 a b r a0 b0 r0 node_ticks redis_ticks_run
    dir=$OUT/$round-$side
    mkdir -p "$dir"
    local saved_out=$OUT
    OUT=$dir
    if [ "$side" = base ]; then
        PEER=$BASE_PEER WSBUS=$BASE_BIN
        local extra=("${BASE_NODE_ARGS[@]}")
    else
        PEER=wsbus WSBUS=$NEW_BIN
        local extra=("${NEW_NODE_ARGS[@]}")
    fi
    start_redis
    serve_args
    if [ "$side" = base ]; then NODE_ENV+=("${BASE_ENV[@]}"); else NODE_ENV+=("${NEW_ENV[@]}"); fi
    free_port; a=$FREE_PORT
    start_node "ab-$side-a" "$a" "${extra[@]}"; local apid=$NODE_PID
    free_port; b=$FREE_PORT
    start_node "ab-$side-b" "$b" "${extra[@]}"; local bpid=$NODE_PID
    a0=$(cpu_ticks "$apid"); b0=$(cpu_ticks "$bpid"); r0=$(cpu_ticks "$RPID")
    timeout 600 "$LT" "${LT_RUN[@]}" "${LT_EXTRA[@]}" "${LT_AUTH[@]}" \
        --node "ws://127.0.0.1:$a" --node "ws://127.0.0.1:$b" \
        --server-pid "$apid" --server-pid "$bpid" --server-pid "$RPID" \
        --json --report-file "$dir/report.html" >"$dir/report.json" 2>"$dir/report.err" || rc=$?
    node_ticks=$(( $(cpu_ticks "$apid") - a0 + $(cpu_ticks "$bpid") - b0 ))
    redis_ticks_run=$(( $(cpu_ticks "$RPID") - r0 ))
    local p
    for p in "${REDIS_PORTS[@]}"; do
        redis-cli -p "$p" INFO commandstats
    done >"$dir/commandstats.txt" 2>&1 || true
    stop_pids "$apid" "$bpid" "$RPID"
    forget_pids "$apid" "$bpid" "$RPID"
    OUT=$saved_out
    # XADD calls and Redis µs in XADD over the whole run (all shards).
    local xadd
    xadd=$(awk -F'[:=,]' '/^cmdstat_xadd:/ { c += $3; u += $5 } END { printf "%d %d", c, u }' \
        "$dir/commandstats.txt" | tr -d '\r')
    local row
    if ! row=$(jq -er --arg round "$round" --arg side "$side" --argjson rc "$rc" --argjson tck "$TCK" \
        --argjson node "$node_ticks" --argjson redis "$redis_ticks_run" \
        --argjson xcalls "${xadd% *}" --argjson xusec "${xadd#* }" '
        .messages.delivered as $n
        | [$round, $side, $rc, (.messages.delivered_per_sec | round),
           ((.servers[0].cpu_us_per_delivery + .servers[1].cpu_us_per_delivery) * 100 | round / 100),
           .servers[2].cpu_us_per_delivery,
           ($node / $tck * 1e6 / $n * 100 | round / 100), ($redis / $tck * 1e6 / $n * 100 | round / 100),
           ($xcalls / $n * 1000 | round / 1000), ($xusec / $n * 1000 | round / 1000)]
        | @tsv' "$dir/report.json" 2>/dev/null); then
        echo "ab: round $round $side produced no report (rc $rc): $(tail -n 3 "$dir/report.err")" >&2
        FAILED=1
        return
    fi
    printf '%s\n' "$row" >>"$OUT/runs.tsv"
    local delivered
    delivered=$(jq -r '.messages.delivered' "$dir/report.json")
    # Redis calls per delivered message, by command (the busiest, whole run).
    awk -F'[_:=,]' -v n="$delivered" -v round="$round" -v side="$side" '
        $1 == "cmdstat" && n > 0 { c[$2] += $4; u[$2] += $6 }
        END { for (k in c) printf "%s\t%s\t%s\t%.3f\t%.3f\n", round, side, k, c[k] / n, u[k] / n }' \
        <(tr -d '\r' <"$dir/commandstats.txt") >>"$OUT/commands.tsv"
    if [ "$rc" != 0 ]; then
        FAILED=1
        echo "ab: round $round $side FAILED (rc $rc): $(jq -r '.problems | join("; ")' "$dir/report.json")" >&2
    fi
    awk -F'\t' -v label="$([ "$side" = base ] && echo "$BASE_LABEL" || echo "$NEW_LABEL")" '{
        printf "round %s %-4s %9d msg/s   node %6.2f µs/msg   redis %5.2f µs/msg   XADD %.3f calls %.3f µs/msg%s   [%s]\n",
            $1, $2, $4, $5, $6, $9, $10, ($3 == 0 ? "" : "   FAILED rc " $3), label }' <<<"$row"
}

echo "ab: $WHAT, $FPW frame(s) per write, $RUN_TIME s x $ROUNDS rounds per side"
echo "ab: base $BASE_LABEL${BASE_NODE_ARGS[*]:+ [${BASE_NODE_ARGS[*]}]}${BASE_ENV[*]:+ {${BASE_ENV[*]}\}}; new $NEW_LABEL${NEW_NODE_ARGS[*]:+ [${NEW_NODE_ARGS[*]}]}${NEW_ENV[*]:+ {${NEW_ENV[*]}\}}"
echo "ab: load average before: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
for round in $(seq "$ROUNDS"); do
    run_side "$round" base
    run_side "$round" new
done
echo "ab: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Mean and min-max per side, and new/base of the means. CPU: the sending phase and drain.
awk -F'\t' -v base="$BASE_LABEL" -v new="$NEW_LABEL" 'NR > 1 {
        s = $2; n[s]++
        for (c = 4; c <= 6; c++) {
            v = $c; sum[s, c] += v
            if (n[s] == 1 || v < lo[s, c]) lo[s, c] = v
            if (n[s] == 1 || v > hi[s, c]) hi[s, c] = v
        }
        t = $5 + $6; sum[s, 7] += t
        if (n[s] == 1 || t < lo[s, 7]) lo[s, 7] = t
        if (n[s] == 1 || t > hi[s, 7]) hi[s, 7] = t
    }
    function cell(s, c, f) { return sprintf(f " (" f "-" f ")", sum[s, c] / n[s], lo[s, c], hi[s, c]) }
    END {
        if (!n["base"] || !n["new"]) { print "ab: no complete pair of runs"; exit }
        printf "\n%-6s %-28s %-27s %-24s %-22s %s\n", "side", "", "msg/s mean (min-max)", "node µs/msg", "redis µs/msg", "node+redis µs/msg"
        split("base new", sides, " ")
        for (i = 1; i <= 2; i++) {
            s = sides[i]
            printf "%-6s %-28s %-27s %-24s %-22s %s\n", s, (s == "base" ? base : new) " x" n[s],
                cell(s, 4, "%.0f"), cell(s, 5, "%.2f"), cell(s, 6, "%.2f"), cell(s, 7, "%.2f")
        }
        printf "%-35s %-27s %-24s %-22s %s\n", "new/base", sprintf("%.3fx", sum["new", 4] / n["new"] / (sum["base", 4] / n["base"])),
            sprintf("%.3fx", sum["new", 5] / n["new"] / (sum["base", 5] / n["base"])),
            sprintf("%.3fx", sum["new", 6] / n["new"] / (sum["base", 6] / n["base"])),
            sprintf("%.3fx", sum["new", 7] / n["new"] / (sum["base", 7] / n["base"]))
    }' "$OUT/runs.tsv" | tee "$OUT/summary.txt"
echo "ab: CPU per message over the sending phase and drain (whole-run figures in $OUT/runs.tsv)"
# Redis commands per delivered message (INFO commandstats over the whole run), mean per side.
awk -F'\t' '{ k = $2 SUBSEP $3; calls[k] += $4; usec[k] += $5; runs[k]++; cmds[$3] = 1 }
    END {
        for (c in cmds) {
            b = "base" SUBSEP c; w = "new" SUBSEP c
            tb = runs[b] ? calls[b] / runs[b] : 0; tw = runs[w] ? calls[w] / runs[w] : 0
            if (tb < 0.005 && tw < 0.005) continue
            printf "%-14s %-22s %-22s\n", c,
                sprintf("%.3f (%.2f)", tb, runs[b] ? usec[b] / runs[b] : 0),
                sprintf("%.3f (%.2f)", tw, runs[w] ? usec[w] / runs[w] : 0)
        }
    }' "$OUT/commands.tsv" | sort | { printf "\n%-14s %-22s %-22s\n" "redis command" "base calls (µs)/msg" "new calls (µs)/msg"; cat; } \
    | tee "$OUT/commands.txt"
echo "ab: Redis calls per delivered message from INFO commandstats (µs: Redis's own usec per call, summed)"
[ "$FAILED" = 0 ] || { echo "ab: some runs FAILED (see above)" >&2; exit 1; }
