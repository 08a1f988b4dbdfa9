#!/usr/bin/env bash
# Change the encoder count of a running topology, live.
#
#   deploy/scale.sh encoders +N|-N [--run-dir DIR] [--timeout S]
#
# +N starts N encoders that join the registry and waits until every frontend routes to them;
# -N sends SIGTERM to the N newest: each leaves the pool (frontends stop giving it new keys),
# finishes the items it holds and exits. Only the keys of the encoders that came or went move.
# Under Ray (up.sh --ray) each encoder is an actor: +N adds actors, -N stops the newest ones.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -ge 2 ] && [ "$1" = encoders ] || die "usage: scale.sh encoders +N|-N [--run-dir DIR]"
DELTA="$2"; shift 2
TIMEOUT=300
while [ $# -gt 0 ]; do
    case "$1" in
        --run-dir) RUN_DIR="$2"; shift ;;
        --timeout) TIMEOUT="$2"; shift ;;
        *) die "unknown flag $1" ;;
    esac
    shift
done
[[ "$DELTA" =~ ^[+-][0-9]+$ ]] || die "the change must be +N or -N, got '$DELTA'"
[ -f "$RUN_DIR/topology" ] || die "no topology in $RUN_DIR (deploy/up.sh first)"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"

running() {  # pid files of live encoders, oldest first
    local f
    for f in $(ls "$RUN_DIR"/pids/encoder-* 2>/dev/null | sort -t- -k2 -n); do
        alive "$(cat "$f")" && echo "$f"
    done
    return 0
}

if [ "$(topology backend)" = ray ]; then  # encoder actors come and go (deploy/ray_up.py)
    ray_driver scale "$DELTA" "$TIMEOUT"; exit
fi
HOST="$(topology host)"
N="${DELTA:1}"
if [ "${DELTA:0:1}" = + ]; then
    next="$(topology next_encoder)"
    for ((i = 0; i < N; i++)); do
        start "encoder-$((next + i))" encoder --model "$(topology model)" \
            --input-addr "tcp://$HOST:$(free_port "$HOST")" --join "$(topology registry)" \
            --encoder-device "$(topology device)"
    done
    echo "next_encoder=$((next + N))" >> "$RUN_DIR/topology"
    total=$(running | wc -l)
    wait_ready "$(topology url)" "$total" "$(topology frontends)" "$TIMEOUT"
else
    victims=$(running | tail -n "$N")
    [ "$(running | wc -l)" -gt "$N" ] || die "at least one encoder must stay (running: $(running | wc -l))"
    for f in $victims; do stop_pid "$(cat "$f")" 60 & done  # each drains its items first
    wait
    for f in $victims; do rm -f "$f"; done
    total=$(running | wc -l)
fi
echo "mmserve encoders: $total"
