#!/usr/bin/env bash
# Stop every process of a topology that up.sh (and scale.sh) started, and leave none behind.
#
#   deploy/down.sh [--run-dir DIR] [--grace S]
#
# Frontends go first (no new requests), then encoders (they leave the pool and drain), then
# the engine and the registry; each gets SIGTERM, then SIGKILL after the grace. Last, anything
# still carrying the run's tag (a TP worker, a process whose pid file was lost) is killed.
# A Ray run (up.sh --ray): the role actors are stopped in the same order (deploy/ray_up.py), then
# the Ray head's processes if up.sh started it.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GRACE=10
while [ $# -gt 0 ]; do
    case "$1" in
        --run-dir) RUN_DIR="$2"; shift ;;
        --grace) GRACE="$2"; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) die "unknown flag $1 (see --help)" ;;
    esac
    shift
done
[ -d "$RUN_DIR" ] || die "no run dir $RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"

stop_group() {  # stop_group PATTERN: every process whose pid file matches, all at once
    local f pids=()
    for f in "$RUN_DIR"/pids/$1; do
        [ -f "$f" ] && pids+=("$(cat "$f")")
    done
    for pid in "${pids[@]}"; do stop_pid "$pid" "$GRACE" & done
    wait
    for f in "$RUN_DIR"/pids/$1; do rm -f "$f"; done
}

if [ -f "$RUN_DIR/topology" ] && [ "$(topology backend)" = ray ]; then
    ray_down
fi
stop_group 'frontend-*'
stop_group 'encoder-*'
stop_group engine
stop_group registry
for _ in 1 2 3 4 5 6 7 8 9 10; do  # TP workers exit with their engine within half a second
    [ -z "$(tagged_pids)" ] && break
    sleep 0.2
done
for pid in $(tagged_pids); do
    echo "down.sh: killing leftover process $pid" >&2
    kill -KILL "$pid" 2>/dev/null || true
done
echo "mmserve down: $RUN_DIR"
