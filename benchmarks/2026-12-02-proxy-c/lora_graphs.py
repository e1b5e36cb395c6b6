"""A prototype: per-document LoRA TTT with each step replayed from a CUDA graph, to take the host out of it.

Since folded into train_gpt.py as LoraScorer; this file runs against the train_gpt.py of 08ebb01 (which
still has lora_sums): `git show 08ebb01:train_gpt.py > train_gpt.py` first. Its GPU runs are in
benchmarks/2026-12-02-proxy-d/.


The profile of 2026-12-02 (r12_profile.txt) found a LoRA step bound by the host: about 85 ms issuing some
1,700 small kernels for about 20 ms of GPU work. A CUDA graph replays a captured step with one launch, but
needs fixed shapes and fixed addresses. So this scores exactly what train_gpt.lora_sums scores, with:
- shapes in buckets: a step's documents padded to a power of two of rows, its window (the document's
  inputs lo..hi) padded on the right to a power of two of positions (at most seq_len). Padding on the
  right cannot reach the real positions through causal attention, and a mask keeps the padded rows and
  positions out of the sums and the gradients.
- the head and the loss on the step's chunk only: GPT.last_hidden, then the head at the chunk's window
  positions, passed as a device tensor (GPT.forward reads the last positions, which padding moves).
- documents per batch: the largest power of two whose padded rows x window (the window its longest document
  reaches) fit EVAL_BATCH_SEQS x seq_len token-passes, where lora_sums counts them unpadded; padding would
  otherwise ask up to four times the memory (the whole split ran out of the H200's 140 GB on 2026-12-02).
  Documents are independent (each its own adapters, Adam elementwise), so the grouping leaves every score.
- one set of adapters per row bucket (allocated once, reset in place for each batch); when a batch's
  documents fall to a smaller bucket, the survivors' adapters and Adam state are copied down.
- Adam (beta1 0, as lora_sums uses it) written out so it runs inside the graph on the bucket's tensors.
  torch.optim.Adam's arithmetic with beta1 = 0: v = b2 v + (1 - b2) g^2; p -= lr g / (sqrt(v) / sqrt(1 -
  b2^t) + eps), t the step's index in its batch, kept in a device tensor.
- a step trains after it scores, the batch's last step included (lora_sums skips that one: its update is
  thrown away with the batch's adapters, so the scores are the same).

On the CPU there are no graphs: the same padded step runs eagerly, which checks the padding, the masks, the
bucket copies and the hand-written Adam against lora_sums (check_lora_graphs.py; --check on the GPU). On the GPU, --graphs captures one
graph per (rows, window) bucket, all in one memory pool: nothing a graph allocates outlives its replay
(inputs, adapters, Adam state and sums are allocated outside the captures), so any replay order is safe.

  python3 lora_graphs.py --artifact final_model.ptz --check 40          # every 40th document, both ways
  python3 lora_graphs.py --artifact final_model.ptz --graphs            # the whole split, graphed
  TTT_EPOCHS=3 python3 lora_graphs.py --artifact final_model.ptz --graphs   # docs+lora+ttt, graphed
Settings (DATA_PATH, TOKENIZER_PATH, TTT_LORA_*, EVAL_*) come from the environment as for train_gpt.py.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402

BETA2, EPS = 0.999, 1e-8  # torch.optim.Adam's defaults, as lora_sums uses them


def bucket(n: int, cap: int) -> int:
    """The power of two at or above n, at most cap (n <= cap)."""
    return min(1 << (n - 1).bit_length(), cap)


class RowBucket:
    """Adapters and Adam state for `rows` documents, allocated once and reset in place for each batch."""

    def __init__(self, model, rows: int, args):
        self.adapters = tg.DocAdapters(model, rows, args.ttt_lora_rank, args.seed)
        self.params = self.adapters.parameters()
        self.first = [p.detach().clone() for p in self.params]  # A's shared draw, B's zeros
        self.v = [torch.zeros_like(p) for p in self.params]

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0, v in zip(self.params, self.first, self.v):
                p.copy_(p0)
                v.zero_()

    def take(self, other: "RowBucket", rows: int) -> None:
        """The first `rows` documents' adapters and Adam state from a larger bucket."""
        with torch.no_grad():
            for p, q, v, w in zip(self.params, other.params, self.v, other.v):
                p[:rows].copy_(q[:rows])
                v[:rows].copy_(w[:rows])


