# What loadtest/bench.sh and loadtest/ab.sh share; sourced, not run. Free ports, waiting for a
# listener, starting Redis (one server or a 3-shard cluster) and nodes (wsbus, or the pub/sub
# reference with PEER=pubsub), CPU time and RSS from /proc, stopping processes.
#
# The caller sets LIB_NAME (its name in messages) and OUT (logs go there), then calls
# lib_scope: it makes TMP (scratch) and the array PIDS (every process started here is appended
# to it), and at exit or interrupt stops them all, the last started first, and removes TMP.

LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PUBSUB_REF=$LIB_DIR/pubsub-ref

lib_die() { echo "$LIB_NAME: $*" >&2; exit 2; }

# TMP, PIDS, and their cleanup at exit (see the top). LIB_AT_EXIT, if set, is a command run
# first (e.g. to add a pid to PIDS that a script of the caller's started).
lib_scope() {
    TMP=$(mktemp -d "/tmp/wsbus-$LIB_NAME.XXXXXX")
    PIDS=()
    trap lib_cleanup EXIT
    trap 'exit 130' INT TERM
}
lib_cleanup() {
    local rc=$? i stop=()
    trap - EXIT INT TERM
    [ -z "${LIB_AT_EXIT:-}" ] || eval "$LIB_AT_EXIT"
    # Last started first: load testers, then nodes (they release their users), then Redis.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop+=("${PIDS[$i]}"); done
    stop_pids "${stop[@]}"
    rm -rf "$TMP"
    exit "$rc"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Sets FREE_PORT to a port nothing listens on, not handed out before by this shell (call it
# directly, not in $(...), or the record of ports handed out is lost).
LIB_PORTS=" "
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 10000))
        if [[ $LIB_PORTS != *" $p "* ]] && ! port_open "$p"; then
            LIB_PORTS+="$p "
            FREE_PORT=$p
            return
        fi
    done
    lib_die "no free port"
}
wait_port() { # port pid name
    local deadline=$((SECONDS + 30))
    until port_open "$1"; do
        kill -0 "$2" 2>/dev/null || lib_die "$3 exited; see $OUT/$3.log"
        [ "$SECONDS" -lt "$deadline" ] || lib_die "$3 not listening after 30 s"
        sleep 0.1
    done
}

# Stops processes: TERM, up to 5 s for each to go, then KILL.
stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}

