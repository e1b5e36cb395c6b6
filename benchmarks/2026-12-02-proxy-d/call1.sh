#!/bin/bash
# Device call 1: a fresh default artifact (R14, seed 1337: R12's artifact did not survive), kept in $OUT with
# its val shard; then the CUDA-graph prototype checked against lora_sums on every 40th document.
source benchmarks/2026-12-02-proxy-d/setup.sh
SEED=1337 TTT_EPOCHS=0 PROXY_COMMIT=$1 timeout -s INT 420 python3 tools/bench.py proxy --text .carry/proxy \
  --tokenizers .carry/tok --results $OUT/proxy_results.md > $OUT/r14_stdout.txt 2>&1
tail -3 $OUT/r14_stdout.txt; echo "[proxy done at ${SECONDS}s]"
cp /tmp/proxy_out/train.log $OUT/r14_train.log; cp /tmp/proxy_out/final_model.ptz $OUT/r14_final_model.ptz
mkdir -p $OUT/val8192 && cp /tmp/proxy_sp8192/fineweb_val_000000.bin $OUT/val8192/
DATA_PATH=/tmp/proxy_sp8192 TTT_EPOCHS=0 TTT_LORA_RANK=16 timeout $((590-SECONDS)) python3 $G \
  --artifact /tmp/proxy_out/final_model.ptz --check 40 --graphs > $OUT/graphs_check.txt 2>&1
tail -20 $OUT/graphs_check.txt; echo "[done at ${SECONDS}s]"
