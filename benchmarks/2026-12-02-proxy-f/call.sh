#!/bin/bash
# One device call: leave-one-out proxy rows (benchmarks/leave_one_out_plan.md), TTT off, run one after the other on
# the one GPU. $1: the commit recorded in each row; $2: the variants ("A=1;B=2,C=3"); $3: a tag for the outputs.
source benchmarks/2026-12-02-proxy-f/setup.sh
rm -rf /tmp/proxy_out  # a warm machine keeps the last call's logs; they must not be copied as this call's
SEED=${SEED:-1337} TTT_EPOCHS=0 TTT_LORA_RANK=0 PROXY_COMMIT=$1 timeout -s INT $((585-SECONDS)) python3 tools/bench.py proxy \
  --text .carry/proxy --tokenizers .carry/tok --results $OUT/proxy_results.md --variants "$2" > $OUT/$3_stdout.txt 2>&1
tail -4 $OUT/$3_stdout.txt
for d in /tmp/proxy_out/v*; do
  [ -d "$d" ] || continue  # a one-variant run writes no vN folder: its log is the stdout above
  cp $d/train.log $OUT/$3_$(basename $d)_train.log 2>/dev/null; cp $d/stdout.txt $OUT/$3_$(basename $d)_stdout.txt 2>/dev/null
  grep -h "^proxy shards\|^final_score\|Traceback\|error" $d/stdout.txt | tail -3
done
echo "[done at ${SECONDS}s]"
