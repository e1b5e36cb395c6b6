#!/usr/bin/env python3
"""Speed benchmarks for train_gpt.py on synthetic shards (no FineWeb needed).

  python3 tools/bench.py train --steps 300 [--nproc 1] [--data /tmp/pg_bench]   # training ms/step
  python3 tools/bench.py eval [--world 8]                                       # sliding-window eval time
  python3 tools/bench.py lora --lengths VAL_SHARD [--world 8]                   # LoRA TTT's time on the busiest rank
  python3 tools/bench.py attention                                              # SDPA backends at the training shape
  python3 tools/bench.py profile                                                # GPU time per kernel of one step
  python3 tools/bench.py step [--steps 10]                                      # ms per bare training step
  python3 tools/bench.py pack                                                   # quantization (GPTQ) and packing: time, bytes
  python3 tools/bench.py compare A.log B.log                                    # per-step loss match
  python3 tools/bench.py proxy [--t 180] [--variants "A=1;B=2" --gpus 8]       # quality on real text, 1 GPU a run
  python3 tools/bench.py score --artifact A.ptz [--ttt "lr=0.005;lr=0.01,chunk=8192"]  # re-score an artifact, TTT variants

`proxy` measures quality (../shared/docs/proxy.md): it builds shards of the proxy's real English text
for the configured VOCAB_SIZE (cached under /tmp/proxy_spVOCAB), runs train_gpt.py on one GPU with one
rank's share of a competition step (TRAIN_BATCH_TOKENS=98304, GRAD_ACCUM_STEPS=1), the wallclock cap
T and every step-counted schedule (WARMDOWN_ITERS, MUON_MOMENTUM_WARMUP_STEPS, SWA_EVERY, and the EMA's
horizon 1/(1-EMA_DECAY)) scaled by T/600, and prints one line: final proxy val_bpb (round trip, with
its evaluation mode: docs+lora+ttt by default), pre-quantization bpb, quantization cost, steps, ms/step,
artifact bytes. It appends that line, with the settings taken from the environment and the commit, to
benchmarks/proxy_results.md. Any other setting passes through from
the environment. A proxy number is never a FineWeb number.

`train` runs the real script (torchrun) for a fixed number of steps at whatever configuration the
environment sets (NUM_LAYERS=10 ..., exactly as for a real run) and reads its log: ms/step after
warm-up, tokens/s, model TFLOP/s, MFU against the bf16 dense peak, and peak memory. `eval` times
evaluate() at the challenge's validation size (62,021,846 tokens) on one GPU, for the share of windows
one rank of --world gets, which is the wall time of the evaluation on that many GPUs. Synthetic tokens
measure speed only; their losses say nothing about FineWeb.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

FINEWEB_VAL_TOKENS = 62_021_846
BF16_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, datasheet


def model_flops_per_token(args, seq_len: int, training: bool) -> float:
    """Matmul FLOPs per token (2 per multiply-add) of the model's linear layers, tied head and causal
    attention; x3 for forward plus backward."""
    d, layers = args.model_dim, args.num_layers
    kv = d // args.num_heads * args.num_kv_heads
    per_layer = d * d * 2 + 2 * d * kv + 2 * d * int(args.mlp_mult * d)
    params = layers * per_layer + args.vocab_size * d + (args.bigram_dim * d if args.bigram_vocab_size else 0)
    attention = layers * 2 * seq_len * d  # QK^T and AV, each 2*T*d per token, halved by the causal mask
    return (2 * params + attention) * (3 if training else 1)


def settings():
    import train_gpt
    return train_gpt.Hyperparameters()


def ensure_shards(data: Path, train_tokens: int, val_tokens: int, vocab: int) -> None:
    if sorted(data.glob("fineweb_train_*.bin")) and (data / "fineweb_val_000000.bin").exists():
        return
    from make_data import make_markov_shards
    t0 = time.time()
    make_markov_shards(str(data), train_tokens, val_tokens, vocab_size=vocab)
    print(f"made synthetic shards in {data} ({train_tokens:,} train tokens) in {time.time() - t0:.0f}s", flush=True)


def read_steps(log: str) -> list[tuple[int, float, float]]:
    """(step, train_loss, train_time_ms) of every step line."""
    pattern = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+) .*train_time:(\d+)ms", re.M)
    return [(int(s), float(l), float(t)) for s, l, t in pattern.findall(log)]


def run_train(a) -> None:
    args = settings()
    data = Path(a.data)
    ensure_shards(data, a.train_tokens, a.val_tokens, args.vocab_size)
    out = Path(a.out)
    env = dict(os.environ, DATA_PATH=str(data), ITERATIONS=str(a.steps), MAX_WALLCLOCK_SECONDS="0",
               VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", OUT_DIR=str(out), ALLOW_OVER_CAP="1")
    env.setdefault("TOKENIZER_PATH", a.tokenizer)
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={a.nproc}", str(ROOT / "train_gpt.py")]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)
    log = (out / "train.log").read_text()
    steps = read_steps(log)
    skip = min(a.skip, len(steps) - 2)
    (s0, _, t0), (s1, _, t1) = steps[skip], steps[-1]
    step_ms = (t1 - t0) / (s1 - s0)
    tokens_s = args.train_batch_tokens / step_ms * 1000
    tflops = model_flops_per_token(args, args.train_seq_len, True) * tokens_s / 1e12 / a.nproc
    peak = re.search(r"peak memory ([\d.]+) GiB", log)
    print(f"config: {args.num_layers}L {args.model_dim}d MLP{args.mlp_mult:g} seq {args.train_seq_len} "
          f"batch {args.train_batch_tokens:,} tokens, {a.nproc} GPU(s)")
    print(f"ms/step (steps {s0 + 1}-{s1}): {step_ms:.1f}   tokens/s: {tokens_s:,.0f}   "
          f"model TFLOP/s per GPU: {tflops:.0f}   MFU: {100 * tflops / BF16_PEAK_TFLOPS:.1f}% of {BF16_PEAK_TFLOPS:.0f}   "
          f"peak memory: {peak.group(1) if peak else '?'} GiB")
    print("loss at steps 1, 50, 100, ..., last:",
          " ".join(f"{s}:{l:.4f}" for s, l, _ in steps if s == 1 or s % 50 == 0 or s == s1))


def run_eval(a) -> None:
    import torch
    import train_gpt as tg
    args = settings()
    device = torch.device("cuda")
    seq_len = args.eval_seq_len or args.train_seq_len
    model = tg.build_model(args, bos_id=1).to(device)
    model.looping = args.loop_repeats > 0  # a trained model evaluates with its looped layers
    scorer = torch.compile(model, dynamic=False) if args.compile else model
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(4, args.vocab_size, (FINEWEB_VAL_TOKENS,), device=device, dtype=torch.int32, generator=g)
    vocab = torch.arange(args.vocab_size, device=device)
    luts = (torch.full_like(vocab, 3, dtype=torch.int32), vocab % 3 == 0, vocab < 4)
    warm = tokens[: seq_len * args.eval_batch_seqs + 1]  # compiles the batch shape outside the clock
    tg.evaluate(scorer, warm, seq_len, args.eval_stride, args.eval_batch_seqs, luts)
    starts, _ = tg.window_plan(tokens.numel(), seq_len, args.eval_stride)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tg.evaluate(scorer, tokens, seq_len, args.eval_stride, args.eval_batch_seqs, luts, rank=0, world=a.world)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_scored = len(starts) * seq_len / a.world
    tflops = model_flops_per_token(args, seq_len, False) * tokens_scored / seconds / 1e12
    print(f"eval: {FINEWEB_VAL_TOKENS:,} tokens, seq_len {seq_len}, stride {args.eval_stride}, {len(starts):,} windows, "
          f"batch {args.eval_batch_seqs}; one rank of {a.world} took {seconds:.1f}s "
          f"(= the {a.world}-GPU wall time; {seconds * a.world:.0f}s for all windows on one GPU), "
          f"{tflops:.0f} model TFLOP/s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def lora_shapes(tokens, bos: int, args, world: int) -> list:
    """For each of `world` ranks, {(rows, window): steps} of LoRA TTT over `tokens` as evaluate_ttt deals the
    documents (doc_groups, every world-th) and LoraScorer walks them (lora_walk), in TTT chunks as the
    settings make them (ttt_chunk_tokens)."""
    from collections import Counter
    import train_gpt as tg
    n, seq_len = len(tokens), args.eval_seq_len or args.train_seq_len
    chunk = tg.ttt_chunk_tokens(args, n)
    groups = tg.doc_groups(tokens, bos, chunk, math.ceil((n - 1) / chunk))
    shapes = [Counter() for _ in range(world)]
    for group in groups:
        for r in range(world):
            lengths = [b - a for a, b in group[r::world]]
            shapes[r].update((rows, window) for *_, rows, window in
                             tg.lora_walk(lengths, args.ttt_lora_chunk, seq_len, args.eval_batch_seqs))
    return shapes


def run_lora(a) -> None:
    """LoRA TTT's time on the busiest of --world ranks over --copies shuffled copies of a validation shard's
    documents (their lengths stand in for FineWeb's, which are not here), from each step shape's time on this
    device: its graph captured, then replayed --reps times (on the CPU, run eagerly). The shard itself on one
    device too, to hold against a measured run. The weights are random (the time does not depend on them);
    the base model's SGD (TTT_EPOCHS) is not in it."""
    import numpy as np
    import torch
    import train_gpt as tg
    args = settings()
    if not args.ttt_lora_rank:
        raise SystemExit("error: lora times per-document LoRA TTT: set TTT_LORA_RANK > 0")
    tokens = tg.load_val_tokens(a.lengths, args.vocab_size, 0)
    docs = [tokens[x:y] for x, y in tg.doc_spans(tokens, a.bos)]
    order = np.random.default_rng(0)
    big = np.concatenate([docs[j] for _ in range(a.copies) for j in order.permutation(len(docs))] + [tokens[-1:]])
    one, ranks = lora_shapes(tokens, a.bos, args, 1)[0], lora_shapes(big, a.bos, args, a.world)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tg.build_model(args, a.bos).to(device)
    model.looping = args.loop_repeats > 0
    vocab = torch.arange(args.vocab_size, device=device)
    scorer = tg.LoraScorer(model, args, (torch.full_like(vocab, 3, dtype=torch.int32), vocab % 3 == 0, vocab < 4), device)
    chunk, times, capture_s = args.ttt_lora_chunk, {}, 0.0
    for rows, window in sorted(set(one).union(*ranks)):
        t0 = tg.sync_time(device)
        step = scorer.step(rows, window)
        capture_s += tg.sync_time(device) - t0
        for buffer in (step.ids, step.prev, step.targets):
            buffer.random_(4, args.vocab_size)
        step.pos.copy_(torch.arange(window - chunk, window))
        step.mask.fill_(1)
        step.run()
        t0 = tg.sync_time(device)
        for _ in range(a.reps):
            step.run()
        times[rows, window] = (tg.sync_time(device) - t0) / a.reps

    def summary(shapes) -> tuple[float, str]:
        seconds = sum(n * times[s] for s, n in shapes.items())
        padded = sum(n * rows * window for (rows, window), n in shapes.items())
        return seconds, f"{sum(shapes.values()):,} steps, {padded / 1e6:.1f}M padded token-passes, {seconds:.1f}s of steps"

    how = (f"{args.ttt_phases} phases" if args.ttt_phases else f"TTT chunks of {args.ttt_chunk_tokens}") if args.ttt_epochs else "one TTT chunk"
    print(f"LoRA rank {args.ttt_lora_rank}, chunk {chunk}, {how}, on {device.type}: {len(times)} step shapes, "
          f"captured in {capture_s:.1f}s")
    print(f"the shard on one device ({len(tokens):,} tokens): {summary(one)[1]}")
    worst = max(ranks, key=lambda shapes: summary(shapes)[0])
    print(f"the busiest of {a.world} ranks on {a.copies} copies ({len(big):,} tokens): {summary(worst)[1]}")


def run_attention(a) -> None:
    """Forward+backward of causal GQA attention at the training shape through each SDPA backend."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    args = settings()
    heads, kv, seq = args.num_heads, args.num_kv_heads, args.train_seq_len
    dim = args.model_dim // heads
    batch = args.train_batch_tokens // 8 // seq
    shape = lambda h: (batch, h, seq, dim)  # noqa: E731
    q = torch.randn(shape(heads), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(shape(kv), device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(shape(heads), device="cuda", dtype=torch.bfloat16)

    def native_gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def repeated_kv():
        return F.scaled_dot_product_attention(q, k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1), is_causal=True)

    flops = 4 * batch * heads * seq * seq * dim / 2 * 3.5  # causal: half of QK^T and AV; backward 2.5x
    print(f"attention fwd+bwd, batch {batch} x seq {seq}, {heads} heads / {kv} kv heads of {dim}:")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for label, fn in (("native GQA", native_gqa), ("k/v repeated", repeated_kv)):
            def step():
                with sdpa_kernel(backend):
                    fn().backward(grad)
            try:
                ms = median_ms(step)
                print(f"  {backend.name:<20} {label:<13} {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
            except RuntimeError as err:
                print(f"  {backend.name:<20} {label:<13} unsupported: {str(err).splitlines()[0][:90]}")


def training_step():
    """The script's own model, optimizers and training step (8 micro-steps, clip, optimizer steps) on
    random tokens, compiled as the script compiles it; returns a function that runs one step."""
    import torch
    import train_gpt as tg
    args = settings()
    device = torch.device("cuda")
    model = tg.build_model(args, bos_id=1).to(device)
    compiled = torch.compile(model, dynamic=False)
    optimizers = tg.build_optimizers(model, args)
    seqs = args.train_batch_tokens // 8 // args.train_seq_len
    tokens = torch.randint(4, args.vocab_size, (seqs, args.train_seq_len + 1), device=device)
    batches = iter(lambda: (tokens[:, :-1], tokens[:, 1:]), None)

    def step():
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        tg.accumulate_gradients(compiled, batches, 8, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        torch.cuda.synchronize()
    return step


def run_step(a) -> None:
    """ms per training step without the script's data loading, logging and packing: a quick way to
    compare compiler settings or kernels (one process per variant, set through the environment)."""
    import torch
    t0 = time.perf_counter()
    step = training_step()
    for _ in range(3):
        step()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    print(f"step: median {times[len(times) // 2]:.1f} ms, min {times[0]:.1f}, max {times[-1]:.1f} over {a.steps} steps "
          f"(compile and 3 warm-up steps {compile_s:.0f}s), peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def run_profile(a) -> None:
    """Where one training step's GPU time goes: two steps under torch.profiler after three warm-up
    steps; kernels by total time."""
    from torch.profiler import ProfilerActivity, profile
    step = training_step()
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=120))


def run_pack(a) -> None:
    """Time quantization and packing of the configured model (weights perturbed off their init), with
    GPTQ on Hessians of GPTQ_CALIB_SEQS random-token sequences when that is > 0 (on the GPU if there is
    one, as in the script) and the clips spread by QUANT_ALLOC, and print the payload estimate the script logs before training and the
    per-group report. Random weights and tokens: the bytes and errors are not those of a trained model."""
    import torch
    import train_gpt as tg
    args = settings()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tg.build_model(args, bos_id=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    model.to(device)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    bits, clips = tg.parse_quant_bits(args.quant_bits), tg.parse_quant_clip(args.quant_clip)
    payload = tg.payload_bytes(state, bits, [], args.fp16_max_numel, clips)
    hessians, sensitivities, t0 = {}, {}, time.perf_counter()
    if args.gptq_calib_seqs:
        x = torch.randint(4, args.vocab_size, (args.gptq_calib_seqs, args.train_seq_len + 1), device=device)
        hessians = tg.collect_hessians(model, x[:, :-1], x[:, 1:])
        if args.quant_alloc:
            generator = torch.Generator(device).manual_seed(0)
            sensitivities = tg.weight_sensitivities(model, x[: tg.CALIB_BATCH_SEQS, :-1], generator)
    t1 = time.perf_counter()
    blob, report = tg.pack_model(state, bits, [], args.fp16_max_numel, args.compressor, clips, hessians, sensitivities,
                                 args.quant_alloc, block=args.gptq_block, damp=args.gptq_damp,
                                 act_order=bool(args.gptq_act_order))
    print(f"config: {args.num_layers}L {args.model_dim}d MLP{args.mlp_mult:g}, {args.quant_bits}, {args.quant_clip}, "
          f"{args.compressor}, GPTQ_CALIB_SEQS={args.gptq_calib_seqs} on {device}; payload {payload:,} bytes; "
          f"Hessians {t1 - t0:.1f}s; packed {len(blob):,} bytes in {time.perf_counter() - t1:.1f}s")
    for row in report:
        print("  " + " ".join(f"{k}:{v}" for k, v in row.items()))


def median_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_compare(a) -> None:
    first, second = (read_steps(Path(p).read_text()) for p in (a.logs[0], a.logs[1]))
    pairs = [(s, l1, l2) for (s, l1, _), (s2, l2, _) in zip(first, second) if s == s2]
    worst = max(pairs, key=lambda p: abs(p[1] - p[2]))
    mean = sum(abs(l1 - l2) for _, l1, l2 in pairs) / len(pairs)
    print(f"{len(pairs)} steps compared: mean |dloss| {mean:.4f}, max {abs(worst[1] - worst[2]):.4f} at step {worst[0]}")
    for s, l1, l2 in pairs:
        if s == 1 or s % 50 == 0 or s == pairs[-1][0]:
            print(f"step {s}: {l1:.4f} {l2:.4f} ({l2 - l1:+.4f})")


# The proxy protocol (../shared/docs/proxy.md): one rank's share of a competition step on one GPU, the
# wallclock cut from 600 s to T, and every schedule counted in steps cut by the same factor.
PROXY_BATCH_TOKENS = 98_304
STEP_SCHEDULES = ("WARMDOWN_ITERS", "MUON_MOMENTUM_WARMUP_STEPS", "SWA_EVERY")
# Set by the protocol, so not logged as changed. A step schedule given by hand is logged at its given value (the
# run gets it scaled, as it gets EMA_DECAY).
PROXY_SET = ("DATA_PATH", "TOKENIZER_PATH", "TRAIN_BATCH_TOKENS", "GRAD_ACCUM_STEPS", "MAX_WALLCLOCK_SECONDS",
             "VAL_LOSS_EVERY", "OUT_DIR", "ALLOW_OVER_CAP")
PROXY_PATTERNS = dict(
    final=r"^final_score val_loss:\S+ val_bpb:(\S+)", mode=r"^final_score .* eval:(\S+)", pre=r"^pre-quantization .* val_bpb:(\S+)",
    cost=r"^round trip: .*quantization cost (\S+) bpb", steps=r"^training: (\d+) steps",
    ms=r"^training: .*\(([\d.]+)ms/step\)", bytes=r"^artifact: ([\d,]+) bytes", gpu=r"^run .*device=\S+ \((.*)\)$",
    eval_s=r"^evaluation took ([\d.]+)s")


def proxy_env(args, t: float, data: Path, tokenizer: Path, out: Path) -> dict:
    env = dict(os.environ, DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), TRAIN_BATCH_TOKENS=str(PROXY_BATCH_TOKENS),
               GRAD_ACCUM_STEPS="1", MAX_WALLCLOCK_SECONDS=str(t), VAL_LOSS_EVERY="0", OUT_DIR=str(out), ALLOW_OVER_CAP="1")
    # An EMA's horizon, 1 / (1 - decay) steps, is a step schedule too: 1 - decay grows by 600 / T.
    if args.ema_decay > 0:
        env["EMA_DECAY"] = str(max(0.0, 1 - (1 - args.ema_decay) * 600 / t))
    for name in STEP_SCHEDULES:
        steps = getattr(args, name.lower())  # 0 (off) stays 0
        env[name] = str(max(1, round(steps * t / 600)) if steps > 0 else 0)
    return env


def proxy_summary(log: str) -> dict:
    found = {k: re.search(p, log, re.M) for k, p in PROXY_PATTERNS.items()}
    return {k: m.group(1) if m else "?" for k, m in found.items()}


def proxy_variants(spec: str) -> list[dict]:
    """[{NAME: value}] from "XSA_LAST_N=0;ROPE_DIMS=0,LN_SCALE=0": one run per ';', each adding its settings
    to the environment's (no spec: one run of the environment as it is)."""
    variants = []
    for text in (v.strip() for v in spec.split(";")):
        items = [item.strip().partition("=") for item in text.split(",") if item.strip()]
        if any(not name or not sep for name, sep, _ in items):
            raise SystemExit(f"error: --variants item {text!r}: use NAME=VALUE,NAME=VALUE;...")
        if items:
            variants.append({name: value for name, _, value in items})
    return variants or [{}]


def variant_plan(script, a, variant: dict, out: Path) -> dict:
    """The settings a variant changes, its environment under the protocol, and its shards, with the
    environment's settings plus the variant's read by the script's own Hyperparameters."""
    saved = dict(os.environ)
    os.environ.update(variant)
    try:
        args = script.Hyperparameters()
        changed = {k: os.environ[k] for k in script._SETTINGS if k in os.environ and k not in PROXY_SET}
        tokenizer = Path(a.tokenizers) / f"fineweb_{args.vocab_size}_bpe.model"
        data = Path(a.data or f"/tmp/proxy_sp{args.vocab_size}")
        return dict(changed=changed, env=proxy_env(args, a.t, data, tokenizer, out), data=data, tokenizer=tokenizer, out=out)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def report_proxy(a, plan: dict, labelled: bool) -> None:
    """The run's summary line, printed (after its settings if `labelled`) and appended to the results file
    with its settings and commit."""
    r = proxy_summary((plan["out"] / "train.log").read_text())
    over = " OVER THE CAP" if r["bytes"] != "?" and int(r["bytes"].replace(",", "")) > 16_000_000 else ""
    settings_text = " ".join(f"{k}={v}" for k, v in sorted(plan["changed"].items())) or "(defaults)"
    line = (f"proxy val_bpb (T={a.t:g}, 1x{r['gpu']}): final {r['final']} (round trip, {r['mode']})  pre-quant {r['pre']}  "
            f"quant cost {r['cost']}  steps {r['steps']}  ms/step {r['ms']}  artifact {r['bytes']} bytes{over}  eval {r['eval_s']}s")
    print(f"{settings_text}: {line}" if labelled else line, flush=True)
    commit = os.environ.get("PROXY_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                               capture_output=True, text=True).stdout.strip() or "?"
    with open(a.results, "a") as f:
        f.write(f"| {time.strftime('%Y-%m-%d')} | {commit} | {settings_text} | {r['final']} | {r['pre']} | {r['cost']} | "
                f"{r['steps']} | {r['ms']} | {r['bytes']}{over} | {r['gpu']}, T={a.t:g} |\n")


def run_proxy(a) -> None:
    """Proxy runs, one per variant of --variants, each on its own GPU (--gpus at a time): shards for each
    tokenizer (built once from the proxy text, then cached), the script under the protocol, one summary
    line each, printed and appended to the results file. With several variants, each writes its log and
    output under --out/vN."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("proxy_script", a.script)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    variants = proxy_variants(a.variants)
    outs = [Path(a.out)] if len(variants) == 1 else [Path(a.out) / f"v{i}" for i in range(len(variants))]
    plans = [variant_plan(script, a, v, out) for v, out in zip(variants, outs)]
    for plan in plans:
        if not (plan["data"] / "fineweb_val_000000.bin").exists():
            from make_data import make_corpus_shards
            t0 = time.time()
            info = make_corpus_shards(str(Path(a.text) / "val.jsonl.xz"), str(Path(a.text) / "train.jsonl.xz"),
                                      str(plan["tokenizer"]), str(plan["data"]))
            print(f"proxy shards in {time.time() - t0:.0f}s: {info}", flush=True)
    cmd = [sys.executable, str(a.script)]
    queue, running, failed = list(plans), {}, []
    while queue or running:
        for gpu in [g for g in range(a.gpus) if g not in running][: len(queue)]:
            plan = queue.pop(0)
            env = dict(plan["env"], CUDA_VISIBLE_DEVICES=str(gpu)) if a.gpus > 1 else plan["env"]
            print(f"running on GPU {gpu}:", " ".join(f"{k}={v}" for k, v in plan["changed"].items()), *cmd, flush=True)
            plan["out"].mkdir(parents=True, exist_ok=True)
            stdout = open(plan["out"] / "stdout.txt", "w") if len(plans) > 1 else None  # interleaved otherwise
            running[gpu] = (subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None),
                            plan, stdout)
        time.sleep(0.2)
        for gpu, (proc, plan, stdout) in list(running.items()):
            if proc.poll() is not None:
                del running[gpu]
                if stdout:
                    stdout.close()
                if proc.returncode:
                    failed.append(plan["out"])
                    print(f"error: the run in {plan['out']} exited with {proc.returncode}", flush=True)
                else:
                    report_proxy(a, plan, len(plans) > 1)
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(plans)} proxy runs failed: {', '.join(map(str, failed))}")


TTT_KEYS = dict(lr="ttt_lr", chunk="ttt_chunk_tokens", phases="ttt_phases", epochs="ttt_epochs", batch="ttt_batch_seqs",
                momentum="ttt_momentum", freeze="ttt_freeze_blocks", clip="ttt_grad_clip", rank="ttt_lora_rank",
                lora_lr="ttt_lora_lr", lora_chunk="ttt_lora_chunk")


def ttt_variants(spec: str, args) -> list[dict]:
    """[{attribute: value}] from "lr=0.005;lr=0.01,chunk=8192": one variant per ';', each overriding the
    TTT_* settings of the environment for that variant only."""
    variants = []
    for text in filter(None, (v.strip() for v in spec.split(";"))):
        variant = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in TTT_KEYS:
                raise SystemExit(f"error: --ttt item {item!r}: keys are {', '.join(TTT_KEYS)}")
            attr = TTT_KEYS[key.strip()]
            variant[attr] = type(getattr(args, attr))(value)
        variants.append(variant)
    return variants


def run_score(a) -> None:
    """Score one artifact as the script's round trip does (the model shape from the environment), plain and
    sliding, then with score-first TTT for each variant of --ttt (TTT_* settings from the environment, each
    variant overriding some; the weights are reloaded from the file before each): compares evaluations
    without retraining. Proxy text and tokenizer as for `proxy`."""
    import numpy as np
    import sentencepiece as spm
    import torch
    import train_gpt as tg
    args = tg.Hyperparameters()
    variants = ttt_variants(a.ttt, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    luts = tg.byte_luts(sp, args.vocab_size, device)
    val = torch.from_numpy(tg.load_val_tokens(str(Path(args.data_path) / "fineweb_val_*.bin"), args.vocab_size,
                                              args.val_tokens_limit).astype(np.int32)).to(device)
    if args.val_tokens_limit:
        print(f"score: the first {val.numel():,} validation tokens only (VAL_TOKENS_LIMIT), not comparable to the whole split")
    seq_len = args.eval_seq_len or args.train_seq_len
    state = tg.unpack_model(Path(a.artifact).read_bytes())
    model = tg.build_model(args, sp.bos_id()).to(device)
    model.looping = args.loop_repeats > 0  # a run that reached LOOP_START_FRAC
    model.load_state_dict(state)
    scorer = torch.compile(model, dynamic=False) if args.compile else model
    for stride in () if a.no_baseline else (0, args.eval_stride):
        t0 = tg.sync_time(device)
        loss, bpb = tg.evaluate(scorer, val, seq_len, stride, args.eval_batch_seqs, luts)
        print(f"score {'sliding' if stride else 'plain'}: val_loss {loss:.4f} val_bpb {bpb:.5f} in {tg.sync_time(device) - t0:.1f}s", flush=True)
    base = {attr: getattr(args, attr) for attr in TTT_KEYS.values()}
    for variant in variants:
        vars(args).update(base, **variant)
        model.load_state_dict(state)
        for p in model.parameters():
            p.requires_grad_(True)  # ttt_parameters froze the last variant's blocks
        params = tg.ttt_parameters(model, args.ttt_freeze_blocks)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loss, bpb, score_s, adapt_s = tg.evaluate_ttt(scorer, params, val, seq_len, args.eval_stride, luts, args, eager=model)
        mode = ("docs+lora" if args.ttt_lora_rank else "sliding") + ("+ttt" if args.ttt_epochs else "")
        shown = " ".join(f"{k}={getattr(args, attr)}" for k, attr in TTT_KEYS.items())
        peak = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"score {mode} {shown}: val_loss {loss:.4f} val_bpb {bpb:.5f}, scoring {score_s:.1f}s + "
              f"adaptation {adapt_s:.1f}s{peak}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--skip", type=int, default=10, help="steps left out of the mean (warm-up of caches and allocator)")
    t.add_argument("--nproc", type=int, default=1)
    t.add_argument("--data", default="/tmp/pg_bench")
    t.add_argument("--out", default="/tmp/pg_bench_out")
    t.add_argument("--train-tokens", type=int, default=60_000_000)
    t.add_argument("--val-tokens", type=int, default=1_000_000)
    t.add_argument("--tokenizer", default=str(ROOT / ".carry" / "fineweb_1024_bpe.model"))
    e = sub.add_parser("eval")
    e.add_argument("--world", type=int, default=8)
    lo = sub.add_parser("lora")
    lo.add_argument("--lengths", required=True, help="a validation shard whose documents' lengths to use")
    lo.add_argument("--copies", type=int, default=32, help="copies of its documents (32: the proxy's to FineWeb's size)")
    lo.add_argument("--world", type=int, default=8)
    lo.add_argument("--reps", type=int, default=5)
    lo.add_argument("--bos", type=int, default=1)
    sub.add_parser("attention")
    sub.add_parser("pack")
    st = sub.add_parser("step")
    st.add_argument("--steps", type=int, default=10)
    p = sub.add_parser("profile")
    p.add_argument("--rows", type=int, default=30)
    c = sub.add_parser("compare")
    c.add_argument("logs", nargs=2)
    x = sub.add_parser("proxy")
    x.add_argument("--t", type=float, default=180.0, help="wallclock seconds (the competition's 600 scaled)")
    x.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "proxy"), help="folder of val/train.jsonl.xz")
    x.add_argument("--tokenizers", default=str(ROOT.parent / "shared" / "data" / "tokenizers"))
    x.add_argument("--data", default="", help="shard cache (default /tmp/proxy_spVOCAB)")
    x.add_argument("--out", default="/tmp/proxy_out")
    x.add_argument("--script", default=str(ROOT / "train_gpt.py"))
    x.add_argument("--results", default=str(ROOT / "benchmarks" / "proxy_results.md"))
    x.add_argument("--variants", default="", help="runs to make, ';'-separated, each NAME=VALUE,... added to the "
                   "environment's settings (none: one run)")
    x.add_argument("--gpus", type=int, default=1, help="variants run at once, one per GPU (CUDA_VISIBLE_DEVICES)")
    sc = sub.add_parser("score")
    sc.add_argument("--artifact", default="/tmp/proxy_out/final_model.ptz")
    sc.add_argument("--ttt", default="", help="TTT variants to try, ';'-separated, each KEY=VALUE,... with KEY in "
                    + ", ".join(TTT_KEYS) + " (epochs > 0: chunked SGD of the model; rank > 0: per-document LoRA)")
    sc.add_argument("--no-baseline", action="store_true", help="skip the plain and sliding scores without TTT")
    a = ap.parse_args()
    {"score": run_score, "proxy": run_proxy, "train": run_train, "eval": run_eval, "lora": run_lora, "attention": run_attention, "profile": run_profile, "step": run_step, "pack": run_pack, "compare": run_compare}[a.mode](a)


if __name__ == "__main__":
    main()
