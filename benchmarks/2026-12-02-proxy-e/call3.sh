#!/bin/bash
# Device call 3 (warm, after call 2): the same LoRA step timing with the prepared Triton-MLP patch applied
# (benchmarks/2026-12-02-proxy-d/lora_triton_mlp.patch), then R17's 3-phase score at LoRA chunk 64 with it
# (the same score is the check that the patch changes the speed only).
source benchmarks/2026-12-02-proxy-e/setup.sh
git apply benchmarks/2026-12-02-proxy-d/lora_triton_mlp.patch || exit 1
for C in 64 32; do
  TTT_EPOCHS=3 TTT_PHASES=3 TTT_LORA_RANK=16 TTT_LORA_CHUNK=$C timeout 150 python3 tools/bench.py lora \
    --lengths /tmp/proxy_sp8192/fineweb_val_000000.bin > $OUT/lora_time_chunk${C}_triton.txt 2>&1
  tail -3 $OUT/lora_time_chunk${C}_triton.txt; echo "[lora chunk $C timed at ${SECONDS}s]"
done
DATA_PATH=/tmp/proxy_sp8192 TTT_EPOCHS=0 TTT_LORA_RANK=0 timeout $((590-SECONDS)) python3 tools/bench.py score --no-baseline \
  --artifact /tmp/proxy_out/final_model.ptz --ttt "epochs=3,phases=3,rank=16,lora_chunk=64" > $OUT/r17_score_phases3_triton.txt 2>&1
tail -2 $OUT/r17_score_phases3_triton.txt; git checkout -- train_gpt.py tests/test_model.py; echo "[done at ${SECONDS}s]"
