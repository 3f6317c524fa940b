#!/usr/bin/env bash
# A real multi-node Ray cluster (plus an MLflow tracking server) on this one machine.
#
#   cluster/local.sh up [--workers N] [--cpus-per-worker C] [--dir DIR] [--venv VENV]
#                       [--object-store-mb M] [--backend-store-uri URI] [--no-mlflow]
#   cluster/local.sh status [--dir DIR]
#   cluster/local.sh down [--dir DIR] [--keep-logs]
#
# `up` starts a head node with no CPUs and no GPUs (trials never land there; a job's
# entrypoint needs no resources: `ray job submit --entrypoint-num-cpus` defaults to 0),
# N worker nodes with C CPUs each, and `mlflow server` on 127.0.0.1, with Ray token
# authentication on. All traffic stays on loopback addresses (Ray's gRPC servers still
# listen on every interface: Ray 2.60 has no option to narrow that; the token guards
# them). It writes DIR/env:
#
#   RAY_API_SERVER_ADDRESS      the dashboard URL: `ray job submit|logs|stop` and the Jobs SDK
#   RAY_ADDRESS                 the GCS (127.0.0.2:port): ray.init(), `grokstudy run`, `ray status`
#                               (not the dashboard URL: ray.init() rejects an http:// RAY_ADDRESS)
#   RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH   how every client finds the token
#   MLFLOW_TRACKING_URI         the MLflow server (unset with --no-mlflow)
#   GROKSTUDY_CLUSTER_DIR       DIR itself
#   GROKSTUDY_STORAGE           a directory every node sees: use it as run.storage
#
# so a shell (or a test) can `source DIR/env` and then
#   ray job submit --working-dir . -- grokstudy run studies/smoke.yaml --set run.storage=$GROKSTUDY_STORAGE
#
# Teardown. `ray stop` would stop every Ray process of this user on the machine, other
# clusters included, so it is never used. Each node runs as `ray start --block` in a
# session of its own; `down` sends SIGTERM to each recorded `ray start` (which then stops
# its node's processes), SIGKILLs whatever is left in that session after a grace period,
# then kills by PID any process that still names this cluster's private temp dir. It
# signals a recorded PID only while that process's command line is still the one `up`
# started (PIDs get reused), and deletes the temp dir only if it is the one `up` made.
#
# The token file DIR/auth_token is created with mode 0600.
#
# Several raylets on one host: every node gets random ports for everything but the GCS
# and dashboard (node manager, object manager, dashboard agent, metrics, worker
# processes), because the defaults (dashboard agent 52365, worker ports 10002-19999)
# would collide between nodes, and with other Ray instances on the machine. And every
# node gets its own Ray temp dir, as it would on its own host: nodes sharing one would
# share runtime_resources/, and a worker node garbage-collecting a job's working_dir
# would delete it from under the driver running on the head.
#
# Loopback only. Ray replaces the literal node address 127.0.0.1 (or localhost) by the
# machine's outward IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that set to 0
# `ray start --address` refuses to start a worker node. So the variable is forced to 1
# and the nodes take other loopback addresses (all of 127.0.0.0/8 is loopback on Linux):
# head 127.0.0.2, worker i 127.0.0.(2+i). The dashboard and MLflow bind 127.0.0.1.
set -euo pipefail

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

die() {
    echo "local.sh: $*" >&2
    exit 1
}

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
cmd=${1:-}
[ -n "$cmd" ] || usage
shift

DIR=${GROKSTUDY_CLUSTER_DIR:-$PWD/runs/local-cluster}
WORKERS=2
CPUS=1
VENV=${VIRTUAL_ENV:-}
OBJECT_STORE_MB=100
BACKEND_STORE_URI=
MLFLOW=1
KEEP_LOGS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) WORKERS=$2; shift 2 ;;
        --cpus-per-worker) CPUS=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        --object-store-mb) OBJECT_STORE_MB=$2; shift 2 ;;
        --backend-store-uri) BACKEND_STORE_URI=$2; shift 2 ;;
        --no-mlflow) MLFLOW=0; shift ;;
        --keep-logs) KEEP_LOGS=1; shift ;;
        -h | --help) usage ;;
        *) die "unknown option '$1' (see: $0 --help)" ;;
    esac
