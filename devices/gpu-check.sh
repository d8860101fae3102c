#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, from the repository root, in under 8 minutes on an H100/H200:
#
#     bash devices/gpu-check.sh [WORKDIR]          # default WORKDIR /tmp/edge-vl2-gpu-check
#     bash devices/gpu-check.sh --dry-run [WORKDIR]
#
# --dry-run runs the same steps without a GPU, on test-size checkpoints with the cpu backend and a short prompt (the
# memory-cap configuration is recorded as skipped: it needs CUDA), so the script itself is checked on any machine in
# a few minutes (tests/test_gpu_check.py runs it). No GPU has run the full check yet.
#
# 1. installs edge-vl2 (editable, no dependencies: the machine's torch with CUDA stays) and whatever Python package
#    is missing: from wheels in .whl/ when present (a machine without a registry), else from the package registry;
# 2. makes the full-size synthetic Tiny checkpoint and exports an RTN INT4 bundle (fp16 vision graph, no fidelity
#    pass: it needs the bf16 model in memory); then Small the same way when the time and disk left allow it
#    (estimated from Tiny's measured times: Small has 4.8x the parameters; GPU_CHECK_SMALL=force|skip overrides);
# 3. benchmarks each bundle with the cuda backend (edge_vl2.tools.gpu_check): CUDA graphs off, on, and on under a
#    16 GB PyTorch memory cap with the rtx4060ti-16gb profile (fit check, prefill budget), one photo + 256 text tokens,
#    128 greedy tokens; every configuration in its own process;
# 4. prints one table (and keeps the JSON records in WORKDIR/results.jsonl).
#
# Every step runs under `timeout` with what is left of GPU_CHECK_BUDGET_S (default 480 s); a step that runs out is
# reported and the table printed anyway. Re-running reuses the checkpoints and bundles already in WORKDIR.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
WORK=${1:-${GPU_CHECK_WORK:-/tmp/edge-vl2-gpu-check}}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PY=${PYTHON:-python3}
IMAGE=$REPO/tests/fixtures/images/monday.jpg
RESULTS=$WORK/results.jsonl
SMALL_PARAM_RATIO=4.8  # 16,148,349,504 / 3,370,501,440 parameters (model-facts)
SIZE=${GPU_CHECK_SIZE:-full}  # "test": tiny dimensions, a smoke test of the script in seconds
BACKEND=cuda PROMPT_TOKENS=256 NEW_TOKENS=128
if ((DRY)); then SIZE=test BACKEND=cpu PROMPT_TOKENS=32 NEW_TOKENS=8; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say() { printf '[gpu-check %3ds] %s\n' "$SECONDS" "$*" >&2; }
left() { echo $((BUDGET - SECONDS)); }
record_skip() { printf '{"label": "%s", "skipped": "%s"}\n' "$1" "$2" >>"$RESULTS"; say "$1 skipped: $2"; }

# run LABEL CMD...: the command under the time left; 0 on success, else the reason is recorded
run() {
    local label=$1; shift
    local limit; limit=$(left)
    if ((limit < 10)); then record_skip "$label" "no time left in the ${BUDGET}s budget"; return 1; fi
    timeout "$limit" "$@"
    local rc=$?
    if ((rc == 124)); then record_skip "$label" "ran out of the ${BUDGET}s budget"; return 1; fi
    if ((rc != 0)); then record_skip "$label" "failed (exit $rc): $1 $2 $3"; return 1; fi
}

# ---- 1. environment ---------------------------------------------------------------------------------------------
mkdir -p "$WORK" || exit 2
: >"$RESULTS"
if ((DRY)); then
    say "dry run: test-size checkpoints, cpu backend, no GPU"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || { say "no NVIDIA GPU"; exit 2; }
fi
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (see the device README)
    say "installing carried wheels from .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/edge-vl2-site \
        .whl/*.whl && export PYTHONPATH=/tmp/edge-vl2-site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$($PY - <<'EOF'
