# Shared by up.sh, down.sh and scale.sh (sourced, not run).
#
# A topology lives in a run dir: `topology` (key=value lines: what up.sh chose), `pids/<name>`
# and `logs/<name>.log` per process. Every process up.sh or scale.sh starts carries
# MMSERVE_DEPLOY_RUN=<run dir> in its environment, and so do its children (TP workers), which is
# how down.sh finds every one of them, even those that were not started here directly.

set -Eeuo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY_DIR")"
PY="${PYTHON:-python3}"
# The repository's packages, also when mmserve is not installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
RUN_DIR="${MMSERVE_RUN_DIR:-${TMPDIR:-/tmp}/mmserve-$(id -u)}"

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

free_port() { "$PY" -c "from protocol.addresses import free_port; print(free_port('$1'))"; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && ! grep -qs '^[^)]*) Z' "/proc/$1/stat"; }

topology() {  # the value of one key of the run's topology
    sed -n "s/^$1=//p" "$RUN_DIR/topology" | tail -n 1
}

# start NAME ROLE ARGS...: run `mmserve ROLE ARGS...` on this machine, detached in its own
# session (a Ctrl-C in the caller's terminal does not reach it), its pid in pids/NAME.
# This is the placement hook: a Ray backend would start NAME as an actor on a node with the
# resources it needs (see README.md, "Multi-node with Ray") instead of a local process.
start() {
    local name="$1"; shift
    MMSERVE_DEPLOY_RUN="$RUN_DIR" setsid "$PY" -m frontend.cli "$@" \
        >"$RUN_DIR/logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN_DIR/pids/$name"
}

# The pids of every process carrying this run's tag (Linux /proc).
tagged_pids() {
    local f pid
    for f in /proc/[0-9]*/environ; do
        pid="${f#/proc/}"; pid="${pid%/environ}"
        if tr '\0' '\n' 2>/dev/null < "$f" | grep -qxF "MMSERVE_DEPLOY_RUN=$RUN_DIR"; then
            [ "$pid" != "$$" ] && alive "$pid" && echo "$pid"
        fi
    done
    return 0
}

# stop_pid PID GRACE_S: SIGTERM (its process group too), then SIGKILL after GRACE_S.
stop_pid() {
    local pid="$1" grace="$2" waited=0
    alive "$pid" || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && [ "$waited" -lt $((grace * 10)) ]; do sleep 0.1; waited=$((waited + 1)); done
    if alive "$pid"; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
}

# wait_ready URL ENCODERS FRONTENDS TIMEOUT_S: /health is 200 with ENCODERS routable encoders,
# on 4 x FRONTENDS fresh connections in a row (SO_REUSEPORT hands each to any frontend).
# Fails early when a process of the run has exited.
wait_ready() {
    "$PY" - "$@" "$RUN_DIR" <<'EOF'
import json, os, sys, time, urllib.request
url, encoders, frontends, timeout, run_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
def ok():
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            enc = json.loads(r.read()).get("encoders") or {"live": 0}
            return r.status == 200 and enc["live"] >= encoders
    except (OSError, ValueError):
        return False
def dead():  # a process of the run that exited (a zombie until up.sh itself exits)
    for name in os.listdir(f"{run_dir}/pids"):
        pid = open(f"{run_dir}/pids/{name}").read().strip()
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return name
        if state == "Z":
            return name
deadline, in_row = time.monotonic() + timeout, 0
while in_row < 4 * frontends:
    if (name := dead()) is not None:
        sys.exit(f"{name} exited; see {run_dir}/logs/{name}.log")
    if time.monotonic() > deadline:
        sys.exit(f"not ready after {timeout:.0f} s")
    in_row = in_row + 1 if ok() else 0
    time.sleep(0.05 if in_row else 0.5)
EOF
}

# --- Ray (up.sh --ray): deploy/ray_up.py places the roles as actors -----------------------

