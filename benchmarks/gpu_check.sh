#!/usr/bin/env bash
# One command for a CUDA machine: the GPU tests and every GPU benchmark, in <= 8 minutes.
#
#   bash benchmarks/gpu_check.sh                 # writes benchmarks/out/gpu/{summary.md,summary.json,...}
#   OUT=/some/dir PYTHON=python3 bash benchmarks/gpu_check.sh
#
# Steps (each under its own timeout; a step that fails or times out is reported, the rest still run):
#   tests     pytest -m gpu (TRITON_INTERPRET=0: Triton kernels compiled for the GPU)        180 s
#   swa       SWA decode kernel at 32k context vs SDPA, and one decode site per policy (alisa,
#             quest, recall: scorer + pick + attend) at 8k and 32k, batch 4, vs SDPA
#             (benchmarks/bench_swa.py, GPU part)                                             110 s
#   anda      Anda GEMM/GEMV vs cuBLAS FP16 and torch's int4 weight-only kernel
#             (aten._weight_int4pack_mm), rows 1, 4, 16 (decode) and 512 (prefill), N = K = 4096
#                                                                                              120 s
#   offload   attention offload over NCCL, only with >= 2 GPUs (bench_offload.py --transport nccl,
#             if that benchmark has an NCCL mode)                                              60 s
# Without a CUDA GPU it says so and exits 0. `gpu_check.sh --setup-only` only does the import set-up
# below and prints how (GPU_CHECK_NO_PIP=1 skips the pip attempt: the shim alone).
#
# llm_compile must import: if it does not already, the script tries
# `pip install --no-deps --no-build-isolation -e .` (needs setuptools, no network), and otherwise
# puts a small import shim on PYTHONPATH (passes/ and codegen/ are installed as llm_compile.passes /
# llm_compile.codegen through setuptools' package-dir, which a plain PYTHONPATH cannot express; the
# shim also declares the torch_dynamo_backends entry point, so backend="llmaccel" resolves).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-benchmarks/out/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
START=$(date +%s)

SETUP_ONLY=0
[ "${1:-}" = "--setup-only" ] && SETUP_ONLY=1  # only make llm_compile importable and say how (tests)
if [ "$SETUP_ONLY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to run."
    echo '{"gpu": false, "note": "no CUDA GPU: nothing run"}' > "$OUT/summary.json"
    exit 0
fi

# ------------------------------------------------------------------ make llm_compile importable
importable() { "$PY" -c "import llm_compile.passes.pipeline, llm_compile.codegen" >/dev/null 2>&1; }
if importable; then
    HOW="already installed"
elif [ "${GPU_CHECK_NO_PIP:-0}" = 0 ] && timeout 120 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 && importable; then
    HOW="pip install --no-deps --no-build-isolation -e ."
else
    SHIM="$OUT/.import_shim"
    mkdir -p "$SHIM/llm_compile_gpu_check_shim-0.dist-info"
    cat > "$SHIM/sitecustomize.py" <<EOF
# gpu_check.sh: map llm_compile.passes / llm_compile.codegen to $ROOT/passes and $ROOT/codegen
import importlib.util, sys
_DIRS = {"llm_compile.passes": "$ROOT/passes", "llm_compile.codegen": "$ROOT/codegen"}
class _Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        d = _DIRS.get(name)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(name, d + "/__init__.py", submodule_search_locations=[d])
sys.meta_path.append(_Finder)
EOF
    printf 'Metadata-Version: 2.1\nName: llm_compile_gpu_check_shim\nVersion: 0\n' \
        > "$SHIM/llm_compile_gpu_check_shim-0.dist-info/METADATA"
    printf '[torch_dynamo_backends]\nllmaccel = llm_compile.backend:llmaccel\n' \
        > "$SHIM/llm_compile_gpu_check_shim-0.dist-info/entry_points.txt"
    export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    HOW="import shim ($SHIM)"
    if ! importable; then
        echo "gpu_check: llm_compile does not import even through the shim; see $OUT/install.log" >&2
        exit 1
    fi
fi
if [ "$SETUP_ONLY" = 1 ]; then
    echo "llm_compile: $HOW"
    [ -n "${SHIM:-}" ] && echo "PYTHONPATH=$PYTHONPATH"
    exit 0
fi
export TRITON_INTERPRET=0
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
echo "gpu_check: $NGPU x $DEVICE; llm_compile: $HOW; output: $OUT"

# ------------------------------------------------------------------ steps
step() {  # step NAME TIMEOUT_S CMD...   -> $OUT/NAME.log, one line in steps.jsonl
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    printf '{"step": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$STEPS"
    tail -n 3 "$OUT/$name.log"
    [ "$rc" = 124 ] && echo "   -> timed out"
    return 0
}

TIMEOUT_ARG=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG=(--timeout 120)
step tests 180 "$PY" -m pytest -q -m gpu tests "${TIMEOUT_ARG[@]}" -p no:cacheprovider --junitxml="$OUT/tests.xml"
step swa 110 "$PY" benchmarks/bench_swa.py --no-cpu --steps 4 --op-context 2048 --gpu-context 32768 \
    --json "$OUT/swa.json"
step anda 120 "$PY" benchmarks/bench_anda.py --quick --out "$OUT/anda.json"
if [ "$NGPU" -ge 2 ]; then
    if "$PY" benchmarks/bench_offload.py --help 2>/dev/null | grep -q -- "--transport"; then
        step offload 60 "$PY" benchmarks/bench_offload.py --transport nccl --json "$OUT/offload.json"
    else
        echo '{"step": "offload", "rc": -1, "seconds": 0, "timeout_s": 0, "note": "bench_offload.py has no --transport nccl mode yet"}' >> "$STEPS"
    fi
else
    echo '{"step": "offload", "rc": -1, "seconds": 0, "timeout_s": 0, "note": "needs 2 GPUs"}' >> "$STEPS"
fi

"$PY" benchmarks/gpu_summary.py "$OUT" --device "$NGPU x $DEVICE" --import-how "$HOW" \
    --total-s "$(( $(date +%s) - START ))"
