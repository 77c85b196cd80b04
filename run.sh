#!/usr/bin/env bash
# Fine-tune one MoLE adapter. Edit the settings below (or set them in the environment), then:
#   bash run.sh                      # the paper's recipe on Qwen3-1.7B, ARC-Challenge, LD-MoLE
#   DATA_DIR=/path/to/data MODEL=smollm2_135m bash run.sh      # offline: local data, the converted SmolLM2
#   bash run.sh max_steps=100 mole.num_experts=4               # extra key=value pass through
#   bash run.sh imports=my_routers.py mole.router=my_router  # a router of your own (docs/extending.md)
# An empty setting keeps the value of the config files (configs/models/, methods/) or the default
# (ldmole-train --help and docs/config.md list every key). Relative paths are relative to this folder.
set -euo pipefail

# Counts must be plain digits: bash arithmetic below would evaluate any other text as an expression
# (which can run a command), so they are checked before anything else runs.
check_count() {  # check_count NAME MIN: NAME, when set, is a plain integer >= MIN, normalised to base 10
  local value=${!1:-} what="a non-negative integer"
  [ "$2" -ge 1 ] && what="a positive integer"
  [ -z "$value" ] && return 0
  if ! [[ $value =~ ^[0-9]+$ ]] || [ "$((10#$value))" -lt "$2" ]; then
    echo "run.sh: $1='$value' must be $what" >&2
    exit 2
  fi
  printf -v "$1" '%d' "$((10#$value))"
}
check_count NUM_GPUS 0; check_count BATCH_SIZE 1; check_count PER_DEVICE_BATCH_SIZE 1

cd "$(dirname "$0")"

MODEL=${MODEL:-qwen3_1.7b}          # configs/models/*.yaml
TASK=${TASK:-arc_c}                 # arc_c arc_e csqa obqa hellaswag swag mmlu_pro cola rte mrpc
METHOD=${METHOD:-ldmole}            # configs/methods/*.yaml: ldmole ldmole_reference ldmole_sparse_k2 sparsegen_fixed mola_8888 mola_2468 remole softmax lora
SEED=${SEED:-42}
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
DATA_DIR=${DATA_DIR:-}              # empty: Hugging Face hub; else DIR/<name>/<split>.jsonl
TOKENIZER=${TOKENIZER:-}            # empty: the model's own tokenizer
OUTPUT_DIR=${OUTPUT_DIR:-}          # empty: runs/<model>/<task>/<method>/seed<seed>
NUM_EPOCHS=${NUM_EPOCHS:-}          # empty: 10 (3 for llama3.1_8b)
BATCH_SIZE=${BATCH_SIZE:-}          # global batch; empty: 16
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-}  # empty: at most 4, dividing BATCH_SIZE / processes
LR=${LR:-}                          # empty: 1e-4
LB_COEF=${LB_COEF:-}                # load-balance coefficient; empty: the method's value
SPARSITY_COEF=${SPARSITY_COEF:-}    # analytic sparsity loss coefficient; empty: the method's value (0)
SPARSITY_K=${SPARSITY_K:-}          # target number of experts of the sparsity loss; empty: 2
SAVE_EVERY=${SAVE_EVERY:-}          # checkpoint every N steps (resume with RESUME=auto); empty: off
RESUME=${RESUME:-}                  # auto: continue from the newest checkpoint of the output dir
MIXED_PRECISION=${MIXED_PRECISION:-}  # empty: bf16 on GPUs, no on CPU (REPLICATE=reference: its fp16)
REPLICATE=${REPLICATE:-}            # reference: the reference release's exact setting in one switch (README)

args=(model="$MODEL" task="$TASK" method="$METHOD" seed="$SEED")
add() { [ -n "$2" ] && args+=("$1=$2"); return 0; }
add data_dir "$DATA_DIR"; add tokenizer "$TOKENIZER"; add output_dir "$OUTPUT_DIR"
add num_epochs "$NUM_EPOCHS"; add batch_size "$BATCH_SIZE"; add per_device_batch_size "$PER_DEVICE_BATCH_SIZE"
add lr "$LR"; add lb_coef "$LB_COEF"; add sparsity_coef "$SPARSITY_COEF"; add sparsity_k "$SPARSITY_K"
add save_every "$SAVE_EVERY"; add resume "$RESUME"; add replicate "$REPLICATE"

# The global batch must split evenly: processes x per-device batch x accumulation = BATCH_SIZE.
# 16 splits over 1, 2, 4 or 8 GPUs; on 3, 5, 6 or 7 the largest count that divides it is used.
global=${BATCH_SIZE:-16}
procs=1
if [ "$NUM_GPUS" -gt 0 ]; then
  procs=$NUM_GPUS
  while [ $((global % procs)) -ne 0 ]; do procs=$((procs - 1)); done
  if [ "$procs" -ne "$NUM_GPUS" ]; then
    echo "run.sh: a global batch of $global cannot be split evenly over $NUM_GPUS GPUs; using $procs of them" \
         "(set BATCH_SIZE to a multiple of $NUM_GPUS to use all)" >&2
  fi
fi
if [ -z "$PER_DEVICE_BATCH_SIZE" ]; then  # at most 4 per process, the rest by gradient accumulation
  per=$((global / procs)); [ "$per" -gt 4 ] && per=4
  while [ $((global / procs % per)) -ne 0 ]; do per=$((per - 1)); done
  args+=(per_device_batch_size="$per")
fi
# A replication sets its own precision: run.sh then passes one only when MIXED_PRECISION is set.
precision=${MIXED_PRECISION:-}
if [ "$NUM_GPUS" -gt 0 ]; then
  [ -z "$REPLICATE" ] && precision=${precision:-bf16}
  launch=(accelerate launch --num_processes "$procs" --num_machines 1 ${precision:+--mixed_precision "$precision"}
          --dynamo_backend no --module ldmole.cli.train)
else
  precision=${precision:-no}  # also under REPLICATE: accelerate cannot autocast a CPU to fp16 (nor did the release)
  launch=(python -m ldmole.cli.train)
fi
add mixed_precision "$precision"
# ldmole-sweep reads the arguments alone (NUL-separated) to compare a finished run's config.yaml with them;
# LDMOLE_PRINT_ARGS=launch prints the whole command line the same way (the tests check its batch arithmetic).
if [ "${LDMOLE_PRINT_ARGS:-}" = 1 ]; then printf '%s\0' "${args[@]}" "$@"; exit 0; fi
if [ "${LDMOLE_PRINT_ARGS:-}" = launch ]; then printf '%s\0' "${launch[@]}" "${args[@]}" "$@"; exit 0; fi
exec "${launch[@]}" "${args[@]}" "$@"
