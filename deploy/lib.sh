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
