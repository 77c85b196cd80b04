#!/usr/bin/env bash
# Fine-tune one MoLE adapter. Edit the settings below (or set them in the environment), then:
#   bash run.sh                      # the paper's setting: Qwen3-1.7B, ARC-Challenge, LD-MoLE
#   DATA_DIR=../shared/data MODEL=smollm2_135m bash run.sh     # offline, on the bundled real data
#   bash run.sh max_steps=100 mole.num_experts=4               # extra key=value pass through
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-qwen3_1.7b}          # configs/models/*.yaml
TASK=${TASK:-arc_c}                 # configs/tasks/*.yaml
METHOD=${METHOD:-ldmole}            # configs/methods/*.yaml: ldmole sparsegen_fixed mola_8888 mola_2468 remole softmax lora
SEED=${SEED:-42}
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
DATA_DIR=${DATA_DIR:-}              # empty: Hugging Face hub; else DIR/<name>/<split>.jsonl
TOKENIZER=${TOKENIZER:-}            # empty: the model's own tokenizer
OUTPUT_DIR=${OUTPUT_DIR:-}          # empty: runs/<model>/<task>/<method>/seed<seed>
NUM_EPOCHS=${NUM_EPOCHS:-10}
BATCH_SIZE=${BATCH_SIZE:-16}        # global batch
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
LR=${LR:-1e-4}
LB_COEF=${LB_COEF:-}                # load-balance coefficient (empty: the method's value)
SPARSITY_COEF=${SPARSITY_COEF:-}    # analytic sparsity loss coefficient (empty: the method's value)
SPARSITY_K=${SPARSITY_K:-2}         # target number of experts for the sparsity loss
MIXED_PRECISION=${MIXED_PRECISION:-}  # empty: bf16 on GPUs, no on CPU

args=(model="$MODEL" task="$TASK" method="$METHOD" seed="$SEED" num_epochs="$NUM_EPOCHS"
      batch_size="$BATCH_SIZE" per_device_batch_size="$PER_DEVICE_BATCH_SIZE" lr="$LR" sparsity_k="$SPARSITY_K")
[ -n "$DATA_DIR" ] && args+=(data_dir="$DATA_DIR")
[ -n "$TOKENIZER" ] && args+=(tokenizer="$TOKENIZER")
[ -n "$OUTPUT_DIR" ] && args+=(output_dir="$OUTPUT_DIR")
[ -n "$LB_COEF" ] && args+=(lb_coef="$LB_COEF")
[ -n "$SPARSITY_COEF" ] && args+=(sparsity_coef="$SPARSITY_COEF")

if [ "$NUM_GPUS" -gt 0 ]; then
  args+=(mixed_precision="${MIXED_PRECISION:-bf16}")
  exec accelerate launch --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision "${MIXED_PRECISION:-bf16}" \
    --dynamo_backend no scripts/train.py "${args[@]}" "$@"
else
  args+=(mixed_precision="${MIXED_PRECISION:-no}")
  exec python scripts/train.py "${args[@]}" "$@"
fi
