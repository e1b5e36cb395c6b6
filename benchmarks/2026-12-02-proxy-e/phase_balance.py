"""Is the 8-rank LoRA time the busiest rank's total? Each phase ends with the SGD, which waits for every rank, so the
wall time is the sum over phases of each phase's slowest rank. Padded token-passes per (phase, rank) on 32 shuffled
copies of the proxy split (as bench.py lora deals them). Usage: python3 phase_balance.py VAL_SHARD"""
import sys, math, os
import numpy as np
sys.path[:0] = [str(__import__("pathlib").Path(__file__).resolve().parents[2])]
import train_gpt as tg
tokens = tg.load_val_tokens(sys.argv[1], 8192, 0)
docs = [tokens[a:b] for a, b in tg.doc_spans(tokens, 1)]
order = np.random.default_rng(0)
big = np.concatenate([docs[j] for _ in range(32) for j in order.permutation(len(docs))] + [tokens[-1:]])
for lc in (64, 32):
    n = len(big); chunk = math.ceil((n - 1) / 3)
    groups = tg.doc_groups(big, 1, chunk, math.ceil((n - 1) / chunk))
    per = [[sum(r * w for *_, r, w in tg.lora_walk([b - a for a, b in g[k::8]], lc, 2048, 32)) for k in range(8)] for g in groups]
    tot = [sum(p[k] for p in per) for k in range(8)]
    print(lc, "phases", len(groups), "max of totals %.1fM" % (max(tot) / 1e6), "sum of per-phase max %.1fM" % (sum(max(p) for p in per) / 1e6),
          "per phase max/min", [("%.1f" % (max(p) / 1e6), "%.1f" % (min(p) / 1e6)) for p in per])