done
case "$WORKERS$CPUS$OBJECT_STORE_MB" in *[!0-9]*) die "--workers, --cpus-per-worker and --object-store-mb take whole numbers" ;; esac

[ -d "$DIR" ] && DIR=$(cd "$DIR" && pwd -P)
PIDS_FILE=$DIR/pids   # one "NAME PID" line per session this script started
STATE_FILE=$DIR/state # RAY_TMP=<private Ray temp dir>, for `down`

# ---- helpers ---------------------------------------------------------------------------

find_venv() {
    # --venv, else $VIRTUAL_ENV, else the repo's .venv, else wherever `python3` lives.
    if [ -z "$VENV" ]; then
        if [ -x "$REPO/.venv/bin/ray" ]; then
            VENV=$REPO/.venv
        else
            VENV=$(dirname "$(dirname "$(command -v python3)")")
        fi
    fi
    BIN=$(cd "$VENV/bin" 2>/dev/null && pwd -P) || die "no bin/ under --venv $VENV"
    [ -x "$BIN/ray" ] || die "$BIN/ray not found: pass --venv with ray installed (e.g. --venv .venv)"
    PY=$BIN/python
}

free_ports() {
    # N distinct ports on 127.0.0.1 that nothing listens on now (held open together).
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

spawn() {
    # spawn NAME LOG CMD...: run CMD detached in a new session; record its PID (= its session id).
    local name=$1 log=$2
    shift 2
    local pid
    pid=$("$PY" - "$log" "$@" <<'EOF'
import subprocess, sys
with open(sys.argv[1], "ab") as log:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
print(p.pid)
EOF
)
    echo "$name $pid" >>"$PIDS_FILE"
}

alive() { kill -0 "$1" 2>/dev/null; }

# Each node was started in its own session, whose id is the recorded PID. Ray puts the
# Python workers of a raylet in process groups of their own, but they stay in the session.
session_alive() { pgrep -s "$1" >/dev/null 2>&1; }

ray_nodes_alive() {
    # Number of ALIVE nodes, asked of the dashboard's state API with the token.
    "$PY" - "$DASHBOARD_URL" "$DIR/auth_token" <<'EOF'
import json, sys, urllib.request
url, token_path = sys.argv[1], sys.argv[2]
token = open(token_path).read().strip()
req = urllib.request.Request(f"{url}/api/v0/nodes?limit=1000",
                             headers={"Authorization": f"Bearer {token}"})
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        nodes = json.load(r)["data"]["result"]["result"]
    print(sum(n["state"] == "ALIVE" for n in nodes))
except Exception:
    print(0)
EOF
}

http_ok() {
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1" >/dev/null 2>&1
}

show_log_tail() {
    for f in "$DIR"/logs/*.log; do
        [ -f "$f" ] || continue
        echo "--- tail $f" >&2
        tail -n 15 "$f" >&2
    done
}

wait_for() {
    # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds.
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if [ $SECONDS -ge $deadline ]; then
            echo "local.sh: timed out waiting for $what" >&2
            show_log_tail
            return 1
        fi
        sleep 0.5
    done
}

enough_nodes() { [ "$(ray_nodes_alive)" -ge "$NODES_WANTED" ]; }

# ---- up --------------------------------------------------------------------------------

cmd_up() {
    find_venv
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd -P)
    PIDS_FILE=$DIR/pids
    STATE_FILE=$DIR/state
    if [ -f "$PIDS_FILE" ]; then
        while read -r _ pid; do
            alive "$pid" && die "a cluster from $DIR is still up (pid $pid): run '$0 down --dir $DIR' first"
        done <"$PIDS_FILE"
    fi
    rm -f "$PIDS_FILE" "$STATE_FILE" "$DIR/env" "$DIR"/logs/*.log
    mkdir -p "$DIR/logs" "$DIR/storage"

    # Ray's unix sockets live under its temp dir and must stay under ~107 bytes, so
    # the temp dir is a short private path in /tmp (linked from DIR for the logs).
    RAY_TMP=$(mktemp -d /tmp/gsray-XXXXXX)
    echo "RAY_TMP=$RAY_TMP" >"$STATE_FILE"
    ln -sfn "$RAY_TMP" "$DIR/ray-tmp"

    # The token: a fresh 256-bit secret in DIR, never in ~/.ray (other clusters' token).
    # Mode 0600 from the moment it exists: a new file (noclobber opens it O_EXCL, so an
    # old, perhaps world-readable one cannot be reused) created under umask 077.
    rm -f "$DIR/auth_token"
    (umask 077 && set -o noclobber && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$DIR/auth_token")

    read -r GCS_PORT DASH_PORT CLIENT_PORT MLFLOW_PORT <<<"$(free_ports 4)"
    DASHBOARD_URL=http://127.0.0.1:$DASH_PORT
    HEAD_IP=127.0.0.2

    # Every node, and so every job entrypoint and trial, inherits this environment:
    # the venv first on PATH (entrypoints must find `grokstudy`), and the token.
    export PATH="$BIN:$PATH"
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH=$DIR/auth_token
    unset RAY_AUTH_TOKEN RAY_ADDRESS RAY_API_SERVER_ADDRESS
    export RAY_USAGE_STATS_ENABLED=0
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 # see the header: multi-node on loopback
    # No 30 s drain on SIGTERM (it exists for Ray Serve traffic); `down` should be quick.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
    local osm=$((OBJECT_STORE_MB * 1024 * 1024))
    local common=(--num-gpus 0 --object-store-memory "$osm" --dashboard-agent-listen-port 0
        --min-worker-port 0 --max-worker-port 0 --disable-usage-stats --block)

    local tracking_uri=
    if [ "$MLFLOW" = 1 ]; then
        tracking_uri=http://127.0.0.1:$MLFLOW_PORT
        # In the nodes' environment too, so every job and trial logs here by default.
        export MLFLOW_TRACKING_URI=$tracking_uri
        local backend=${BACKEND_STORE_URI:-sqlite:///$DIR/mlflow.db}
        # Started first: it is the slowest to come up and needs nothing from Ray.
        # Proxied artifacts (--serve-artifacts): clients upload through the server, as
        # they do against the cluster deployment in cluster/k8s/mlflow.yaml.
        # No job execution: those are MLflow's GenAI jobs, six extra processes grokstudy never uses.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
            spawn mlflow "$DIR/logs/mlflow.log" "$BIN/mlflow" server --host 127.0.0.1 \
                --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "$backend" \
                --serve-artifacts --artifacts-destination "$DIR/mlartifacts"
    fi

    spawn head "$DIR/logs/head.log" "$BIN/ray" start --head --node-ip-address "$HEAD_IP" \
        --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --include-dashboard true \
        --ray-client-server-port "$CLIENT_PORT" --num-cpus 0 --temp-dir "$RAY_TMP/head" "${common[@]}"
    wait_for 90 "the head node (dashboard $DASHBOARD_URL)" enough_head || {
        cmd_down >/dev/null 2>&1 || true
        exit 1
    }

    # One worker at a time: a node gives up if it has not registered within 30 s, which
    # several nodes starting at once on a small, busy machine can exceed.
    local i
    for i in $(seq 1 "$WORKERS"); do
        spawn "worker$i" "$DIR/logs/worker$i.log" "$BIN/ray" start --address "$HEAD_IP:$GCS_PORT" \
            --node-ip-address "127.0.0.$((2 + i))" --num-cpus "$CPUS" --temp-dir "$RAY_TMP/worker$i" \
            "${common[@]}"
        NODES_WANTED=$((i + 1))
        wait_for 120 "worker node $i to join" enough_nodes || {
            cmd_down >/dev/null 2>&1 || true
            exit 1
        }
    done

    if [ -n "$tracking_uri" ]; then
        wait_for 90 "the MLflow server ($tracking_uri/health)" http_ok "$tracking_uri/health" || {
            cmd_down >/dev/null 2>&1 || true
            exit 1
        }
    fi

    {
        echo "# written by cluster/local.sh up; source it to use the cluster"
        echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL"
        echo "export RAY_ADDRESS=$HEAD_IP:$GCS_PORT"
        echo "export RAY_AUTH_MODE=token"
        echo "export RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
        if [ -n "$tracking_uri" ]; then
            echo "export MLFLOW_TRACKING_URI=$tracking_uri"
        else
            echo "unset MLFLOW_TRACKING_URI"
        fi
        echo "export GROKSTUDY_CLUSTER_DIR=$DIR"
        echo "export GROKSTUDY_STORAGE=$DIR/storage"
    } >"$DIR/env"

    echo "Ray cluster up: 1 head (0 CPUs) + $WORKERS worker(s) x $CPUS CPU, token auth on"
    echo "  dashboard / jobs   $DASHBOARD_URL"
    echo "  GCS                $HEAD_IP:$GCS_PORT"
    echo "  token file         $DIR/auth_token"
    [ -n "$tracking_uri" ] && echo "  MLflow             $tracking_uri"
    echo "  shared storage     $DIR/storage"
    echo "  logs               $DIR/logs, $DIR/ray-tmp/<node>/session_latest/logs"
    echo "Use it:   source $DIR/env"
    echo "          ray job submit --working-dir . -- grokstudy run studies/smoke.yaml --set run.storage=\$GROKSTUDY_STORAGE"
    echo "Stop it:  $0 down --dir $DIR"
}

enough_head() {
    local head_pid
    head_pid=$(awk '$1 == "head" {print $2}' "$PIDS_FILE")
    alive "$head_pid" || return 1
    [ "$(ray_nodes_alive)" -ge 1 ]
}

# ---- status ----------------------------------------------------------------------------

cmd_status() {
    [ -f "$PIDS_FILE" ] || die "no cluster recorded in $DIR (run '$0 up' first)"
    find_venv
    local ok=0 name pid
    while read -r name pid; do
        if alive "$pid"; then
            echo "$name: running (pid $pid)"
        else
            echo "$name: NOT running (pid $pid)"
            ok=1
        fi
    done <"$PIDS_FILE"
    if [ -f "$DIR/env" ]; then
        # shellcheck disable=SC1091
        . "$DIR/env"
        DASHBOARD_URL=$RAY_API_SERVER_ADDRESS
        local expected
        expected=$(grep -c '^worker' "$PIDS_FILE" || true)
        local n
        n=$(ray_nodes_alive)
        echo "ray nodes alive: $n (expected $((expected + 1)))"
        [ "$n" -eq $((expected + 1)) ] || ok=1
        if [ -n "${MLFLOW_TRACKING_URI:-}" ]; then
            if http_ok "$MLFLOW_TRACKING_URI/health"; then echo "mlflow: healthy at $MLFLOW_TRACKING_URI"; else
                echo "mlflow: NOT answering at $MLFLOW_TRACKING_URI"
                ok=1
            fi
        fi
        echo "env file: $DIR/env"
    fi
    return $ok
}

# ---- down ------------------------------------------------------------------------------
#
# `down` acts on what `up` recorded, and a recorded PID may belong to another process by
# now (the node died long ago, the machine rebooted), so nothing recorded is taken on
# trust. A recorded process is signalled only while its command line is still the one
# `up` started: `.../ray start ... --temp-dir RAY_TMP/NAME` for a node, `.../mlflow server
# ... --artifacts-destination DIR/mlartifacts` for MLflow. The temp dir is deleted (and
# processes naming it killed) only if it is the one `up` made for this cluster.

running() {
    # running PID: the process exists and is not a zombie.
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) } # the fields after "(command name)"
    [ "${stat%% *}" != Z ]
}

cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null; }

started_here() {
    # started_here NAME PID: is PID still the session leader `up` started as NAME?
    local args
    args=" $(cmdline_of "$2") " || return 1
    case $1 in
        mlflow) [[ $args == *"/mlflow server "* && $args == *" --artifacts-destination $DIR/mlartifacts "* ]] ;;
        head | worker*) [[ -n $RAY_TMP && $args == *"/ray start "* && $args == *" --temp-dir $RAY_TMP/$1 "* ]] ;;
        *) return 1 ;;
    esac
}

kill_leftovers() {
    # kill_leftovers SID: the leader of session SID is gone, so its command line can no
    # longer vouch for the session; SIGKILL only the members that carry this cluster's
    # environment (every node, MLflow and Ray worker inherits RAY_AUTH_TOKEN_PATH).
    local p
    for p in $(pgrep -s "$1" 2>/dev/null || true); do
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -Fxq "RAY_AUTH_TOKEN_PATH=$DIR/auth_token"; then
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
}

checked_ray_tmp() {
    # checked_ray_tmp RECORDED: print RECORDED resolved if it is this cluster's private
    # Ray temp dir, i.e. what `up` made: a /tmp/gsray-XXXXXX directory that DIR/ray-tmp
    # links to. That excludes /, $HOME, relative paths and anything a link leads elsewhere.
    local real
    real=$(realpath -m -- "$1")
    if [[ $1 == /* && $real == "$(realpath -m -- "$DIR/ray-tmp")" &&
        $(dirname "$real") == "$(realpath -m /tmp)" && $(basename "$real") == gsray-?????? ]]; then
        echo "$real"
    else
        echo "local.sh: refusing to stop the cluster: $STATE_FILE names RAY_TMP=$1, not this cluster's temp dir (a /tmp/gsray-XXXXXX that $DIR/ray-tmp links to); nothing was killed or deleted" >&2
        return 1
    fi
}

cmd_down() {
    [ -f "$PIDS_FILE" ] || {
        echo "local.sh: nothing recorded in $DIR; nothing to stop"
        return 0
    }
    local RAY_TMP=
    [ -f "$STATE_FILE" ] && RAY_TMP=$(sed -n 's/^RAY_TMP=//p' "$STATE_FILE")
    if [ -n "$RAY_TMP" ]; then
        RAY_TMP=$(checked_ray_tmp "$RAY_TMP") || exit 1
    fi

    # Workers first (newest first), then the head and MLflow.
    local name pid stop=() gone=()
    while read -r name pid; do
        case $pid in
            '' | *[!0-9]* | 0* | 1)
                echo "local.sh: skipping '$name $pid' in $PIDS_FILE: not a process id" >&2
                ;;
            *)
                if ! running "$pid"; then
                    gone+=("$pid")
                elif started_here "$name" "$pid"; then
                    stop+=("$pid")
                else
                    echo "local.sh: not stopping $name: pid $pid is no longer the process local.sh started (now: $(cmdline_of "$pid" | cut -c1-120))" >&2
                fi
                ;;
        esac
    done < <(tac "$PIDS_FILE")

    # SIGTERM each session leader (a node's `ray start --block` then stops its node),
    # SIGKILL what is left of its session after a grace period.
    for pid in "${stop[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 10))
    for pid in "${stop[@]}"; do
        while session_alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        pkill -KILL -s "$pid" 2>/dev/null || true
    done
    for pid in "${gone[@]}"; do
        kill_leftovers "$pid"
    done
    # Anything that left its session but still names this cluster's temp dir (the temp
    # dir is unique to this cluster, so this never touches another cluster).
    if [ -n "$RAY_TMP" ]; then
        local stray
        stray=$(pgrep -f -- "$RAY_TMP/" || true)
        for pid in $stray; do
            [ "$pid" = $$ ] || kill -KILL "$pid" 2>/dev/null || true
        done
    fi
    for pid in "${stop[@]}"; do
        local t=$((SECONDS + 5))
        while session_alive "$pid" && [ $SECONDS -lt $t ]; do sleep 0.2; done
        session_alive "$pid" && die "processes of session $pid survived SIGKILL"
    done

    if [ -n "$RAY_TMP" ] && [ -d "$RAY_TMP" ]; then
        if [ "$KEEP_LOGS" = 1 ]; then
            echo "Ray logs kept in $RAY_TMP"
        else
            rm -rf "$RAY_TMP"
            rm -f "$DIR/ray-tmp"
        fi
    fi
    rm -f "$PIDS_FILE" "$STATE_FILE" "$DIR/env"
    echo "local cluster in $DIR stopped"
}

case "$cmd" in
    up) cmd_up ;;
    status) cmd_status ;;
    down) cmd_down ;;
    -h | --help | help) usage ;;
    *) die "unknown command '$cmd'; use: up | status | down" ;;
esac