import importlib.util
need = {"torch": "torch", "triton": "triton", "onnx": "onnx", "onnxscript": "onnxscript", "onnx_ir": "onnx-ir",
        "onnxruntime": "onnxruntime", "safetensors": "safetensors", "tokenizers": "tokenizers", "PIL": "pillow",
        "click": "click", "numpy": "numpy"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    say "installing missing packages from the registry: $missing"
    $PY -m pip install -q $missing || { say "cannot install $missing (no registry? carry them as wheels in .whl/)"; exit 2; }
fi
if ! $PY -c "import edge_vl2.export" 2>/dev/null; then
    say "installing edge-vl2 (editable, --no-deps)"
    $PY -m pip install -q --no-deps --no-build-isolation -e "$REPO" || exit 2
fi
DRY=$DRY $PY - >&2 <<'EOF' || exit 2
import os, torch, onnxruntime
from edge_vl2.quant.linear import available_backends
dry = os.environ["DRY"] == "1"
assert dry or torch.cuda.is_available(), "torch sees no CUDA device"
device = "the CPU (dry run)" if dry else torch.cuda.get_device_name()
print(f"torch {torch.__version__} on {device}; cuda backend: {available_backends()['cuda'].detail}; "
      f"onnxruntime {onnxruntime.__version__} providers {onnxruntime.get_available_providers()}")
EOF
say "disk free in $WORK: $(df -BG --output=avail "$WORK" | tail -1 | tr -d ' ')"

# ---- 2-3. per model: checkpoint, bundle, benchmark ---------------------------------------------------------------
model() {  # model VARIANT: returns 0 when its bundle exists
    local v=$1 ckpt=$WORK/$1 bundle=$WORK/$1-int4
    if [ ! -d "$ckpt" ] && [ ! -d "$bundle" ]; then
        say "$v: synthetic $SIZE-size checkpoint"
        run "$v" $PY -m edge_vl2.cli synth --variant "$v" --size "$SIZE" --out "$ckpt" >/dev/null || return 1
    fi
    if [ ! -d "$bundle" ]; then
        say "$v: RTN INT4 bundle (fp16 vision graph, no fidelity pass)"
        run "$v" $PY -m edge_vl2.cli export --model "$ckpt" --recipe int4 --method rtn --vision fp16 \
            --fidelity-samples 0 --max-memory-gb 120 --out "$bundle" >&2 || return 1  # stdout: the table only
        [ -n "${GPU_CHECK_KEEP:-}" ] || rm -rf "$ckpt"  # the bundle is all the benchmark needs: free the disk
    fi
}
bench() {  # bench VARIANT
    say "$1: benchmark (graphs off / on / on under a 16 GB cap)"
    run "$1" $PY -m edge_vl2.tools.gpu_check run "$WORK/$1-int4" "$1-int4" --image "$IMAGE" \
        --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --backend "$BACKEND" >>"$RESULTS"
}

t0=$SECONDS
model tiny && { t_tiny=$((SECONDS - t0)); b0=$SECONDS; bench tiny; t_bench=$((SECONDS - b0)); }

case ${GPU_CHECK_SMALL:-auto} in
    skip) record_skip small "GPU_CHECK_SMALL=skip" ;;
    force) model small && bench small ;;
    *)
        avail=$(df -BG --output=avail "$WORK" | tail -1 | tr -dc 0-9)
        if ((DRY)); then  # test size: seconds, whatever the disk
            model small && bench small
        elif [ -d "$WORK/small-int4" ]; then
            bench small
        elif ((avail < 45)); then
            record_skip small "needs ~45 GB of disk (32 GB checkpoint + 9.5 GB bundle), ${avail} GB free"
        elif [ -z "${t_tiny:-}" ]; then
            record_skip small "Tiny did not complete"
        else
            need=$(awk -v t="$t_tiny" -v b="${t_bench:-60}" -v r=$SMALL_PARAM_RATIO 'BEGIN {printf "%d", t * r + 2 * b}')
            if ((need > $(left))); then
                record_skip small "estimated ${need}s (4.8x Tiny's ${t_tiny}s checkpoint+export, 2x its benchmark) > $(left)s left of ${BUDGET}s; GPU_CHECK_SMALL=force runs it"
            else
                model small && bench small
            fi
        fi
        ;;
esac

# ---- 4. the table ------------------------------------------------------------------------------------------------
say "done in ${SECONDS}s of ${BUDGET}s"
$PY -m edge_vl2.tools.gpu_check table "$RESULTS"