class PaddedStep:
    """One LoRA step on a (rows, window) bucket: score the masked targets of one chunk, add their sums, then one
    Adam step of the bucket's adapters on their loss. The head reads the chunk's window positions `pos` only
    (GPT.forward's head on GPT.last_hidden, at positions a graph can change). Inputs live in fixed buffers."""

    def __init__(self, model, slots: RowBucket, rows: int, window: int, chunk: int, luts, sums, t_sqrt, lr: float):
        device = sums.device
        self.model, self.slots, self.luts, self.sums, self.t_sqrt, self.lr = model, slots, luts, sums, t_sqrt, lr
        self.ids = torch.zeros(rows, window, dtype=torch.long, device=device)
        self.pos = torch.arange(chunk, device=device)
        self.prev, self.targets = (torch.zeros(rows, chunk, dtype=torch.long, device=device) for _ in range(2))
        self.mask = torch.zeros(rows, chunk, device=device)
        self.graph = None

    def __call__(self) -> None:
        model, adapters = self.model, self.slots.adapters
        ctx = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.ids.is_cuda else tg.nullcontext()
        with ctx:
            h = model.head_input(tg.rms_norm(model.last_hidden(self.ids, adapters).index_select(1, self.pos)))
            logits = model.head_logits(h, adapters.at(None))
            losses = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten(), reduction="none").view_as(self.targets)
        losses = losses * self.mask
        nbytes = (tg.target_bytes(self.prev, self.targets, self.luts) * self.mask).sum()
        self.sums += torch.stack([losses.detach().double().sum(), self.mask.double().sum(), nbytes.double()])
        grads = torch.autograd.grad(losses.sum(), self.slots.params)
        with torch.no_grad():
            for p, g, v in zip(self.slots.params, grads, self.slots.v):
                v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                p.addcdiv_(g, (v.sqrt() / self.t_sqrt).add_(EPS), value=-self.lr)

    def capture(self, pool) -> None:
        """Warm up (on a side stream, with an empty mask, Adam's v saved and put back: an empty mask moves
        nothing else), then capture into the shared pool."""
        saved = [v.clone() for v in self.slots.v]
        self.mask.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self()
        with torch.no_grad():
            for v, s in zip(self.slots.v, saved):
                v.copy_(s)

    def run(self) -> None:
        self.graph.replay() if self.graph is not None else self()


