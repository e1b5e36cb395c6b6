#!/bin/bash
# Device call 4: R15 = the default at seed 42 (TTT off), then docs+lora+ttt in 3 phases through the graphs.
source benchmarks/2026-12-02-proxy-d/setup.sh
SEED=42 TTT_EPOCHS=0 PROXY_COMMIT=$1 timeout -s INT 420 python3 tools/bench.py proxy --text .carry/proxy \
  --tokenizers .carry/tok --results $OUT/proxy_results.md > $OUT/r15_stdout.txt 2>&1
tail -2 $OUT/r15_stdout.txt; echo "[proxy done at ${SECONDS}s]"
cp /tmp/proxy_out/train.log $OUT/r15_train.log; cp /tmp/proxy_out/final_model.ptz $OUT/r15_final_model.ptz
export DATA_PATH=/tmp/proxy_sp8192 TTT_LORA_RANK=16
TTT_EPOCHS=3 TTT_CHUNK_TOKENS=$2 timeout $((590-SECONDS)) python3 $G --artifact /tmp/proxy_out/final_model.ptz --graphs \
  > $OUT/r15_graphs_phases.txt 2>&1
tail -2 $OUT/r15_graphs_phases.txt; echo "[done at ${SECONDS}s]"
