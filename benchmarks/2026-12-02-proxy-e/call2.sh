#!/bin/bash
# Device call 2 (warm, after call 1): LoRA's step time on the busiest of 8 ranks (bench.py lora, 32 copies of the
# proxy's documents) in 3 phases at LoRA chunks 64 and 32; then R17, the default at seed 42 (TTT off), and
# its docs+lora+ttt score in 3 phases at LoRA chunk 64.
source benchmarks/2026-12-02-proxy-e/setup.sh
for C in 64 32; do
  TTT_EPOCHS=3 TTT_PHASES=3 TTT_LORA_RANK=16 TTT_LORA_CHUNK=$C timeout 150 python3 tools/bench.py lora \
    --lengths /tmp/proxy_sp8192/fineweb_val_000000.bin > $OUT/lora_time_chunk$C.txt 2>&1
  tail -3 $OUT/lora_time_chunk$C.txt; echo "[lora chunk $C timed at ${SECONDS}s]"
done
SEED=42 TTT_EPOCHS=0 PROXY_COMMIT=$1 timeout -s INT 420 python3 tools/bench.py proxy --text .carry/proxy \
  --tokenizers .carry/tok --results $OUT/proxy_results.md > $OUT/r17_stdout.txt 2>&1
tail -3 $OUT/r17_stdout.txt; echo "[proxy done at ${SECONDS}s]"
cp /tmp/proxy_out/train.log $OUT/r17_train.log; cp /tmp/proxy_out/final_model.ptz $OUT/r17_final_model.ptz
DATA_PATH=/tmp/proxy_sp8192 TTT_EPOCHS=0 TTT_LORA_RANK=0 timeout $((590-SECONDS)) python3 tools/bench.py score --no-baseline \
  --artifact /tmp/proxy_out/final_model.ptz --ttt "epochs=3,phases=3,rank=16,lora_chunk=64;epochs=3,phases=3,rank=16,lora_chunk=32" \
  > $OUT/r17_score_phases3.txt 2>&1
tail -4 $OUT/r17_score_phases3.txt; echo "[done at ${SECONDS}s]"
