#!/bin/bash
# Device call 2 (warm, after call 1): R14 scored by LoRA TTT (rank 16) through the graphs, the whole split;
# then docs+lora+ttt (LoRA within the chunked SGD's chunks) through the graphs.
source benchmarks/2026-12-02-proxy-d/setup.sh
export DATA_PATH=/tmp/proxy_sp8192 TTT_LORA_RANK=16
TTT_EPOCHS=0 timeout 200 python3 $G --artifact /tmp/proxy_out/final_model.ptz --graphs > $OUT/r14_graphs_lora.txt 2>&1
tail -5 $OUT/r14_graphs_lora.txt; echo "[lora done at ${SECONDS}s]"
TTT_EPOCHS=3 timeout $((590-SECONDS)) python3 $G --artifact /tmp/proxy_out/final_model.ptz --graphs > $OUT/r14_graphs_docs_lora_ttt.txt 2>&1
tail -5 $OUT/r14_graphs_docs_lora_ttt.txt; echo "[done at ${SECONDS}s]"
