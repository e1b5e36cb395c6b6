"""LoRA TTT's work on one rank of 8 over a FineWeb-sized split, counted on the CPU (no model), for the 8-GPU
projection of docs+lora+ttt: the steps and padded token-passes of LoraScorer's walk (train_gpt.lora_walk:
capped batches, power-of-two shapes) on the proxy's split on one GPU, as measured, and on the rank with the
most work when the proxy's documents, repeated in 32 shuffled copies (44.5M tokens, about FineWeb's sp8192
split), are dealt to 8 ranks as evaluate_ttt deals them (tools/bench.py's lora_shapes, which `bench.py lora`
times). The proxy's documents stand in for FineWeb's, whose lengths are not here. Also: the same with a
1024-token window (EVAL_SEQ_LEN), and with windows padded to multiples of 256 or 128 instead of powers of two.

Usage: python3 lora_rank_shares.py VAL_SHARD  (the default settings, TTT_LORA_RANK 16, BOS 1; since the
session after d95cc78 through TTT_PHASES, which computes a phase's chunk from the split's targets, n - 1)"""
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
import bench  # noqa: E402
import train_gpt as tg  # noqa: E402

COPIES, WORLD = 32, 8


def settings(**env) -> tg.Hyperparameters:
    os.environ.update({k: str(v) for k, v in env.items()})
    tg._SETTINGS.clear()
    return tg.Hyperparameters()


def padded(shapes) -> int:
    return sum(n * rows * window for (rows, window), n in shapes.items())


def finer_windows(tokens, args, step: int) -> float:
    """The busiest rank's padded token-passes (millions) in 3 phases with windows padded to a multiple of
    `step` (powers of two below it), rows as lora_walk pads them."""
    n, seq_len, chunk = len(tokens), args.eval_seq_len or args.train_seq_len, args.ttt_lora_chunk
    groups = tg.doc_groups(tokens, 1, math.ceil(n / 3), 3)
    work = [0] * WORLD
    for group in groups:
        for r in range(WORLD):
            for *_, k, rows, _ in tg.lora_walk([b - a for a, b in group[r::WORLD]], chunk, seq_len, args.eval_batch_seqs):
                w = (k + 1) * chunk - max(0, (k + 1) * chunk - seq_len)
                work[r] += rows * (min(seq_len, step * math.ceil(w / step)) if w > step else tg.pow2_bucket(w, seq_len))
    return max(work) / 1e6


def main() -> None:
    tokens = tg.load_val_tokens(sys.argv[1], 8192, 0)
    docs = [tokens[a:b] for a, b in tg.doc_spans(tokens, 1)]
    rng = np.random.default_rng(0)
    big = np.concatenate([docs[j] for _ in range(COPIES) for j in rng.permutation(len(docs))] + [tokens[-1:]])
    print(f"proxy split: {len(tokens):,} tokens, {len(docs)} documents; {COPIES} copies: {len(big):,} tokens")
    for phases, lora_chunk, seq_len in ((0, 32, 2048), (3, 32, 2048), (3, 64, 2048), (6, 32, 2048), (3, 32, 1024), (3, 64, 1024)):
        args = settings(TTT_LORA_RANK=16, TTT_EPOCHS=3, TTT_LORA_CHUNK=lora_chunk, EVAL_SEQ_LEN=seq_len, TTT_PHASES=phases)
        one = bench.lora_shapes(tokens, 1, args, 1)[0]
        worst = max(bench.lora_shapes(big, 1, args, WORLD), key=padded)
        label = f"TTT chunks of {args.ttt_chunk_tokens:,} tokens" if not phases else f"{phases} phases"
        print(f"{label}, LoRA chunk {lora_chunk}, window {seq_len}: one GPU on the proxy {sum(one.values()):,} steps, "
              f"{padded(one) / 1e6:.1f}M padded; busiest of {WORLD} ranks on {COPIES}x {sum(worst.values()):,} steps, "
              f"{padded(worst) / 1e6:.1f}M padded ({sum(worst.values()) / sum(one.values()):.1f}x and "
              f"{padded(worst) / padded(one):.2f}x)")
    args = settings(TTT_LORA_RANK=16, TTT_EPOCHS=3, TTT_LORA_CHUNK=32, EVAL_SEQ_LEN=2048, TTT_PHASES=0)
    for step in (256, 128):
        print(f"3 phases, LoRA chunk 32, windows padded to multiples of {step}: busiest rank "
              f"{finer_windows(big, args, step):.1f}M padded")


if __name__ == "__main__":
    main()
