#!/usr/bin/env bash
# The issue-8 GPU suite in one call: kernel tests, kernel benchmarks, the engine's decode sweep
# with the Triton and the reference kernels, and the transformers peer (eager, static+compile),
# all against the roofline measured on the same machine. From the repository root:
#
#   device run: command "bash bench/gpu_suite.sh", carry [".whl"], timeout_s 600
#
# Every stage runs under its own `timeout`, cut further so the whole suite ends within
# SUITE_BUDGET_S; a failed or skipped stage never stops the next. Logs and JSON go to $WORK as
# they are written; $OUT (the device tool's folder, at most 8 files come back) receives
# suite.log (this console), pytest.log, summary.{txt,json,png} and suite_results.tar.gz (every
# log and JSON), the tarball refreshed after each stage. Local smoke (CPU, tiny model, no
# tests): SMOKE=1 bash bench/gpu_suite.sh
#
# Sizes and limits (env vars, defaults in brackets):
#   SUITE_BUDGET_S [570]
#   STAGES ["env ckpt pytest kernels decode_triton decode_cublas decode_unfused decode_eager decode_tp parity profile
#            encoder ttft decode_reference peer qwen_tower video_ttft"]
#   CKPT [/dev/shm/mmserve_llama7b, else /tmp/...]  SHAPE [7b]  DEVICE [cuda]
#   T_ENV [60] T_CKPT [180] T_PYTEST [150] T_KERNELS [90] T_DECODE [130] T_DECODE_REF [90]
#   T_PEER [400]: each stage's own timeout in seconds
#   DECODE_BATCHES ["1 8 32 64"] DECODE_CONTEXTS ["128 700 2048"] DECODE_STEPS [32]
#   REF_BATCHES ["1 8 32 64"] REF_CONTEXTS ["128 700"] REF_STEPS [8]
#   CUBLAS_BATCHES ["1 8"] CUBLAS_CONTEXTS ["128 700"] T_DECODE_CUBLAS [80]: graphs + Triton
#   kernels with the projections on cuBLAS (MMSERVE_REFERENCE_OPS=linear), the GEMV's A/B;
#   T_DECODE_UNFUSED [80]: decode_unfused, same batches with the fusions named in UNFUSED_OPS
#   ["norm_linear,silu_mul_linear,rope_write_kv,decode_attention": the GEMV prologues, RoPE + KV
#   write, and the decode attention that rotates and writes K/V itself] off, the fusions' A/B
#   TP_BATCHES ["1 8 64"] T_DECODE_TP [150]: decode_tp, TP=2 over the mp executor (NCCL, eager:
#   graphs are off under TP), beside decode_eager's TP=1; needs 2 GPUs (nvidia-h200-x2)
#   EAGER_BATCHES ["1 8 64"] EAGER_CONTEXTS ["128"] (Triton kernels, --enforce-eager) T_DECODE_EAGER [80]
#   PARITY_BATCH [8] PARITY_STEPS [32] T_PARITY [120]: bench/parity.py, fast path vs reference
#   PROFILE_BATCHES ["1 8 64"] T_PROFILE [90]: bench/profile_step.py (CUDA only)
#   ENCODER_BATCHES ["1 8 32 64 128"] ENCODER_CKPT [/dev/shm/...] T_ENCODER [80]: bench/encoder.py
#   T_TTFT [150]: bench/ttft.py (LLaVA-1.5-7B shape served over HTTP, one image + 40 tokens);
#   ttft_bytes: the same with the device handoff off (--encoder-device-ring-mb 0), its A/B;
#   ttft_profile [T_TTFT_PROFILE 120]: the image variant under py-spy (carry .whl/pyspy/), with
#   bench/pyspy_summary.py's table below each role's busy loop
#   T_QWEN_TOWER [150]: bench/qwen_tower.py (Qwen2.5-VL-7B tower, mixed sizes, vs transformers)
#   T_VIDEO_TTFT [200] VIDEO_SERVE_ARGS ["--max-num-batched-tokens 4096"]: bench/video_ttft.py
#   (one 30-frame video + 40 tokens over HTTP, Qwen2.5-VL-7B shape; needs PyAV: carry
#   .whl/av_site.tar.xz, unpacked into /tmp/site by the setup)
#   PEER_MODES ["eager static"] PEER_BATCHES/PEER_CONTEXTS [= DECODE_*] PEER_STEPS [32]
#   STATIC_BATCHES ["1 8"] STATIC_CONTEXTS ["128"] COMPILE_BUDGET_S [240]
#   PREFILL_BATCH [64] PREFILL_LEN [128]  KERNEL_OPS [all]
#   PYTEST_ARGS [-q -rfE -m gpu --continue-on-collection-errors tests]: every GPU-marked test
#   that imports there (the GPU machine has no openai client: those HTTP modules don't collect)

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
OUT=${OUT:-$PWD/bench/results/gpu_suite}
WORK=${SUITE_WORK:-/tmp/mmserve_suite}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/suite.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1

SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then  # CPU, tiny model, tiny grids; never the test suite
    : "${DEVICE:=cpu}" "${SHAPE:=tiny}" "${CKPT:=/tmp/mmserve_smoke_ckpt}"
    : "${STAGES:=env ckpt kernels decode_triton decode_eager parity decode_reference peer}"
    : "${EAGER_BATCHES:=1 4}" "${EAGER_CONTEXTS:=16}" "${PARITY_BATCH:=3}" "${PARITY_STEPS:=4}"
    : "${DECODE_BATCHES:=1 4}" "${DECODE_CONTEXTS:=16 40}" "${DECODE_STEPS:=4}"
    : "${REF_BATCHES:=1 4}" "${REF_CONTEXTS:=16}" "${REF_STEPS:=4}"
    : "${STATIC_BATCHES:=1}" "${STATIC_CONTEXTS:=16}" "${PREFILL_BATCH:=4}" "${PREFILL_LEN:=16}"
    : "${PEER_STEPS:=4}"
    export TRITON_INTERPRET=1  # kernels.py runs the Triton kernels interpreted (correctness only)
fi
SUITE_BUDGET_S=${SUITE_BUDGET_S:-570}
STAGES=${STAGES:-env ckpt pytest kernels decode_attn decode_triton decode_sync decode_cublas decode_unfused decode_eager decode_tp parity profile encoder ttft decode_reference peer qwen_tower video_ttft audio}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-7b}
if [[ -z ${CKPT:-} ]]; then
    # tmpfs when it has room: the 13 GB checkpoint is written once and read three times.
    shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print int($4 / 1048576)}')
    if [[ ${shm_free:-0} -ge 20 ]]; then CKPT=/dev/shm/mmserve_llama7b; else CKPT=/tmp/mmserve_llama7b; fi
fi
DECODE_BATCHES=${DECODE_BATCHES:-1 8 32 64}
DECODE_CONTEXTS=${DECODE_CONTEXTS:-128 700 2048}
DECODE_STEPS=${DECODE_STEPS:-32}
REF_BATCHES=${REF_BATCHES:-1 8 32 64}
REF_CONTEXTS=${REF_CONTEXTS:-128 700}
CUBLAS_BATCHES=${CUBLAS_BATCHES:-1 8}
SYNC_BATCHES=${SYNC_BATCHES:-1 8 64}
SYNC_CONTEXTS=${SYNC_CONTEXTS:-128 700}
CUBLAS_CONTEXTS=${CUBLAS_CONTEXTS:-128 700}
UNFUSED_OPS=${UNFUSED_OPS:-norm_linear,silu_mul_linear,rope_write_kv,decode_attention}
EAGER_BATCHES=${EAGER_BATCHES:-1 8 64}
TP_BATCHES=${TP_BATCHES:-1 8 64}
EAGER_CONTEXTS=${EAGER_CONTEXTS:-128}
PARITY_BATCH=${PARITY_BATCH:-8}
PROFILE_BATCHES=${PROFILE_BATCHES:-1 8 64}
ENCODER_BATCHES=${ENCODER_BATCHES:-1 8 32 64 128}
ENCODER_CKPT=${ENCODER_CKPT:-/dev/shm/mmserve_llava15_vision}
PARITY_STEPS=${PARITY_STEPS:-32}
REF_STEPS=${REF_STEPS:-8}
PEER_MODES=${PEER_MODES:-eager static}
PEER_BATCHES=${PEER_BATCHES:-$DECODE_BATCHES}
PEER_CONTEXTS=${PEER_CONTEXTS:-$DECODE_CONTEXTS}
PEER_STEPS=${PEER_STEPS:-$DECODE_STEPS}
STATIC_BATCHES=${STATIC_BATCHES:-1 8}
STATIC_CONTEXTS=${STATIC_CONTEXTS:-128}
COMPILE_BUDGET_S=${COMPILE_BUDGET_S:-240}
PREFILL_BATCH=${PREFILL_BATCH:-64}
PREFILL_LEN=${PREFILL_LEN:-128}
KERNEL_OPS=${KERNEL_OPS:-rms_norm silu_and_mul apply_rope write_kv_cache paged_attention}
# Quoted for the `bash -c` of run_stage: the marker expression must stay one argument.
PYTEST_ARGS=${PYTEST_ARGS:-"-q -rfE -m gpu --continue-on-collection-errors tests"}
TINY=""
[[ $SHAPE == tiny ]] && TINY="--tiny"
RESERVE_S=20  # summary + tarball at the end
: >"$WORK/stages.tsv"

