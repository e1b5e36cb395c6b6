"""LoRA TTT's work on one rank of 8 over a FineWeb-sized split, counted on the CPU (no model), for the 8-GPU
projection of docs+lora+ttt: the steps and padded token-passes of lora_graphs.py's walk (its capped batches,
power-of-two buckets) on the proxy's split on one GPU, as measured, and on the rank with the most work when
the proxy's documents, repeated in 32 shuffled copies (44.5M tokens, about FineWeb's sp8192 split), are dealt
to 8 ranks as evaluate_ttt deals them (grouped by the TTT chunk a document opens in, longest first,
rank r taking every 8th from r). The proxy's documents stand in for FineWeb's, whose lengths are not here.

Usage: python3 lora_rank_shares.py VAL_SHARD  (seq_len 2048, EVAL_BATCH_SEQS 32, BOS 1)"""
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402

SEQ_LEN, BATCH_SEQS, COPIES, WORLD = 2048, 32, 32, 8


def bucket(n: int, cap: int) -> int:
    return min(1 << (n - 1).bit_length(), cap)


def walk(lengths: list[int], chunk: int) -> tuple[int, int]:
    """(steps, padded token-passes) of lora_graphs.PaddedLora on documents of these lengths, longest first."""
    i = steps = padded = 0
    while i < len(lengths):
        room = BATCH_SEQS * SEQ_LEN // bucket(min(math.ceil(lengths[i] / chunk) * chunk, SEQ_LEN), SEQ_LEN)
        batch = lengths[i : i + (1 << (room.bit_length() - 1))]
        i += len(batch)
        top = bucket(len(batch), 1 << 30)
        for k in range(math.ceil(batch[0] / chunk)):
            live = sum(n > k * chunk for n in batch)
            lo = max(0, (k + 1) * chunk - SEQ_LEN)
            steps, padded = steps + 1, padded + bucket(live, top) * bucket((k + 1) * chunk - lo, SEQ_LEN)
    return steps, padded


def rank_work(spans: list[tuple[int, int]], ttt_chunk: int, lora_chunk: int, world: int) -> list[tuple[int, int]]:
    """(steps, padded token-passes) of each rank: evaluate_ttt's groups, each dealt out longest first."""
    groups = {}
    for a, b in sorted(spans, key=lambda s: s[0] - s[1]):
        groups.setdefault(a // ttt_chunk, []).append(b - a)
    work = [(0, 0)] * world
    for lengths in groups.values():
        for r in range(world):
            s, p = walk(lengths[r::world], lora_chunk)
            work[r] = (work[r][0] + s, work[r][1] + p)
    return work


def main() -> None:
    tokens = tg.load_val_tokens(sys.argv[1], 8192, 0)
    spans = tg.doc_spans(tokens, 1)
    docs = [tokens[a:b] for a, b in spans]  # each from its BOS; the last target of each is the next BOS
    rng = np.random.default_rng(0)
    big = np.concatenate([docs[j] for _ in range(COPIES) for j in rng.permutation(len(docs))] + [tokens[-1:]])
    big_spans = tg.doc_spans(big, 1)
    print(f"proxy split: {len(tokens):,} tokens, {len(spans)} documents; {COPIES} copies: {len(big):,} tokens")
    for phases, lora_chunk in ((43, 32), (3, 32), (3, 64), (6, 32)):
        small = rank_work(spans, math.ceil(len(tokens) / phases) if phases != 43 else 32768, lora_chunk, 1)[0]
        ttt_chunk = math.ceil(len(big) / phases) if phases != 43 else 32768
        ranks = rank_work(big_spans, ttt_chunk, lora_chunk, WORLD)
        worst = max(ranks, key=lambda w: w[1])
        label = "TTT chunks of 32,768 tokens" if phases == 43 else f"{phases} phases"
        print(f"{label}, LoRA chunk {lora_chunk}: one GPU on the proxy {small[0]:,} steps, {small[1] / 1e6:.1f}M padded; "
              f"busiest of {WORLD} ranks on {COPIES}x {worst[0]:,} steps, {worst[1] / 1e6:.1f}M padded "
              f"({worst[0] / small[0]:.1f}x and {worst[1] / small[1]:.2f}x)")


if __name__ == "__main__":
    main()