# Drops pids from PIDS (after stopping them: a pid the kernel hands out again must not be
# killed at exit).
forget_pids() {
    local p keep=() gone=" $* "
    for p in "${PIDS[@]}"; do [[ $gone == *" $p "* ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of a pid
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # fields after "comm": state is field 3, utime 14, stime 15 => index 11, 12 here
    set -- $s
    echo $(( ${12} + ${13} ))
}
redis_ticks() { # all Redis processes together
    local t=0 p
    for p in "${RPIDS[@]}"; do t=$((t + $(cpu_ticks "$p"))); done
    echo "$t"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# One redis-server on a free port, or with CLUSTER set three cluster shards (no replicas).
# Sets RPORT (the first), RPID, RPIDS, REDIS_PORTS and REDIS_ARGS (the nodes' Redis flags).
start_redis() {
    RPIDS=()
    if [ -n "${CLUSTER:-}" ]; then
        local i p
        REDIS_PORTS=()
        for i in 1 2 3; do
            free_port; p=$FREE_PORT
            mkdir -p "$TMP/r$i"
            (cd "$TMP/r$i" && exec redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no \
                --cluster-enabled yes --cluster-config-file nodes.conf --dir "$TMP/r$i" >"$OUT/redis-$i.log" 2>&1) &
            RPIDS+=($!); PIDS+=($!); REDIS_PORTS+=("$p")
            wait_port "$p" "$!" "redis-$i"
        done
        redis-cli --cluster create $(printf '127.0.0.1:%s ' "${REDIS_PORTS[@]}") --cluster-replicas 0 \
            --cluster-yes >"$OUT/cluster-create.log" 2>&1
        for p in "${REDIS_PORTS[@]}"; do
            until redis-cli -p "$p" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done
        done
        RPORT=${REDIS_PORTS[0]}
        REDIS_ARGS=(--redis-cluster --redis-url "$(printf 'redis://127.0.0.1:%s,' "${REDIS_PORTS[@]}" | sed 's/,$//')")
    else
        free_port; RPORT=$FREE_PORT
        mkdir -p "$TMP/redis-$RPORT"
        (cd "$TMP/redis-$RPORT" && exec redis-server --port "$RPORT" --bind 127.0.0.1 --save "" \
            --appendonly no --dir "$TMP/redis-$RPORT" >"$OUT/redis.log" 2>&1) &
        RPIDS+=($!); PIDS+=($!)
        wait_port "$RPORT" "$!" redis
        REDIS_PORTS=("$RPORT")
        REDIS_ARGS=(--redis-url "redis://127.0.0.1:$RPORT")
    fi
    RPID=${RPIDS[0]}
}

# The pub/sub reference's packages, installed once from its package-lock.json.
pubsub_ready() {
    command -v node >/dev/null || lib_die "PEER=pubsub needs node (v20+) and npm"
    [ -z "${CLUSTER:-}" ] || lib_die "the pub/sub reference runs on one Redis, not CLUSTER"
    if [ ! -d "$PUBSUB_REF/node_modules/ws" ] || [ ! -d "$PUBSUB_REF/node_modules/redis" ]; then
        (cd "$PUBSUB_REF" && npm ci --no-audit --no-fund >&2) || lib_die "npm ci in $PUBSUB_REF failed"
    fi
}

# Starts one node listening on 127.0.0.1:PORT, logging to $OUT/NAME.log (appended), and waits
# until it listens. wsbus: "$WSBUS" serve with SERVE_ARGS (and NODE_ENV, e.g. its Tokio worker
# threads) and the extra arguments given. PEER=pubsub: the reference node on RPORT's Redis
# (extra arguments are wsbus flags and are ignored). Sets NODE_PID; appends it to PIDS.
start_node() { # name port [wsbus serve args...]
    local name=$1 port=$2; shift 2
    if [ "${PEER:-wsbus}" = pubsub ]; then
        node "$PUBSUB_REF/server.js" --bind "127.0.0.1:$port" --node-id "$name" \
            --redis-url "redis://127.0.0.1:$RPORT" >>"$OUT/$name.log" 2>&1 &
    else
        env "${NODE_ENV[@]}" "$WSBUS" serve --bind "127.0.0.1:$port" --node-id "$name" \
            "${SERVE_ARGS[@]}" "$@" >>"$OUT/$name.log" 2>&1 &
    fi
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    wait_port "$port" "$NODE_PID" "$name"
}

# The nodes measure the server, not its abuse limits: no per-connection rate limit. Auth: with
# JWT_SECRET the nodes check tokens (--jwt-secret) and the load tester mints them (LT_AUTH);
# otherwise they run --insecure. Sets SERVE_ARGS (after start_redis) and LT_AUTH.
serve_args() {
    SERVE_ARGS=(--rate-limit 1000000000 --rate-burst 1000000000 "${REDIS_ARGS[@]}")
    LT_AUTH=()
    if [ -n "${JWT_SECRET:-}" ]; then
        [ "${#JWT_SECRET}" -ge 32 ] || lib_die "JWT_SECRET must be at least 32 bytes (as wsbus requires)"
        SERVE_ARGS+=(--jwt-secret "$JWT_SECRET")
        LT_AUTH=(--jwt-secret "$JWT_SECRET")
    else
        SERVE_ARGS+=(--insecure)
    fi
    NODE_ENV=()
    [ -z "${NODE_THREADS:-}" ] || NODE_ENV=("TOKIO_WORKER_THREADS=$NODE_THREADS")
}