# -- setup: carried wheels, mmserve's own metadata, the card as found -------------------------
echo "=== setup $(date -u +%FT%TZ) in $PWD, WORK=$WORK OUT=$OUT CKPT=$CKPT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "WARNING: carried wheels did not install"
fi
# Repo first (its code), /tmp/site second (wheels, and the dist-info installed below).
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import av" 2>/dev/null && [[ -f .whl/av_site.tar.xz ]]; then
    # PyAV's wheel (36 MB) does not fit the device tool's carry beside the tree; its unpacked
    # package, xz-compressed, does.
    mkdir -p /tmp/site && tar xJf .whl/av_site.tar.xz -C /tmp/site || echo "WARNING: av not unpacked"
fi
if ! command -v py-spy >/dev/null && compgen -G ".whl/pyspy/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/pyspy/*.whl || echo "WARNING: py-spy did not install"
fi
if ! python3 -c "import matplotlib" 2>/dev/null && compgen -G ".whl/mpl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/mpl/*.whl || echo "WARNING: matplotlib wheels did not install"
fi
# mmserve's dist-info (the server reports its version).
if ! python3 -c "import importlib.metadata as m; m.version('mmserve')" 2>/dev/null; then
    tmpsrc=$(mktemp -d)
    cp -r pyproject.toml protocol frontend encoder_worker llm_worker mmkernels "$tmpsrc"/
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target /tmp/site "$tmpsrc" >/dev/null 2>&1 || echo "WARNING: mmserve metadata not installed"
    rm -rf "$tmpsrc"
fi
python3 -c "import zmq, msgspec, blake3, torch; print('imports ok, torch', torch.__version__)" \
    || echo "WARNING: a runtime dependency is missing"
command -v nvidia-smi >/dev/null && nvidia-smi
echo "setup took $(( $(date +%s) - T0 )) s"

# -- stages ----------------------------------------------------------------------------------
pack() { tar czf "$OUT/suite_results.tar.gz.tmp" -C "$WORK" . 2>/dev/null \
    && mv "$OUT/suite_results.tar.gz.tmp" "$OUT/suite_results.tar.gz"; }

