"""Why per-document LoRA TTT was slow on the GPU, and what it scores when it is not.

The whole-split LoRA score did not finish in about 185 s on an H200 (r12_score.txt). Two suspects, both
costs paid per new shape, and LoRA's steps change shape at nearly every step (documents drop out, the
window grows): the Triton MLP kernel, whose loop bounds are compile-time constants that depend on the
number of rows (a compile per new value), and cuDNN attention, which builds a plan per shape. This script
scores LoRA with either of each (monkeypatched), in its own process with its own Triton cache (set
TRITON_CACHE_DIR per run). The figures in this folder ran on commit 21bd723, whose LoRA forward took the
Triton MLP and cuDNN attention first, so `plain` and `flash` were the patched ones. train_gpt.py now does
that itself for the LoRA forward only, and the script patches the other way: `plain`/`flash` (the
defaults) run the code as it is, `triton`/`cudnn` put the old kernels back into the LoRA forward.

  python3 lora_speed.py --artifact final_model.ptz --mlp plain --attention flash --every 1 --passes 1
  TTT_EPOCHS=3 python3 lora_speed.py ... --every 1 --passes 1   # through evaluate_ttt: docs+lora+ttt
  python3 lora_speed.py ... --profile                  # where a step's time goes
  python3 lora_speed.py ... --compile-lora dynamic     # the LoRA forward compiled for any shape (not yet run on a GPU)

On the CPU, with the smoke run's model, --compile-lora dynamic gave the eager score to the last digit
(1.42239 on every 20th document) but made 7 graphs for 10 documents: inductor's size thresholds, the size
of 1, the adapters' batch equal to the input's or not, and the input's strides each forced a recompile.

--every N scores every N-th document (longest first), for --passes passes (the first cold: compiles and
plans included). A sample is a poor stand-in: a batch's step count is set by its longest document, so
every 40th document still costs about half the whole split's steps (none of the sampled runs finished in
60-75 s). Settings (DATA_PATH, TOKENIZER_PATH, TTT_LORA_*) come from the environment as for train_gpt.py.
"""
import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402


def mlp_ignoring_any_shape(forward):
    return lambda self, x, any_shape=False: forward(self, x)


def compiled_twin(model):
    """A shallow copy of `model` (the same modules and weights, so the chunked SGD's updates reach it) whose
    forward runs through torch.compile(dynamic=True) on contiguous inputs with grad on: on the CPU, a
    view's base size and the grad mode each made graphs of their own."""
    twin = copy.copy(model)
    forward = torch.compile(model.forward, dynamic=True)

    def run(ids, targets, lora=None):
        with torch.enable_grad():
            return forward(ids.contiguous(), targets.contiguous(), lora)
    twin.forward = run
    return twin


def graphs() -> int:
    """Graphs that torch.compile has made in this process (recompiles included)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--mlp", choices=("triton", "plain"), default="plain")
    ap.add_argument("--attention", choices=("cudnn", "flash"), default="flash")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--compile-lora", choices=("none", "dynamic"), default="none",
                    help="dynamic: the LoRA forward and backward through torch.compile(dynamic=True), compiled first "
                         "on short documents (a batch of 3 and one of 1: a size of 1 gets graphs of its own)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: one pass over 64 documents around the median length under torch.profiler, "
                         "then the ops that took the most host and GPU time (where a step's time goes)")
    a = ap.parse_args()
    if a.mlp == "triton":
        tg.MLP.forward = mlp_ignoring_any_shape(tg.MLP.forward)
    if a.attention == "cudnn":
        tg.SDPA_ANY_SHAPE = tg.SDPA_PRIORITY
    args = tg.Hyperparameters()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    luts = tg.byte_luts(sp, args.vocab_size, device)
    val = torch.from_numpy(tg.load_val_tokens(str(Path(args.data_path) / "fineweb_val_*.bin"), args.vocab_size, 0)
                           .astype(np.int32)).to(device)
    model = tg.build_model(args, sp.bos_id()).to(device)
    model.load_state_dict(tg.unpack_model(Path(a.artifact).read_bytes()))
    seq_len = args.eval_seq_len or args.train_seq_len
    spans = sorted(tg.doc_spans(val.cpu().numpy(), sp.bos_id()), key=lambda s: s[0] - s[1])[:: a.every]
    targets = sum(b - a_ for a_, b in spans)
    if a.profile:
        spans = spans[len(spans) // 2 - 32 : len(spans) // 2 + 32]
        tg.lora_sums(model, val, spans, seq_len, luts, args)  # kernels compiled and plans built before
        with torch.profiler.profile() as prof:
            t0 = tg.sync_time(device)
            tg.lora_sums(model, val, spans, seq_len, luts, args)
            print(f"profiled pass over {len(spans)} documents: {tg.sync_time(device) - t0:.2f}s", flush=True)
        for key in ("self_cpu_time_total", "self_device_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        return
    lora_model = model
    if a.compile_lora == "dynamic":
        lora_model = compiled_twin(model)
        t0 = tg.sync_time(device)
        longer = [s for s in spans if s[1] - s[0] > args.ttt_lora_chunk]  # steps with and without grad
        for warm in (longer[-3:], longer[-1:]):
            tg.lora_sums(lora_model, val, warm, seq_len, luts, args)
        print(f"compile-lora=dynamic: compiled in {tg.sync_time(device) - t0:.1f}s, {graphs()} graphs", flush=True)
    for p in range(a.passes):
        t0 = tg.sync_time(device)
        if args.ttt_epochs:  # the chunked SGD of the base model too, as the script's evaluation runs it
            scorer = torch.compile(model, dynamic=False) if args.compile else model
            params = tg.ttt_parameters(model, args.ttt_freeze_blocks)
            loss, bpb, score_s, adapt_s = tg.evaluate_ttt(scorer, params, val, seq_len, args.eval_stride, luts, args,
                                                          eager=lora_model)
        else:
            sums, score_s, adapt_s = tg.lora_sums(lora_model, val, spans, seq_len, luts, args)
            loss, bpb = tg.loss_and_bpb(sums)
        print(f"epochs={args.ttt_epochs} compile-lora={a.compile_lora} mlp={a.mlp} attention={a.attention} every={a.every} docs={len(spans)} targets={targets} "
              f"pass={p} ({'cold' if p == 0 else 'warm'}): {tg.sync_time(device) - t0:.1f}s "
              f"(scoring {score_s:.1f}s + adaptation {adapt_s:.1f}s) val_bpb {bpb:.5f}"
              + (f", {graphs()} graphs" if a.compile_lora == "dynamic" else ""), flush=True)


if __name__ == "__main__":
    main()
