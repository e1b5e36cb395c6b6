#!/usr/bin/env bash
# The main job. With CUDA and the challenge's shards under DATA_PATH: the competition run on every GPU
# of this machine. Otherwise: a small end-to-end smoke run (on the CPU, or one GPU if there is one),
# on prose and a tokenizer that tools/make_data.py generates; its score is not a FineWeb score. Its
# training stops at 200 steps or 90 s, whichever comes first: two to three minutes in all with the
# evaluation and its test-time training (README). One intra-op thread: on 2 busy cores, 2 threads took
# 7-12x longer a step. A CPU step takes 0.8-3 s, so the run's last step overshoots its cap by up to one step
# and the calibration takes 1.6-3.5 s: hence a 10 s GPTQ reserve; an EMA of 0.9 suits a run of tens of steps.
set -euo pipefail
cd "$(dirname "$0")"
DATA_PATH=${DATA_PATH:-./data/datasets/fineweb10B_sp8192}
if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && compgen -G "$DATA_PATH/fineweb_train_*.bin" >/dev/null; then
  exec torchrun --standalone --nproc_per_node="${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}" train_gpt.py
fi
DEVICE=$(python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'a CPU')")
echo "no CUDA device or no shards under $DATA_PATH: smoke run on $DEVICE with generated data in ./smoke"
python3 tools/make_data.py text --out smoke/data
exec env DATA_PATH=smoke/data TOKENIZER_PATH=smoke/data/gen_512_bpe.model VOCAB_SIZE=512 OUT_DIR="${OUT_DIR:-smoke}" \
  NAME="CPU smoke run" BLURB="Smoke run on generated text (tools/make_data.py text), 4L 128d, up to ${ITERATIONS:-200} steps or ${MAX_WALLCLOCK_SECONDS:-90} s of training on $DEVICE: shows the format, not a FineWeb score" \
  NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 BIGRAM_VOCAB_SIZE=512 BIGRAM_DIM=32 \
  TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 ITERATIONS="${ITERATIONS:-200}" WARMUP_STEPS=0 LR_WARMUP_STEPS=10 \
  WARMDOWN_ITERS=80 MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-90}" VAL_LOSS_EVERY=100 TRAIN_LOG_EVERY=25 SWA_EVERY=10 \
  FP16_MAX_NUMEL=4096 EMA_DECAY=0.9 GPTQ_RESERVE_SECONDS=10 COMPILE=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python3 train_gpt.py
