#!/usr/bin/env bash
# The attention scaling sweep on one GPU (written for a lent H100), bf16, results under $OUT.
#
# Setup, from the repository root, on a machine with CUDA 12 drivers:
#   pip install -r requirements.txt && pip install -U "jax[cuda12]>=0.10.0,<0.12"
# (the device machines have no network: install before, or carry a prepared virtualenv). On the
# lent H200 of 2026-11-30 (Python 3.12 with jax 0.11.2 + CUDA 13, flax, optax, orbax already
# installed) it was enough to carry py3.12 wheels of ml-collections, grain, array-record and
# portpicker (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`), install
# them with `pip install --no-index --no-deps --target /tmp/site` and set
# PYTHONPATH=/tmp/site:$PWD; benchmarks/RESULTS.md has what that run measured.
#
# The lent GPU's fifteen minutes (issue 26; benchmarks/reproduce_gpu.py, each under 9 minutes,
# resumable: rerun the same command to continue; benchmarks/RESULTS.md "Ready to run on a lent
# GPU" has the device command):
#   OUT=/tmp/out bash benchmarks/run_gpu.sh reproduce   # setup, ListOps data, published ListOps rows
#   OUT=/tmp/out bash benchmarks/run_gpu.sh speed       # Text model 2K/3K, cuDNN/flash 4K, linear 2K-4K
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/run_gpu.sh reproduce   # CPU, tiny (the test suite's)
# Wheels the image lacks: `bash benchmarks/gpu_wheels.sh` here fills benchmarks/gpu_wheels/
# (ignored, 4.5 MiB); carried along, they are installed into /tmp/site when imports fail.
# WORK (default $OUT): data, checkpoints and resumable state (on a device: /tmp/luna26, kept
# while the machine is held; $OUT then gets the small files). REPRO_ARGS passes more flags to
# reproduce_gpu.py (e.g. "--only small_softmax_s0 --budget-s 300").
#
# Run, from the repository root (each phase is sized for one ~10-minute command; "all" runs
# them in order; a phase's JSON is rewritten after every point, so an interrupted phase keeps
# what it measured):
#   OUT=/tmp/out bash benchmarks/run_gpu.sh model-quadratic   # softmax (XLA), luna:16/128/256
#   OUT=/tmp/out bash benchmarks/run_gpu.sh model-linear      # the linear mechanisms
#   OUT=/tmp/out bash benchmarks/run_gpu.sh model-fast        # softmax cuDNN, luna --luna-flash
#   OUT=/tmp/out bash benchmarks/run_gpu.sh layer-xla         # one layer, 1K..64K, all mechanisms
#   OUT=/tmp/out bash benchmarks/run_gpu.sh layer-fast        # one layer, cuDNN / flash paths
#   OUT=/tmp/out bash benchmarks/run_gpu.sh merge             # combined tables and plots
#
# model-*: the LRA Table 2 Text classifier (4 layers, D=256, 4 heads, MLP 1024, batch 32, AdamW
# train step) at 1K-4K; layer-*: one attention layer fwd+bwd, batch 8, D=256, 4 heads.
# Overrides: PYTHON, DTYPE (bfloat16), REPEATS (5), MAX_SECONDS (60, per point: once a point
# takes longer, compilation included, the longer lengths of that mechanism are skipped; the
# Text model compiles in 12-23 s on an H200, so 20 s skipped every model point after 1K), ISOLATE=1
# (a fresh process per point: exact device peak memory, slower), EXTRA (more flags, after the
# phase's own, so they win), SKIP_GPU_CHECK=1 (CPU dry run), e.g.
#   SKIP_GPU_CHECK=1 DTYPE=float32 REPEATS=1 OUT=/tmp/dry EXTRA="--lengths 64,128 --dim 16 \
#     --heads 2 --batch 1 --layers 1 --matmul-size 128 --xla-fast-compile" \
#     bash benchmarks/run_gpu.sh model-fast
set -euo pipefail

PHASE="${1:-all}"
OUT="${OUT:?set OUT to the output directory}"
PYTHON="${PYTHON:-python}"
DTYPE="${DTYPE:-bfloat16}"
REPEATS="${REPEATS:-5}"
MAX_SECONDS="${MAX_SECONDS:-60}"
# Let XLA use most of the GPU (its default is 75%); points above this budget are "oom" rows.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

cd "$(dirname "$0")/.."
mkdir -p "$OUT"

MODEL_LENGTHS="1024,2048,3072,4096"
LAYER_LENGTHS="1024,2048,4096,8192,16384,32768,65536"
LINEAR="cheap_linear,linear_elu,performer,learned_kernel,cosformer"
LUNA="luna:16,luna:128,luna:256"

