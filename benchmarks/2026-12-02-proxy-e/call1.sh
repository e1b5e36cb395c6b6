#!/bin/bash
# Device call 1: R16, the default at seed 1337 (TTT off), its artifact and val shard kept in $OUT; then the folded
# LoraScorer on the GPU: docs+lora+ttt in 3 phases (TTT_PHASES=3: TTT chunks of 463,302, a third of the proxy's split) with
# LoRA chunks of 64 targets, then of 32 (the prototype's -0.0057 on R14).
source benchmarks/2026-12-02-proxy-e/setup.sh
SEED=1337 TTT_EPOCHS=0 PROXY_COMMIT=$1 timeout -s INT 420 python3 tools/bench.py proxy --text .carry/proxy \
  --tokenizers .carry/tok --results $OUT/proxy_results.md > $OUT/r16_stdout.txt 2>&1
tail -3 $OUT/r16_stdout.txt; echo "[proxy done at ${SECONDS}s]"
cp /tmp/proxy_out/train.log $OUT/r16_train.log; cp /tmp/proxy_out/final_model.ptz $OUT/r16_final_model.ptz
mkdir -p $OUT/val8192 && cp /tmp/proxy_sp8192/fineweb_val_000000.bin $OUT/val8192/
DATA_PATH=/tmp/proxy_sp8192 TTT_EPOCHS=0 TTT_LORA_RANK=0 timeout $((590-SECONDS)) python3 tools/bench.py score --no-baseline \
  --artifact /tmp/proxy_out/final_model.ptz --ttt "epochs=3,phases=3,rank=16,lora_chunk=64;epochs=3,phases=3,rank=16,lora_chunk=32" \
  > $OUT/r16_score_phases3.txt 2>&1
tail -4 $OUT/r16_score_phases3.txt; echo "[done at ${SECONDS}s]"
