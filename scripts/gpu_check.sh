#!/usr/bin/env bash
# The GPU check: everything this repository has to verify on one CUDA GPU (H100 / H200), in at most 8 minutes.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR: default $OUT, else ./gpu_check_out
#
# Parts, in order, each with its own time limit (cut to what is left of the 8 minutes):
#   cuda_tests           python -m pytest -m cuda tests   (bf16 layer, routing, backward, a short bf16 run)
#   bench_layer          ldmole-bench-layer in bf16 at Qwen3-1.7B's projection shapes
#   bench_step_eager     ldmole-bench-step: Qwen3-1.7B widths, all 28 layers, batch 16 x 256, bf16, every method
#   fsdp                 the trainer under accelerate FSDP2 on one GPU: trains, saves, the adapter reproduces
#                        the logits (scripts/gpu_check.py)
#   bench_step_compiled  ldmole-bench-step as above with --compile, LoRA r=64 and LD-MoLE only
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (commit, GPU, each part's status, the tables), each
# part's log and JSON. Exit status 0 only when every part passed; without CUDA it stops at once (exit 2).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu_check_out}}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, installed or not

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 || \
   ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi or torch.cuda.is_available() says none); nothing was run." >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/parts.tsv"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-470}))   # 8 minutes, less the report

part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND under its limit, output to OUT_DIR/NAME.log
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) start=$SECONDS rc
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$OUT_DIR/parts.tsv"
    return
  fi
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$OUT_DIR/parts.tsv"
  echo "   exit $rc after $((SECONDS - start)) s"
}

STEP=("$PYTHON" -m ldmole.cli.bench_step --model qwen3_1.7b_widths --layers 28 --device cuda --dtype bfloat16
      --data random --batch 16 --seq-len 256)
part cuda_tests 150 "$PYTHON" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml "$OUT_DIR/cuda_tests.xml"
part bench_layer 90 "$PYTHON" -m ldmole.cli.bench_layer --device cuda --dtype bfloat16 --json "$OUT_DIR/bench_layer.json"
part bench_step_eager 180 "${STEP[@]}" --steps 5 --warmup 2 --json "$OUT_DIR/bench_step_eager.json"
part fsdp 100 "$PYTHON" scripts/gpu_check.py fsdp "$OUT_DIR/fsdp"
part bench_step_compiled 200 "${STEP[@]}" --compile --methods lora_r64,ldmole --steps 5 --warmup 2 \
     --json "$OUT_DIR/bench_step_compiled.json"
"$PYTHON" scripts/gpu_check.py report "$OUT_DIR"