bench() {  # bench NAME ARGS...: one benchmark run, outputs $OUT/NAME.{json,md,png,log}
  local name="$1"
  shift
  local iso=()
  if [[ "${ISOLATE:-0}" == "1" ]]; then iso=(--isolate); fi
  echo "=== $name: $*" | tee "$OUT/$name.log"
  "$PYTHON" -m benchmarks.attention_scaling --dtype "$DTYPE" --repeats "$REPEATS" --warmup 2 \
      --max-seconds-per-point "$MAX_SECONDS" "${iso[@]}" "$@" ${EXTRA:-} \
      --json "$OUT/$name.json" --markdown "$OUT/$name.md" --plot "$OUT/$name.png" \
      2>&1 | tee -a "$OUT/$name.log" || echo "=== $name exited with an error" | tee -a "$OUT/$name.log"
}

merge() {  # merge NAME INPUT_NAMES...: combined table and plot of earlier runs that exist
  local name="$1"
  shift
  local inputs=()
  for n in "$@"; do
    if [[ -f "$OUT/$n.json" ]]; then inputs+=("$OUT/$n.json"); fi
  done
  if [[ ${#inputs[@]} -eq 0 ]]; then
    echo "merge $name: no inputs yet"
    return 0
  fi
  "$PYTHON" -m benchmarks.attention_scaling --merge "${inputs[@]}" --compare-speedup softmax \
      --json "$OUT/$name.json" --markdown "$OUT/$name.md" --plot "$OUT/$name.png" \
      > "$OUT/$name.log" 2>&1
  echo "merged ${inputs[*]} -> $OUT/$name.{json,md,png}"
}

setup_wheels() {  # the carried wheels (benchmarks/gpu_wheels.sh), where the image lacks them
  if "$PYTHON" -c "import ml_collections, grain, tensorboardX" 2>/dev/null; then return 0; fi
  if compgen -G "benchmarks/gpu_wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site benchmarks/gpu_wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed benchmarks/gpu_wheels into /tmp/site"
  else
    echo "missing ml_collections/grain/tensorboardX and no benchmarks/gpu_wheels (gpu_wheels.sh)" >&2
  fi
}

reproduce() {  # reproduce|speed: benchmarks/reproduce_gpu.py, its output under $OUT
  local dry=()
  if [[ "${DRY_RUN:-0}" == "1" ]]; then dry=(--dry-run); fi
  "$PYTHON" -m benchmarks.reproduce_gpu "$1" --out "$OUT" --work "${WORK:-$OUT}" "${dry[@]}" \
      ${REPRO_ARGS:-} \
      2>&1 | tee -a "$OUT/$1.log"
}

check_gpu() {
  if [[ "${SKIP_GPU_CHECK:-0}" == "1" ]]; then return 0; fi
  "$PYTHON" - <<'EOF'
import jax
if jax.default_backend() != "gpu":
  raise SystemExit(f"no GPU backend (got {jax.default_backend()!r}); "
                   "install jax[cuda12] (see the header of benchmarks/run_gpu.sh)")
d = jax.devices()[0]
print(f"jax {jax.__version__} on {d.device_kind}; memory {d.memory_stats().get('bytes_limit', 0) / 2**30:.1f} GiB for XLA")
EOF
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
}

run_phase() {
  case "$1" in
    model-quadratic)
      bench model_quadratic --mode model --lengths "$MODEL_LENGTHS" \
          --mechanisms "softmax,$LUNA" --softmax-impl xla ;;
    model-linear)
      bench model_linear --mode model --lengths "$MODEL_LENGTHS" --mechanisms "$LINEAR" ;;
    model-fast)
      bench model_fast --mode model --lengths "$MODEL_LENGTHS" \
          --mechanisms "softmax,$LUNA" --softmax-impl cudnn --luna-flash ;;
    layer-xla)
      bench layer_xla --mode layer --batch 8 --lengths "$LAYER_LENGTHS" \
          --mechanisms "softmax,$LUNA,$LINEAR" --softmax-impl xla ;;
    layer-fast)
      bench layer_fast --mode layer --batch 8 --lengths "$LAYER_LENGTHS" \
          --mechanisms "softmax,$LUNA" --softmax-impl cudnn --luna-flash ;;
    reproduce|speed)
      reproduce "$1" ;;
    merge)
      merge model_all model_quadratic model_linear model_fast
      merge layer_all layer_xla layer_fast ;;
    *)
      echo "unknown phase $1 (reproduce, speed, model-quadratic, model-linear, model-fast," \
           "layer-xla, layer-fast, merge, all)" >&2
      exit 2 ;;
  esac
}

setup_wheels
if [[ "$PHASE" != "merge" && "$PHASE" != "reproduce" && "$PHASE" != "speed" ]]; then check_gpu; fi
if [[ "$PHASE" == "all" ]]; then
  for p in model-quadratic model-linear model-fast layer-xla layer-fast merge; do
    run_phase "$p"
  done
else
  run_phase "$PHASE"
fi
