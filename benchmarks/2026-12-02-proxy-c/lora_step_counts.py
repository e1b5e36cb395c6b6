"""Where LoRA TTT's adapter steps go on the proxy's validation split, counted with train_gpt's doc_spans and
lora_sums' batching rule (no model): the steps of each batch, how many run few documents, the steps at larger
EVAL_BATCH_SEQS, and for lora_graphs.py's power-of-two buckets the padded token-passes and graphs.
Usage: python3 lora_step_counts.py VAL_SHARD  (chunk 32, seq_len 2048, BOS 1, as the proxy's default)"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402

CHUNK, SEQ_LEN = 32, 2048


def pow2(n: int, cap: int) -> int:
    return min(1 << (n - 1).bit_length(), cap)


def walk(lengths: list[int], batch_seqs: int):
    """(batch sizes and longest, live documents per step, real and padded token-passes, graph keys)."""
    i, batches, lives, real, padded, keys = 0, [], [], 0, 0, set()
    while i < len(lengths):
        b = lengths[i : i + max(1, batch_seqs * SEQ_LEN // min(lengths[i], SEQ_LEN))]
        i += len(b)
        batches.append((len(b), b[0], math.ceil(b[0] / CHUNK)))
        top = pow2(len(b), 1 << 30)
        for k in range(math.ceil(b[0] / CHUNK)):
            live = sum(n > k * CHUNK for n in b)
            hi, lo = min((k + 1) * CHUNK, b[0]), max(0, (k + 1) * CHUNK - SEQ_LEN)
            rows, window = pow2(live, top), pow2((k + 1) * CHUNK - lo, SEQ_LEN)
            lives.append(live)
            real, padded = real + live * (hi - lo), padded + rows * window
            keys.add((rows, window))
    return batches, lives, real, padded, keys


tokens = tg.load_val_tokens(sys.argv[1], 8192, 0)
lengths = sorted((b - a for a, b in tg.doc_spans(tokens, 1)), reverse=True)
print(f"{len(lengths)} documents; longest {lengths[:5]}; {sum(n > SEQ_LEN for n in lengths)} over {SEQ_LEN} tokens")
batches, lives, real, padded, keys = walk(lengths, 32)
print(f"EVAL_BATCH_SEQS=32: {len(batches)} batches (documents, longest, steps): {batches}")
print(f"  {len(lives)} steps; {sum(n <= 1 for n in lives)} run one document, {sum(n <= 4 for n in lives)} run 4 or fewer")
print(f"  power-of-two buckets: {real / 1e6:.1f}M token-passes padded to {padded / 1e6:.1f}M ({padded / real:.2f}x), {len(keys)} graphs")
for bs in (64, 128):
    print(f"EVAL_BATCH_SEQS={bs}: {len(walk(lengths, bs)[1])} steps")