class PaddedLora:
    """lora_sums by padded steps (replayed from graphs with `graphs`). Buckets, graphs and their buffers persist
    from call to call, so that the chunked SGD's calls (docs+lora+ttt, one per TTT chunk) reuse them: the
    base model's updates are in place, so the graphs read the new weights."""

    def __init__(self, model, device: torch.device, args, graphs: bool):
        self.model, self.args, self.graphs = model, args, graphs
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.t_sqrt = torch.ones((), device=device)
        self.buckets, self.steps = {}, {}
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.stats = dict(steps=0, captured=0, capture_s=0.0, padded_token_passes=0, token_passes=0)

    def step_for(self, rows: int, window: int, luts) -> PaddedStep:
        if rows not in self.buckets:
            self.buckets[rows] = RowBucket(self.model, rows, self.args)
        step = self.steps.get((rows, window))
        if step is None:
            step = self.steps[rows, window] = PaddedStep(self.model, self.buckets[rows], rows, window,
                                                         self.args.ttt_lora_chunk, luts, self.sums, self.t_sqrt,
                                                         self.args.ttt_lora_lr)
            if self.graphs:
                t0 = tg.sync_time(self.sums.device)
                step.capture(self.pool)
                self.stats["captured"] += 1
                self.stats["capture_s"] += tg.sync_time(self.sums.device) - t0
        return step

    def __call__(self, model, tokens: torch.Tensor, spans: list[tuple[int, int]], seq_len: int, luts,
                 args) -> tuple[torch.Tensor, float, float]:
        """lora_sums' signature and results; all the time is given as scoring (the steps are not split)."""
        assert model is self.model and args is self.args
        device, chunk = tokens.device, args.ttt_lora_chunk
        t0 = tg.sync_time(device)
        self.sums.zero_()
        i = 0
        while i < len(spans):
            longest = spans[i][1] - spans[i][0]
            room = args.eval_batch_seqs * seq_len // bucket(min(math.ceil(longest / chunk) * chunk, seq_len), seq_len)
            batch = spans[i : i + (1 << (room.bit_length() - 1))]  # room >= EVAL_BATCH_SEQS >= 1
            i += len(batch)
            lengths = [b - a for a, b in batch]
            top = bucket(len(batch), 1 << 30)
            n_targets = torch.tensor(lengths + [0] * (top - len(batch)), device=device)  # padded rows score nothing
            docs = torch.zeros(top, lengths[0] + 1 + seq_len, dtype=torch.long, device=device)
            for d, (a, b) in enumerate(batch):
                docs[d, : b - a + 1] = tokens[a : b + 1]
            rows_now = None
            for k in range(math.ceil(lengths[0] / chunk)):
                live = sum(n > k * chunk for n in lengths)
                hi = min((k + 1) * chunk, lengths[0])
                lo = max(0, (k + 1) * chunk - seq_len)
                rows, window = bucket(live, top), bucket((k + 1) * chunk - lo, seq_len)  # room for a whole chunk
                step = self.step_for(rows, window, luts)
                if rows_now is None:
                    self.buckets[rows].reset()
                elif rows != rows_now:
                    self.buckets[rows].take(self.buckets[rows_now], rows)
                rows_now = rows
                first = k * chunk  # the chunk's targets: first + 1 .. first + chunk, those up to the document's end scored
                target = torch.arange(first + 1, first + chunk + 1, device=device)
                step.ids.copy_(docs[:rows, lo : lo + window])
                step.pos.copy_(target - lo - 1)  # the window position whose next token is the target
                step.prev.copy_(docs[:rows, first : first + chunk])
                step.targets.copy_(docs[:rows, first + 1 : first + chunk + 1])
                step.mask.copy_(target <= n_targets[:rows, None])
                self.t_sqrt.fill_(math.sqrt(1 - BETA2 ** (k + 1)))
                step.run()
                self.stats["steps"] += 1
                self.stats["padded_token_passes"] += rows * window
                self.stats["token_passes"] += live * (hi - lo)
        return self.sums.clone(), tg.sync_time(device) - t0, 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--every", type=int, default=1, help="score every N-th document (longest first; LoRA alone)")
    ap.add_argument("--graphs", action="store_true", help="replay each step from a CUDA graph (GPU only)")
    ap.add_argument("--check", type=int, default=0,
                    help="N > 0: every N-th document by lora_sums and by the padded steps (graphed with --graphs)")
    a = ap.parse_args()
    args = tg.Hyperparameters()
    if a.check and args.ttt_epochs:
        raise SystemExit("error: --check compares LoRA alone: set TTT_EPOCHS=0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    luts = tg.byte_luts(sp, args.vocab_size, device)
    val = torch.from_numpy(tg.load_val_tokens(str(Path(args.data_path) / "fineweb_val_*.bin"), args.vocab_size,
                                              args.val_tokens_limit).astype(np.int32)).to(device)
    model = tg.build_model(args, sp.bos_id()).to(device)
    model.load_state_dict(tg.unpack_model(Path(a.artifact).read_bytes()))
    seq_len = args.eval_seq_len or args.train_seq_len
    spans = sorted(tg.doc_spans(val.cpu().numpy(), sp.bos_id()), key=lambda s: s[0] - s[1])[:: a.check or a.every]
    if a.check:
        t0 = tg.sync_time(device)
        ref, _, _ = tg.lora_sums(model, val, spans, seq_len, luts, args)
        print(f"lora_sums: val_bpb {tg.loss_and_bpb(ref)[1]:.6f} in {tg.sync_time(device) - t0:.1f}s "
              f"({len(spans)} documents)", flush=True)
    runner = PaddedLora(model, device, args, a.graphs)
    t0 = tg.sync_time(device)
    if args.ttt_epochs:  # docs+lora+ttt: the chunked SGD of the base model between the calls, as the script runs it
        scorer = torch.compile(model, dynamic=False) if args.compile else model
        tg.lora_sums = runner
        _, bpb, _, adapt_s = tg.evaluate_ttt(scorer, tg.ttt_parameters(model, args.ttt_freeze_blocks), val, seq_len,
                                             args.eval_stride, luts, args, eager=model)
        how = f"docs+lora+ttt, SGD {adapt_s:.1f}s"
    else:
        sums, _, _ = runner(model, val, spans, seq_len, luts, args)
        bpb, how = tg.loss_and_bpb(sums)[1], "docs+lora"
    seconds = tg.sync_time(device) - t0
    peak = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"padded{' graphed' if a.graphs else ''} {how}: val_bpb {bpb:.6f} in {seconds:.1f}s "
          f"({len(spans)} documents, {runner.stats}{peak})", flush=True)
    if a.check:
        print(f"sums: lora_sums {ref.tolist()}, padded {sums.tolist()}", flush=True)


if __name__ == "__main__":
    main()
