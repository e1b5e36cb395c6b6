#!/bin/bash
# Device call 1: LoRA TTT with the sync-free steps on R12's artifact (carried in .carry/), no training.
# Run from the repository root on the device; writes to $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 DATA_PATH=$PWD/.carry/val8192 TOKENIZER_PATH=$PWD/.carry/tok/fineweb_8192_bpe.model TTT_EPOCHS=0 TTT_LORA_RANK=8
ART=$PWD/.carry/r12_final_model.ptz
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python3 benchmarks/2026-12-02-proxy-b/lora_speed.py --artifact $ART --profile > $OUT/profile.txt 2>&1
echo "[profile done at ${SECONDS}s]"; head -3 $OUT/profile.txt
timeout $((585-SECONDS)) python3 tools/bench.py score --no-baseline --artifact $ART \
  --ttt "rank=8;rank=32;rank=8,lora_lr=0.003;rank=8,lora_lr=0;rank=32,lora_lr=0.0003" 2>&1 | tee $OUT/score.txt
echo "[done at ${SECONDS}s]"
