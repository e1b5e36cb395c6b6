#!/bin/bash
# Device call 3: R14's artifact (carried) through the graphed prototype, with lora_graphs.py's batches capped
# to the padded budget: LoRA alone (rank 16), then docs+lora+ttt with the chunked SGD in "phases": chunks of
# a third of the proxy's 1,389,906 val tokens (3 chunks) instead of 32,768 (43 chunks).
source benchmarks/2026-12-02-proxy-d/setup.sh
export DATA_PATH=$PWD/.carry/val8192 TTT_LORA_RANK=16
A=.carry/r14_final_model.ptz
TTT_EPOCHS=0 timeout 120 python3 $G --artifact $A --graphs > $OUT/r14_graphs_lora.txt 2>&1
tail -2 $OUT/r14_graphs_lora.txt; echo "[lora done at ${SECONDS}s]"
for P in 3; do
  TTT_EPOCHS=3 TTT_CHUNK_TOKENS=$(( (1389906 + P - 1) / P )) timeout $((200-SECONDS)) python3 $G --artifact $A --graphs \
    > $OUT/r14_graphs_phases$P.txt 2>&1
  tail -2 $OUT/r14_graphs_phases$P.txt; echo "[$P phases done at ${SECONDS}s]"
done