# run_stage NAME LIMIT_S MARGIN_S COMMAND: COMMAND's @BUDGET@ becomes the seconds it may plan
# for (the stage's timeout less MARGIN_S, for the work after a script's last budget check).
run_stage() {
    local name=$1 limit=$2 margin=$3 cmd=$4 left t rc start note=""
    if [[ " $STAGES " != *" $name "* ]]; then
        printf '%s\t-\t0\tnot in STAGES\n' "$name" >>"$WORK/stages.tsv"; return
    fi
    left=$(( SUITE_BUDGET_S - ($(date +%s) - T0) - RESERVE_S ))
    t=$(( limit < left ? limit : left ))
    if (( t < 20 )); then
        echo "=== $name skipped: suite budget spent"
        printf '%s\t-\t0\tskipped: suite budget spent\n' "$name" >>"$WORK/stages.tsv"; return
    fi
    cmd=${cmd//@BUDGET@/$(( t > margin + 10 ? t - margin : 10 ))}
    echo "=== $name (timeout ${t}s, at $(( $(date +%s) - T0 ))s): $cmd"
    start=$(date +%s)
    timeout -k 10 "$t" bash -c "$cmd" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    (( rc == 124 || rc == 137 )) && note="timed out after ${t}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$note" >>"$WORK/stages.tsv"
    echo "=== $name: rc $rc in $(( $(date +%s) - start ))s $note"
    pack
}

D="--device $DEVICE"
run_stage env "${T_ENV:-60}" 0 "python3 bench/common.py env $D --out $WORK/env.json"
run_stage ckpt "${T_CKPT:-180}" 0 \
    "python3 bench/common.py build $D --shape $SHAPE --out $CKPT"
run_stage pytest "${T_PYTEST:-150}" 0 "python3 -m pytest $PYTEST_ARGS -p no:cacheprovider"
[[ -f $WORK/pytest.log ]] && cp "$WORK/pytest.log" "$OUT/pytest.log"
run_stage kernels "${T_KERNELS:-90}" 20 \
    "python3 bench/kernels.py $D $TINY --ops $KERNEL_OPS --budget-s @BUDGET@ --out $WORK/kernels.json"
run_stage decode_attn "${T_DECODE_ATTN:-100}" 10 \
    "python3 bench/decode_attention.py --budget-s @BUDGET@ --out $WORK/decode_attention.json"
DEC="python3 bench/decode.py --model $CKPT $D --prefill-batch $PREFILL_BATCH --prefill-len $PREFILL_LEN"
run_stage decode_triton "${T_DECODE:-130}" 30 "MMSERVE_KERNELS=triton $DEC --batch $DECODE_BATCHES \
    --context $DECODE_CONTEXTS --steps $DECODE_STEPS --budget-s @BUDGET@ --out $WORK/decode_triton.json"
run_stage decode_sync "${T_DECODE_SYNC:-80}" 30 "MMSERVE_KERNELS=triton $DEC --async-scheduling off \
    --batch $SYNC_BATCHES --context $SYNC_CONTEXTS --steps $DECODE_STEPS --prefill-reps 1 \
    --budget-s @BUDGET@ --out $WORK/decode_sync.json"
run_stage decode_cublas "${T_DECODE_CUBLAS:-80}" 30 "MMSERVE_KERNELS=triton \
    MMSERVE_REFERENCE_OPS=linear $DEC --batch $CUBLAS_BATCHES --context $CUBLAS_CONTEXTS \
    --steps $DECODE_STEPS --prefill-reps 1 --budget-s @BUDGET@ --out $WORK/decode_cublas.json"
run_stage decode_unfused "${T_DECODE_UNFUSED:-80}" 30 "MMSERVE_KERNELS=triton \
    MMSERVE_REFERENCE_OPS=$UNFUSED_OPS $DEC --batch $CUBLAS_BATCHES \
    --context $CUBLAS_CONTEXTS --steps $DECODE_STEPS --prefill-reps 1 --budget-s @BUDGET@ \
    --out $WORK/decode_unfused.json"
run_stage decode_eager "${T_DECODE_EAGER:-80}" 30 "MMSERVE_KERNELS=triton $DEC --enforce-eager \
    --batch $EAGER_BATCHES --context $EAGER_CONTEXTS --steps $REF_STEPS --prefill-reps 1 \
    --budget-s @BUDGET@ --out $WORK/decode_eager.json"
run_stage decode_tp "${T_DECODE_TP:-150}" 30 "if (( \$(nvidia-smi -L | wc -l) < 2 )); then \
    echo 'decode_tp needs 2 GPUs'; exit 3; fi; MMSERVE_KERNELS=triton $DEC --tensor-parallel-size 2 \
    --executor mp --enforce-eager --batch $TP_BATCHES --context $EAGER_CONTEXTS --steps $REF_STEPS \
    --prefill-reps 1 --budget-s @BUDGET@ --out $WORK/decode_tp2.json"
run_stage parity "${T_PARITY:-120}" 0 "python3 bench/parity.py --model $CKPT $D $TINY --batch $PARITY_BATCH \
    --steps $PARITY_STEPS --out $WORK/parity.json"
run_stage profile "${T_PROFILE:-90}" 0 "python3 bench/profile_step.py --model $CKPT --batch $PROFILE_BATCHES \
    --out $WORK/profile_step.json"
run_stage encoder "${T_ENCODER:-80}" 25 "python3 bench/encoder.py $D $TINY --batch $ENCODER_BATCHES --iters 10 \
    --warmup 2 --budget-s @BUDGET@ --ckpt-dir $ENCODER_CKPT --out $WORK/encoder.json"
run_stage ttft "${T_TTFT:-150}" 0 "python3 bench/ttft.py $D $TINY ${TTFT_ARGS:-} --budget-s @BUDGET@ --out $WORK/ttft.json"
run_stage ttft_bytes "${T_TTFT:-150}" 0 "python3 bench/ttft.py $D $TINY ${TTFT_ARGS:-} \
    --serve-args '--encoder-device-ring-mb 0' --budget-s @BUDGET@ --out $WORK/ttft_bytes.json"
# One image variant again under py-spy (every role's threads, sampled without pausing them):
# where the CPU side of the TTFT goes, for the busy loops and the frontend's handler.
PYSPY=$(command -v py-spy || echo /tmp/site/bin/py-spy)
run_stage ttft_profile "${T_TTFT_PROFILE:-120}" 0 "$PYSPY record --subprocesses --threads \
    --nonblocking --rate 1000 --format raw -o $WORK/ttft_stacks.txt -- python3 bench/ttft.py $D \
    $TINY --variants image --requests 40 --budget-s @BUDGET@ --out $WORK/ttft_profile.json \
    && for fn in EngineCoreProc.run EncoderProc.run OpenAIServing.chat EngineIO._recv_loop; do \
    echo \"== under \$fn\"; python3 bench/pyspy_summary.py $WORK/ttft_stacks.txt --under \$fn \
    --top 30; done"
run_stage decode_reference "${T_DECODE_REF:-90}" 30 "MMSERVE_KERNELS=reference $DEC --batch $REF_BATCHES \
    --context $REF_CONTEXTS --steps $REF_STEPS --warmup 2 --prefill-reps 1 --budget-s @BUDGET@ \
    --out $WORK/decode_reference.json"
run_stage peer "${T_PEER:-400}" 20 "python3 bench/peer_hf.py --model $CKPT $D --mode $PEER_MODES \
    --batch $PEER_BATCHES --context $PEER_CONTEXTS --steps $PEER_STEPS --static-batch $STATIC_BATCHES \
    --static-context $STATIC_CONTEXTS --compile-budget-s $COMPILE_BUDGET_S --prefill-batch $PREFILL_BATCH \
    --prefill-len $PREFILL_LEN --budget-s @BUDGET@ --out '$WORK/peer_{mode}.json'"

run_stage qwen_tower "${T_QWEN_TOWER:-150}" 0 "python3 bench/qwen_tower.py $D $TINY \
    --ckpt-dir /dev/shm/mmserve_qwen25vl_tower --out $WORK/qwen_tower.json"

run_stage video_ttft "${T_VIDEO_TTFT:-200}" 0 "python3 bench/video_ttft.py $D $TINY \
    --budget-s @BUDGET@ --serve-args '${VIDEO_SERVE_ARGS:---max-num-batched-tokens 4096}' \
    --out $WORK/video_ttft.json"

run_stage audio "${T_AUDIO:-150}" 0 "python3 bench/audio.py --device $DEVICE \
    --size $([[ $SHAPE == tiny ]] && echo tiny || echo real) --out $WORK/audio_gpu.json"

# -- summary: printed last ---------------------------------------------------------------------
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv
python3 bench/suite_summary.py "$WORK" 2>&1 | tee "$WORK/summary.txt"
for f in summary.txt summary.json summary.png; do [[ -f $WORK/$f ]] && cp "$WORK/$f" "$OUT/$f"; done
pack
echo "suite done in $(( $(date +%s) - T0 )) s; \$OUT: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # let tee finish suite.log before the call returns
