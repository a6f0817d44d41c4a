#!/usr/bin/env bash
# bash bench/gpu.sh            (one command, < 10 min on one H100; figures on stdout and in $BENCH_DIR/*.json)
#
# LoRA and QLoRA SFT through `finetune train` on an 8B-shaped Llama with random weights (bf16, sdpa, or
# flash-attention-2 when flash_attn is installed): tokens/s, MFU and peak GPU memory per run. Then the LoRA
# run under FSDP2 on every visible GPU (recipes/accelerate/fsdp.yaml), and under DeepSpeed ZeRO-3 when
# deepspeed is installed. Without CUDA it refuses in one line (exit 2). BENCH_STEPS, BENCH_SEQ, BENCH_DIR
# change the defaults (12 steps of 4 x 2048 tokens; /tmp/finetune-bench-8b).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH_DIR="${BENCH_DIR:-/tmp/finetune-bench-8b}"
gpus=$(python bench/gpu_sft.py --count-gpus) || exit $?   # the one-line refusal comes from here
mkdir -p "$BENCH_DIR"
python bench/gpu_sft.py --prepare --dir "$BENCH_DIR"
python bench/gpu_sft.py --dir "$BENCH_DIR" --method qlora
python bench/gpu_sft.py --dir "$BENCH_DIR" --method lora
launch=(python -m accelerate.commands.launch --num_processes "$gpus" --main_process_port 29533)
"${launch[@]}" --config_file recipes/accelerate/fsdp.yaml bench/gpu_sft.py --dir "$BENCH_DIR" --method lora --mode fsdp2
if python -c "import deepspeed" 2>/dev/null; then
  "${launch[@]}" --config_file recipes/accelerate/deepspeed_zero3.yaml bench/gpu_sft.py --dir "$BENCH_DIR" \
    --method lora --mode zero3
else
  echo "bench/gpu.sh: deepspeed is not installed: ZeRO-3 skipped (pip install deepspeed)"
fi
python bench/gpu_sft.py --dir "$BENCH_DIR" --table
