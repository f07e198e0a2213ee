#!/usr/bin/env bash
# One prepared GPU check of the Triton kernels (issue 13): under 8 minutes on one H100/H200, nothing downloaded.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere (CPU): stage the package, print the plan, validate each step
#
# Steps, each under `timeout` and a total budget (GPU_CHECK_BUDGET_S, default 450 s; a step that would start
# after it is skipped and says so):
#   1. correctness   benchmarks/gpu_check.py: compiled kernels vs float64 F.conv2d (fp16, bf16, tf32, fp32,
#                    NCHW and channels_last, fused and split, ragged, backward; the autotune-key regression)
#   2. configs       benchmarks/kernel_speed.py --check-configs: every autotune config of every kernel, 3 dtypes
#   3. kernels       benchmarks/kernel_speed.py, MobileNet layers, N=64, fp16: Triton vs eager cuDNN NCHW / channels_last
#   4. max-autotune  benchmarks/kernel_speed.py, the first 2 of those cases vs torch.compile default and max-autotune
#   5. end to end    benchmarks/kernel_speed.py --e2e: rewritten ResNet-50 / VGG-16 (rank 4, N=8, fp16, triton backend)
#   6. low rank      benchmarks/lowrank_gemm.py: LowRankLinear (two cuBLAS GEMMs) vs nn.Linear, fp16, achieved GB/s
# The package is not installed there: the script copies dsrewrite/, kernels/ (as dsrewrite/kernels), tests/,
# benchmarks/ and pyproject.toml into a scratch folder and runs from it, as `pip install` would lay them out.
# Logs and JSON go to $OUT when set (the device tool brings that folder back), else to the scratch folder.
set -u -o pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOGS="${OUT:-$STAGE/out}"
mkdir -p "$LOGS"

# stage the package (dsrewrite.kernels lives in kernels/ and is mapped by pyproject.toml only when installed)
cp -r "$REPO/dsrewrite" "$REPO/tests" "$REPO/benchmarks" "$REPO/pyproject.toml" "$STAGE/"
rm -rf "$STAGE/dsrewrite/kernels"
cp -r "$REPO/kernels" "$STAGE/dsrewrite/kernels"
cd "$STAGE" || exit 1
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$STAGE/triton-cache"
unset TRITON_INTERPRET

echo "# GPU check of the Triton kernels ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
echo
"$PY" - <<'PYEOF'
import platform, torch, triton
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"- device: {dev}; torch {torch.__version__}; Triton {triton.__version__}; Python {platform.python_version()}")
PYEOF
[[ -n "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" ]] && echo "- commit: $(git -C "$REPO" rev-parse --short HEAD)"
echo "- command: bash benchmarks/gpu_check.sh $*; budget ${BUDGET} s"
echo

START=$SECONDS
FAILED=()
step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  echo "## $name"
  echo
  echo "\$ $*"
  if (( DRY )); then
    echo "(dry run: not run; timeout ${limit} s)"
    echo
    return 0
  fi
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 20 )); then
    echo "SKIPPED: ${left} s of the budget left"; echo; FAILED+=("$name (skipped)"); return 0
  fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo
  echo "($name: exit $rc after $(( SECONDS - t0 )) s$( (( rc == 124 || rc == 137 )) && echo ", TIMED OUT at ${limit} s"))"
  echo
  (( rc != 0 )) && FAILED+=("$name (exit $rc)")
  return 0
}

BENCH=(benchmarks/kernel_speed.py --suite mobilenet --n 64 --dtype fp16)
step correctness 120 "$PY" benchmarks/gpu_check.py
step configs 80 "$PY" benchmarks/kernel_speed.py --check-configs
step kernels 130 "$PY" "${BENCH[@]}" --variants eager_nchw eager_cl triton_nchw triton_cl triton_fused triton_split \
  --out "$LOGS/kernels.json"
step max-autotune 70 "$PY" "${BENCH[@]}" --limit 2 --variants eager_cl compile compile_max triton_cl \
  --out "$LOGS/kernels_compile.json"
step end-to-end 90 "$PY" benchmarks/kernel_speed.py --suite mobilenet --n 8 --dtype fp16 --limit 1 --variants triton_cl \
  --ranks 4 --e2e --out "$LOGS/e2e.json"
step low-rank 45 "$PY" benchmarks/lowrank_gemm.py --device cuda --dtype fp16 --out "$LOGS/lowrank_gemm.json"

if (( DRY )); then
  # validate what can be validated without a GPU, in one process: the staged package imports, the scripts parse
  "$PY" - "${BENCH[@]:1}" <<'PYEOF' | grep -E '^[0-9]+ cases' || FAILED+=("dry-run validation")
import sys
sys.path.insert(0, "benchmarks")
import gpu_check
import kernel_speed as bench
import lowrank_gemm  # noqa: F401 - step 6 imports and parses
assert gpu_check.main(["--dry-run"]) == 0
assert bench.main(sys.argv[1:] + ["--dry-run"]) == 0
PYEOF
  rm -rf "$STAGE"
  echo "total: $(( SECONDS - START )) s"
else
  echo "total: $(( SECONDS - START )) s; logs in $LOGS"
fi
if (( ${#FAILED[@]} )); then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all steps passed"
