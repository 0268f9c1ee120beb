#!/usr/bin/env bash
# One GPU check of hf_mfac, for the first run on a GPU machine (one H100/H200: under 8 minutes in all).
#
#   bash benchmarks/gpu_check.sh             # set up, then run every part
#   bash benchmarks/gpu_check.sh --dry-run   # say what it would install and run; installs and runs nothing
#   bash benchmarks/gpu_check.sh --parts build,tests
#
# It needs only this repository and python3 (with venv) on the machine. Setup: the interpreter in $PYTHON
# when set (used as is); else the venv $GPU_CHECK_VENV (default build/gpu-venv) when it already has a CUDA
# torch and the test dependencies; else it creates that venv (with python3's site packages when python3
# already has a CUDA torch) and runs `pip install torch` (from $TORCH_INDEX_URL when set, e.g. to match an
# older local CUDA toolkit), then `pip install -e ".[test]"` (pytest, ninja, transformers, ...). The CUDA
# kernels are JIT-built with the toolkit torch finds (CUDA_HOME, nvcc on PATH or /usr/local/cuda).
#
# Parts (benchmarks/gpu_check.py runs each under its own time budget; a part that would not get its
# minimum before the deadline is skipped): env, build (hf_mfac.kernels.build_kernels: the timed JIT build
# and the self-check of every kernel and dtype), tests (CUDA tests), bench_kernels (coefficient setup
# m = 256..4096 vs torch and the paper's 2 ms at m = 1024; window products and DynamicMFAC.update_mul at
# BERT-mini d, m = 1024, fp32 and bf16, against the copy bandwidth of the same run), bench_optim (M-FAC
# step vs AdamW step), bench_core (block-Fisher add_grads + invert vs the bare fp32 batched GEMM at d = 2^22),
# sparse24 (2:4 export and its speed vs dense), split (a small BERT dispatched by accelerate between cuda:0
# and the CPU pruned as it is, and its Fisher placed over both: plans, estimated and measured peak per
# device, masks against a CPU-only run, hooks and forward after).
#
# Output: gpu_check.md (one Markdown block for benchmarks/RESULTS.md), gpu_check.json and gpu_check.log in
# $OUT when set, else outputs/gpu_check/. Exit status 0 when every part ran and passed.
# Env: OUT, PYTHON, GPU_CHECK_VENV, TORCH_INDEX_URL, GPU_CHECK_BUDGET_S (all parts and setup, default 470),
# GPU_CHECK_SETUP_S (the installs, default 240).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

DRY=0
PARTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --parts) [ $# -ge 2 ] || { echo "gpu_check: --parts needs a value" >&2; exit 2; }; PARTS=(--parts "$2"); shift ;;
    --parts=*) PARTS=(--parts "${1#--parts=}") ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

BUDGET=${GPU_CHECK_BUDGET_S:-470}
SETUP_S=${GPU_CHECK_SETUP_S:-240}
DEADLINE=$((START + BUDGET))
OUT_DIR=${OUT:-$PWD/outputs/gpu_check}
VENV=${GPU_CHECK_VENV:-$PWD/build/gpu-venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
INDEX=()
[ -n "${TORCH_INDEX_URL:-}" ] && INDEX=(--index-url "$TORCH_INDEX_URL")
DRIVER_PY=$(command -v python3 || command -v python || true)
[ -n "$DRIVER_PY" ] || { echo "gpu_check: no python3 on this machine" >&2; exit 1; }

log() { echo "gpu_check: $*" >&2; }
has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
has_deps() { "$1" -c 'import hf_mfac, pytest, ninja, transformers' >/dev/null 2>&1; }

# --- choose (or plan) the environment ------------------------------------------------------------------
SETUP=none
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON; PLAN="use PYTHON=$PYTHON as it is (no install)"
elif [ -x "$VENV/bin/python" ] && has_cuda_torch "$VENV/bin/python" && has_deps "$VENV/bin/python"; then
  PY=$VENV/bin/python; PLAN="reuse $VENV (CUDA torch and the test dependencies are there)"
else
  PY=$VENV/bin/python
  SYS_SITE=()
  if has_cuda_torch "$DRIVER_PY"; then
    SYS_SITE=(--system-site-packages); SETUP=deps
    PLAN="create $VENV with --system-site-packages ($DRIVER_PY has a CUDA torch); pip install -e \".[test]\""
  else
    SETUP=full
    PLAN="create $VENV; pip install torch${INDEX[*]:+ ${INDEX[*]}}; pip install -e \".[test]\" (pytest, ninja, transformers, ...)"
  fi
fi

if [ "$DRY" = 1 ]; then
  echo "gpu_check (dry run), budget ${BUDGET} s in all (installs: up to ${SETUP_S} s)"
  echo "  setup: $PLAN"
  echo "  GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1 | grep . || echo "none found by nvidia-smi")"
  echo "  nvcc: $(command -v nvcc || echo "not on PATH (CUDA_HOME=${CUDA_HOME:-unset}; torch also looks in /usr/local/cuda)")"
  # the driver lists the parts; it needs no third-party package
  exec "$DRIVER_PY" benchmarks/gpu_check.py --dry-run --python "$PY" --out "$OUT_DIR" --deadline "$DEADLINE" \
    "${PARTS[@]}"
fi

# --- set up --------------------------------------------------------------------------------------------
SETUP_ERR=""
if [ "$SETUP" != none ]; then
  log "setup: $PLAN"
  SETUP_END=$((START + SETUP_S))
  left() { local l=$((SETUP_END - $(date +%s))); [ $l -gt 5 ] && echo $l || echo 5; }
  if ! "$DRIVER_PY" -m venv "${SYS_SITE[@]}" "$VENV"; then
    SETUP_ERR="python3 -m venv $VENV failed (install python3-venv)"
  elif [ "$SETUP" = full ] && ! timeout "$(left)" "$VENV/bin/pip" install -q torch "${INDEX[@]}"; then
    SETUP_ERR="pip install torch${INDEX[*]:+ ${INDEX[*]}} failed or took over ${SETUP_S} s (no network? set PYTHON to an env with a CUDA torch)"
  elif ! timeout "$(left)" "$VENV/bin/pip" install -q -e ".[test]"; then
    SETUP_ERR="pip install -e .[test] failed or took over ${SETUP_S} s"
  fi
  log "setup: ${SETUP_ERR:-done} after $(( $(date +%s) - START )) s"
fi
if [ -z "$SETUP_ERR" ] && ! has_cuda_torch "$PY"; then
  log "warning: torch in $PY sees no CUDA GPU; the CUDA parts will say so"
fi

ARGS=(--python "$PY" --out "$OUT_DIR" --deadline "$DEADLINE" --started "$START" "${PARTS[@]}")
[ -n "$SETUP_ERR" ] && ARGS+=(--setup-error "$SETUP_ERR")
"$DRIVER_PY" benchmarks/gpu_check.py "${ARGS[@]}"