ray_cli() { "$PY" -c 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"
sys.exit(main())' "$@"; }

# ray_driver CMD ARGS: deploy/ray_up.py CMD RUN_DIR ARGS, with the auth of a head up.sh started
# (Ray reads it when imported).
ray_driver() {
    local cmd="$1" mode path; shift
    mode="$(topology ray_auth_mode)" path="$(topology ray_auth_token_path)"
    [ -z "$mode" ] || export RAY_AUTH_MODE="$mode"
    [ -z "$path" ] || export RAY_AUTH_TOKEN_PATH="$path"
    "$PY" "$DEPLOY_DIR/ray_up.py" "$cmd" "$RUN_DIR" "$@"
}

# ray_up: start a head here (or join --address), write the topology, run the driver. Every
# process of a head started here carries the run's tag, so down.sh stops exactly those: never
# `ray stop`, which would take down every Ray instance of this user on the machine.
ray_up() {
    "$PY" -c 'import ray' 2>/dev/null || die "--ray needs Ray (pip install 'mmserve[ray]')"
    local gpus=0 cpus started_head=0 ray_temp="" address="$ADDRESS"
    if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [ "$DASHBOARD" = 1 ] && ! "$PY" -c 'import ray.dashboard.optional_deps' 2>/dev/null; then
        DASHBOARD=0 DASHBOARD_WHY="needs ray[default]"  # the minimal `ray` has no dashboard
    fi
    trap 'echo "up.sh: failed; stopping what started" >&2; "$DEPLOY_DIR/down.sh" --run-dir "$RUN_DIR" >&2' ERR
    if [ -z "$address" ]; then
        # Sized for the topology: one CPU slot per TP worker actor (the role actors take none:
        # their processes are not Ray tasks).
        cpus=$(( TP > 1 ? TP : 1 ))
        # All the GPUs here go to Ray (scale.sh may add encoders); a GPU machine needs one per
        # encoder and per TP rank (the engine core takes none under --executor ray).
        if [ "$gpus" -gt 0 ] && [ "$gpus" -lt $(( ENCODERS + TP )) ]; then
            die "$ENCODERS encoders and TP=$TP need $(( ENCODERS + TP )) GPUs; this machine has $gpus"
        fi
        ray_temp="$(mktemp -d "${TMPDIR:-/tmp}/mmray-XXXXXX")"  # short: Ray's socket paths
        if [ -z "${RAY_AUTH_MODE:-}" ]; then  # Ray's token auth, with a token of this run's own
            (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' \
                > "$RUN_DIR/ray-auth-token")
            export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RUN_DIR/ray-auth-token"
        fi
        local opts=(--head --port "$(free_port 127.0.0.1)" --num-cpus "$cpus" --num-gpus "$gpus"
                    --temp-dir "$ray_temp" --disable-usage-stats
                    --dashboard-agent-listen-port "$(free_port 127.0.0.1)"
                    --include-dashboard "$([ "$DASHBOARD" = 1 ] && echo true || echo false)")
        opts+=(--dashboard-port "$(free_port 127.0.0.1)")  # runs, minimal, even when "off"
        if "$PY" -c 'import grpc' 2>/dev/null; then  # ray[client]: its server, off 10001
            opts+=(--ray-client-server-port "$(free_port 127.0.0.1)")
        fi
        if [ "$LOCAL" = 1 ]; then
            opts+=(--node-ip-address 127.0.0.1 --object-store-memory $((100 << 20)))
        fi
        MMSERVE_DEPLOY_RUN="$RUN_DIR" ray_cli start "${opts[@]}" \
            >"$RUN_DIR/logs/ray-head.log" 2>&1 < /dev/null \
            || { cat "$RUN_DIR/logs/ray-head.log" >&2; rm -rf "$ray_temp"; die "ray start failed"; }
        started_head=1
        address="$(cat "$ray_temp/ray_current_cluster")"
    fi
    cat > "$RUN_DIR/topology" <<EOT
backend=ray
name=$NAME
ray_address=$address
started_head=$started_head
ray_auth_mode=${RAY_AUTH_MODE:-}
ray_auth_token_path=${RAY_AUTH_TOKEN_PATH:-}
ray_temp=$ray_temp
local=$LOCAL
gpu=$(( gpus > 0 ? 1 : 0 ))
dashboard=$DASHBOARD
dashboard_why=${DASHBOARD_WHY:---no-dashboard}
model=$MODEL
host=$HOST
port=$PORT
device=$DEVICE
url=http://$HOST:$PORT
frontends=$FRONTENDS
encoders=$ENCODERS
tp=$TP
timeout=$TIMEOUT
next_encoder=$ENCODERS
EOT
    ray_driver up
    trap - ERR
    exit 0
}

# ray_down: the driver stops every role actor (their processes first), then the head's
# processes go if up.sh started it (SIGTERM, SIGKILL after GRACE).
ray_down() {
    local head; head="$(topology started_head)"
    if [ "$head" != 1 ] || [ -n "$(tagged_pids)" ]; then  # (a head of ours that is gone: skip)
        ray_driver down || echo "down.sh: the Ray driver failed" >&2
    fi
    if [ "$head" = 1 ]; then
        local pid pids
        pids="$(tagged_pids)"
        for pid in $pids; do stop_pid "$pid" "$GRACE" & done
        wait
        local temp; temp="$(topology ray_temp)"
        case "$temp" in */mmray-*) rm -rf "$temp" ;; esac
    fi
}
