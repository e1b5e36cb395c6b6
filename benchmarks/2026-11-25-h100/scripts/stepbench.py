"""Session-4 driver, kept as run (2026-11-25): bare training step of a train_gpt.py variant, and a profile with
GPU idle-gap analysis.  python3 exp/stepbench.py VARIANT.py [--profile] [--steps 10]"""
import argparse, importlib.util, json, os, sys, time, collections, gzip

ap = argparse.ArgumentParser()
ap.add_argument("script")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--profile", action="store_true")
ap.add_argument("--trace", default="")
a = ap.parse_args()

spec = importlib.util.spec_from_file_location("train_gpt", a.script)
tg = importlib.util.module_from_spec(spec)
sys.modules["train_gpt"] = tg
spec.loader.exec_module(tg)
import torch

args = tg.Hyperparameters()
device = torch.device("cuda")
torch.manual_seed(0)
model = tg.build_model(args, bos_id=1).to(device)
compiled = torch.compile(model, dynamic=False)
optimizers = tg.build_optimizers(model, args)
seqs = args.train_batch_tokens // 8 // args.train_seq_len
g = torch.Generator(device=device).manual_seed(0)
tokens = torch.randint(4, args.vocab_size, (8, seqs, args.train_seq_len + 1), device=device, generator=g)
tokens[:, :, ::97] = 1  # some BOS
state = {"i": 0}


def nxt():
    t = tokens[state["i"] % 8]
    state["i"] += 1
    return t[:, :-1], t[:, 1:]


batches = iter(nxt, None)
R = torch.profiler.record_function


def step(sync=True):
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with R("PH_fwd_bwd"):
        loss = tg.accumulate_gradients(compiled, batches, 8, device)
    with R("PH_clip"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
    with R("PH_adam"):
        optimizers[0].step()
    with R("PH_muon"):
        optimizers[1].step()
    if sync:
        torch.cuda.synchronize()
    return loss


t0 = time.perf_counter()
losses = [step().item() for _ in range(3)]
compile_s = time.perf_counter() - t0
times = []
for _ in range(a.steps):
    t0 = time.perf_counter()
    step()
    times.append(1000 * (time.perf_counter() - t0))
times.sort()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(a.steps):
    l = step(sync=False)
torch.cuda.synchronize()
nosync = 1000 * (time.perf_counter() - t0) / a.steps
print(f"RESULT {os.path.basename(os.path.dirname(a.script)) or a.script}: median {times[len(times)//2]:.1f} ms "
      f"min {times[0]:.1f} max {times[-1]:.1f}; back-to-back {nosync:.1f} ms; compile {compile_s:.0f}s; "
      f"peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB; losses {['%.4f' % x for x in losses]} last {l.item():.4f}",
      flush=True)

if a.profile:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    path = a.trace or "/tmp/trace.json"
    prof.export_chrome_trace(path)
    ev = json.load(open(path))["traceEvents"]
    kern = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    kern.sort(key=lambda e: e["ts"])
    lo, hi = kern[0]["ts"], max(e["ts"] + e["dur"] for e in kern)
    busy, cur_s, cur_e = 0.0, None, None
    gaps = []
    prev_name = ""
    for e in kern:
        s, d = e["ts"], e["ts"] + e["dur"]
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                gaps.append((s - cur_e, prev_name, e["name"], cur_e))
            cur_s, cur_e = s, d
        else:
            cur_e = max(cur_e, d)
        prev_name = e["name"]
    busy += cur_e - cur_s
    span = hi - lo
    print(f"PROFILE 2 steps: span {span/2000:.1f} ms/step, kernels busy {busy/2000:.1f} ms/step, idle {(span-busy)/2000:.1f} ms/step")
    # phases from gpu_user_annotation
    ph = collections.defaultdict(float)
    for e in ev:
        if e.get("cat") == "gpu_user_annotation" and e["name"].startswith("PH_"):
            ph[e["name"]] += e["dur"] / 2000
    print("PHASES (GPU span ms/step):", {k: round(v, 1) for k, v in ph.items()})
    # idle within each CPU phase
    big = sorted(gaps, reverse=True)[:15]
    print("LARGEST GAPS (us, before -> after):")
    for gdur, p, n, t in big:
        print(f"  {gdur:8.0f}  {p[:60]} -> {n[:60]}")
    gsum = collections.Counter()
    for gdur, *_ in gaps:
        gsum["<5us" if gdur < 5 else "5-20" if gdur < 20 else "20-100" if gdur < 100 else ">100"] += gdur / 2000
    print("GAP TOTALS ms/step by size:", {k: round(v, 2) for k, v in gsum.items()})
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in kern:
        by[e["name"]][0] += e["dur"] / 2000
        by[e["name"]][1] += 1
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])
    cat = collections.Counter()
    for n, (t, c) in rows:
        k = ("attention" if ("sdpa" in n or "cudnn" in n or "flash" in n or "fmha" in n) else
             "matmul" if ("nvjet" in n or "gemm" in n or "cutlass" in n or "sm90_xmma" in n) else
             "triton" if n.startswith("triton") else "other")
        cat[k] += t
    print("CATEGORIES ms/step:", {k: round(v, 1) for k, v in cat.items()})
    print("KERNELS (ms/step, calls/step, us/call):")
    for n, (t, c) in rows[:70]:
        print(f"  {t:7.2f} {c/2:6.0f} {1000*t/(c/2):8.1f}  {n[:150]}")
    if a.trace:
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as z:
            z.write(f.read())
        os.remove(path)
