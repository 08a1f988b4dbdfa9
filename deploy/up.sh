#!/usr/bin/env bash
# Bring up an mmserve topology: the encoder registry, one engine (a TP group), encoders that join
# the registry, and frontends sharing one port (SO_REUSEPORT). Prints the API URL when every
# role serves; pids and logs go to the run dir (down.sh stops it all, scale.sh resizes the pool).
#
#   deploy/up.sh --local --model PATH [--frontends N] [--encoders N] [--tp N] [--port P]
#                [--host H] [--run-dir DIR] [--config FILE] [--timeout S]
#   deploy/up.sh --ray [--address ADDR] [--local] [--name NAME] [--no-dashboard] [flags above]
#
# --config FILE: key=value lines (model, frontends, encoders, tp, port, host, device); flags given
# after it win. --ray: every role is a detached, named Ray actor (deploy/ray_up.py) on the Ray
# cluster at --address, else on a head that up.sh starts here (down.sh stops it again); with
# --local every role binds loopback. The dashboard is on when Ray has it (ray[default]).

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODEL="" FRONTENDS=1 ENCODERS=1 TP=1 PORT=8000 HOST=127.0.0.1 DEVICE=auto TIMEOUT=300
BACKEND=local LOCAL=0 ADDRESS="" NAME=mmserve DASHBOARD=1

load_config() {  # known keys only: the file is data, never run as shell
    local key value
    [ -f "$1" ] || die "no config file $1"
    while IFS='=' read -r key value; do
        key="$(echo "$key" | tr -d '[:space:]')"; value="$(echo "$value" | sed 's/^ *//; s/ *$//')"
        case "$key" in
            ''|\#*) ;;
            model) MODEL="$value" ;; frontends) FRONTENDS="$value" ;; encoders) ENCODERS="$value" ;;
            tp) TP="$value" ;; port) PORT="$value" ;; host) HOST="$value" ;; device) DEVICE="$value" ;;
            *) die "$1: unknown key '$key'" ;;
        esac
    done < "$1"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --local) LOCAL=1 ;;
        --ray) BACKEND=ray ;;
        --address) ADDRESS="$2"; shift ;;
        --name) NAME="$2"; shift ;;
        --no-dashboard) DASHBOARD=0 ;;
        --config) load_config "$2"; shift ;;
        --model) MODEL="$2"; shift ;;
        --frontends) FRONTENDS="$2"; shift ;;
        --encoders) ENCODERS="$2"; shift ;;
        --tp) TP="$2"; shift ;;
        --port) PORT="$2"; shift ;;
        --host) HOST="$2"; shift ;;
        --device) DEVICE="$2"; shift ;;
        --run-dir) RUN_DIR="$2"; shift ;;
        --timeout) TIMEOUT="$2"; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown flag $1 (see --help)" ;;
    esac
    shift
done
for n in FRONTENDS ENCODERS TP PORT; do
    [[ "${!n}" =~ ^[0-9]+$ ]] || die "--${n,,} must be a number, got '${!n}'"
done
[ "$FRONTENDS" -ge 1 ] || die "--frontends must be >= 1"
[ "$TP" -ge 1 ] || die "--tp must be >= 1"
[[ "$NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name: letters, digits, . _ - only, got '$NAME'"
[ "$BACKEND" = ray ] || [ -z "$ADDRESS" ] || die "--address needs --ray"

if [ -z "$MODEL" ]; then  # the built-in demo checkpoint, as `mmserve serve` would pick
    MODEL="$("$PY" -c 'from frontend.random_model import default_model; print(default_model()[0])')"
fi
[ -f "$MODEL/config.json" ] || die "--model: no config.json in '$MODEL'"
MULTIMODAL="$("$PY" -c 'import sys; from frontend.launcher import is_multimodal
print(int(is_multimodal(sys.argv[1])))' "$MODEL")"
if [ "$MULTIMODAL" = 1 ]; then
    [ "$ENCODERS" -ge 1 ] || die "a multimodal model needs --encoders >= 1"
else
    [ "$ENCODERS" = 0 ] || die "$MODEL has no vision/audio tower: use --encoders 0"
fi

mkdir -p "$RUN_DIR/pids" "$RUN_DIR/logs"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
if [ -n "$(tagged_pids)" ]; then
    die "a topology is already running from $RUN_DIR (deploy/down.sh --run-dir $RUN_DIR)"
fi
rm -f "$RUN_DIR"/pids/* "$RUN_DIR"/logs/* "$RUN_DIR/actors"

if [ "$BACKEND" = ray ]; then
    ray_up  # starts or joins the cluster, places the roles, prints the URL; exits
fi

REGISTRY="tcp://$HOST:$(free_port "$HOST")"
ENGINE="tcp://$HOST:$(free_port "$HOST")"
URL="http://$HOST:$PORT"
cat > "$RUN_DIR/topology" <<EOF
model=$MODEL
host=$HOST
port=$PORT
device=$DEVICE
registry=$REGISTRY
engine=$ENGINE
url=$URL
frontends=$FRONTENDS
next_encoder=$ENCODERS
EOF

# If anything fails from here on, take down what started.
trap 'echo "up.sh: failed; stopping what started" >&2; "$DEPLOY_DIR/down.sh" --run-dir "$RUN_DIR" >&2' ERR

start registry registry --addr "$REGISTRY"
start engine llm-worker --model "$MODEL" --input-addr "$ENGINE" --tensor-parallel-size "$TP" \
    --device "$DEVICE"
for ((i = 0; i < ENCODERS; i++)); do
    start "encoder-$i" encoder --model "$MODEL" --input-addr "tcp://$HOST:$(free_port "$HOST")" \
        --join "$REGISTRY" --encoder-device "$DEVICE"
done
POOL=()  # a text model has no encoder pool
[ "$MULTIMODAL" = 1 ] && POOL=(--encoder-registry "$REGISTRY")
for ((i = 0; i < FRONTENDS; i++)); do
    start "frontend-$i" frontend --model "$MODEL" --engine-addr "$ENGINE" "${POOL[@]}" \
        --host "$HOST" --port "$PORT" --reuse-port
done

wait_ready "$URL" "$ENCODERS" "$FRONTENDS" "$TIMEOUT"
trap - ERR
echo "mmserve up: $URL/v1  (model $MODEL; $FRONTENDS frontends, $ENCODERS encoders, TP=$TP)"
echo "encoder registry: $REGISTRY   run dir: $RUN_DIR"
