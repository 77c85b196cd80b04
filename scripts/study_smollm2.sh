#!/usr/bin/env bash
# The SmolLM2-135M multi-seed study of docs/study_smollm2.md, stage by stage. Every training stage
# goes through ldmole-sweep, so running a stage again skips finished runs and continues the others.
#
#   DATA_DIR=../shared/data bash scripts/study_smollm2.sh                 # every stage, in order
#   DATA_DIR=../shared/data JOBS=8 bash scripts/study_smollm2.sh headline  # one stage, 8 runs at once
#
# Stages: calibration headline ablations figures (default: all four, in that order).
#   calibration  plain LoRA on MRPC and RTE at twice the budget (does the task show learning?)
#   headline     ldmole ldmole_reference lora softmax mola_2468 remole on CoLA, seeds 42 43 44
#   ablations    ldmole_sparse_k2 at several sparsity_coef values, mola_8888, sparsegen_fixed at
#                λ = -1.589 (seed 42)
#   figures      ldmole-plot-routing of the seed-42 runs on the whole validation split, and of the
#                ldmole / ldmole_reference adapters at initialisation
# Settings (environment): ROOT (default runs/study), DATA_DIR (required), JOBS (runs at once, default
# 1; with all 26 training runs side by side on one H200, the mean wall time per run was 364-724 s
# by method: the wall-time columns of docs/study_smollm2.md),
# SEEDS and METHODS (of the headline stage, default 42,43,44 and the six above), SPARSITY_COEFS
# (default "0.03 0.1 0.3 1", the study's), EXTRA
# (key=value overrides added to every run, e.g. EXTRA="max_steps=2" for a smoke test) and
# FIGURE_EXAMPLES (validation examples the figures run, default all).
# Tables afterwards: ldmole-tables $ROOT/smollm2_135m (the sparsity_coef_* folders repeat one method, so
# each is tabled on its own), and ldmole-routing-report on the figures stage's run folders.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${ROOT:-runs/study}
DATA_DIR=${DATA_DIR:?set DATA_DIR to the folder holding glue_cola/, glue_mrpc/, glue_rte/ (e.g. ../shared/data)}
JOBS=${JOBS:-1}
SPARSITY_COEFS=${SPARSITY_COEFS:-0.03 0.1 0.3 1}
SEEDS=${SEEDS:-42,43,44}
METHODS=${METHODS:-ldmole,ldmole_reference,lora,softmax,mola_2468,remole}
# One budget for every run: 250 optimiser steps of 16 examples at lr 5e-4, 200 training examples
# held out for selection, the whole validation split scored at the end, float32 everywhere (the
# CPU calibration's numerics; per-device batch 16 is the same step as 4 x 4 accumulation).
BUDGET=(data_dir="$DATA_DIR" max_steps=250 lr=5e-4 selection_size=200 per_device_batch_size=16 eval_batch_size=32)
read -r -a extra <<< "${EXTRA:-}"
FIGURE_EXAMPLES=${FIGURE_EXAMPLES:-100000}
# λ fixed at -1.589: the constant the reference initialisation trains (docs/study_smollm2.md).
FIXED_LAMBDA=-1.589
export MIXED_PRECISION=no NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(min(1, torch.cuda.device_count()))")}

sweep() { python -m ldmole.cli.sweep --models smollm2_135m --jobs "$JOBS" "$@" ${extra[@]+"${extra[@]}"} || echo "study: a sweep had failures (listed above); rerun the stage to retry them" >&2; }

calibration() {
  sweep --tasks mrpc,rte --methods lora --seeds 42 --root "$ROOT/calibration" "${BUDGET[@]}" max_steps=500
}

headline() {
  sweep --tasks cola --methods "$METHODS" --seeds "$SEEDS" --root "$ROOT" "${BUDGET[@]}"
}

# With JOBS > 1 the commands given to `each` run side by side (then waited for), else one by one.
each() { if [ "$JOBS" -gt 1 ]; then "$@" & else "$@"; fi; }

ablations() {
  for coef in $SPARSITY_COEFS; do
    each sweep --tasks cola --methods ldmole_sparse_k2 --seeds 42 --root "$ROOT/sparsity_coef_$coef" \
      "${BUDGET[@]}" sparsity_coef="$coef"
  done
  each sweep --tasks cola --methods mola_8888 --seeds 42 --root "$ROOT" "${BUDGET[@]}"
  each sweep --tasks cola --methods sparsegen_fixed --seeds 42 --root "$ROOT/fixed_lambda_$FIXED_LAMBDA" "${BUDGET[@]}" \
    mole.fixed_lambda="$FIXED_LAMBDA"
  wait
}

figures() {
  local runs=() run
  for method in ldmole ldmole_reference softmax mola_2468 remole mola_8888; do
    runs+=("$ROOT/smollm2_135m/cola/$method/seed42")
  done
  runs+=("$ROOT/fixed_lambda_$FIXED_LAMBDA/smollm2_135m/cola/sparsegen_fixed/seed42")
  for coef in $SPARSITY_COEFS; do runs+=("$ROOT/sparsity_coef_$coef/smollm2_135m/cola/ldmole_sparse_k2/seed42"); done
  plot() { python -m ldmole.cli.plot_routing "$@" --num-examples "$FIGURE_EXAMPLES" --batch-size 32 --layer 15 --module q_proj \
             > "$1/plot_routing${2:-}.log" 2>&1 || echo "study: plot_routing $* failed (log: $1/plot_routing${2:-}.log)" >&2; }
  for run in "${runs[@]}"; do
    if [ -f "$run/metrics.json" ]; then each plot "$run"; else echo "study: skip figures of $run (not finished)" >&2; fi
  done
  for method in ldmole ldmole_reference; do
    run="$ROOT/smollm2_135m/cola/$method/seed42"
    if [ -f "$run/config.yaml" ]; then each plot "$run" --at-init; fi
  done
  wait
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(calibration headline ablations figures)
for stage in "${stages[@]}"; do
  case "$stage" in
    calibration|headline|ablations|figures) echo "study: stage $stage ($(date +%H:%M:%S))"; "$stage" ;;
    *) echo "study: unknown stage '$stage'; choose from calibration headline ablations figures" >&2; exit 2 ;;
  esac
done
