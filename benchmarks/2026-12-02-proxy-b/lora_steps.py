"""Sequential adapter steps and token-passes of LoRA TTT on the proxy's validation shard, alone (one group)
and with the chunked SGD (documents grouped by the TTT chunk they open in), using train_gpt's own
doc_spans and lora_sums' batching rule. Usage: python3 lora_steps.py VAL_SHARD [chunk tokens ...]"""
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402

SEQ_LEN, BATCH_SEQS, BOS = 2048, 32, 1


def cost(spans, c: int) -> tuple[int, int]:
    lengths = sorted((b - a for a, b in spans), reverse=True)
    steps = passes = i = 0
    while i < len(lengths):
        batch = np.array(lengths[i : i + max(1, BATCH_SEQS * SEQ_LEN // min(lengths[i], SEQ_LEN))])
        i += len(batch)
        for k in range(math.ceil(batch[0] / c)):
            hi, lo = min((k + 1) * c, batch[0]), max(0, (k + 1) * c - SEQ_LEN)
            steps, passes = steps + 1, passes + int((batch > k * c).sum()) * (hi - lo)
    return steps, passes


tokens = tg.load_val_tokens(sys.argv[1], 8192, 0)
spans = tg.doc_spans(tokens, BOS)
print(f"{len(spans)} documents, {len(tokens):,} tokens")
for c in (32, 64):
    s, p = cost(spans, c)
    print(f"LoRA alone, chunk {c}: {s} steps, {p / 1e6:.1f}M token-passes")
    for ttt_chunk in [int(x) for x in sys.argv[2:]] or [32768]:
        groups = {}
        for span in spans:
            groups.setdefault(span[0] // ttt_chunk, []).append(span)
        totals = np.array([cost(g, c) for g in groups.values()]).sum(0)
        print(f"  with the chunked SGD, {ttt_chunk}-token TTT chunks ({len(groups)} groups): {totals[0]} steps, "
              f"{totals[1] / 1e6:.1f}M token-passes")
