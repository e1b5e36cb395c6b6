"""Session-4 experiment, kept as run (2026-11-25): fused q/k norm + rotary kernels on GPU: accuracy against fp64 and the
plain path, and time against the compiled plain path, at the training shape."""
import sys, torch
sys.path.insert(0, ".")
import train_gpt as tg
import triton
from triton.testing import do_bench

dev = "cuda"
b, t, heads, kv, hd = 48, 2048, 8, 4, 64
torch.manual_seed(0)
qkv = (torch.randn(b, t, (heads + 2 * kv) * hd, device=dev) * 2).bfloat16().requires_grad_()
gain = (torch.rand(heads, device=dev) + 1.0).requires_grad_()
cos, sin = (x.to(dev) for x in tg.rotary_tables(t, hd, 10000.0))
# gradients laid out as cuDNN returns them: (b, h, t, d) memory, viewed as (b, t, h, d)
gq = torch.randn(b, heads, t, hd, device=dev).bfloat16().transpose(1, 2)
gk, gv = (torch.randn(b, kv, t, hd, device=dev).bfloat16().transpose(1, 2) for _ in range(2))


def run(fn):
    qkv.grad = gain.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q, k, v = fn(qkv, gain, cos, sin, heads)
    torch.autograd.backward((q, k, v), (gq, gk, gv))
    return [x.detach().double() for x in (q, k, v, qkv.grad, gain.grad)]


# fp64 truth
x = qkv.detach().double().requires_grad_()
g64 = gain.detach().bfloat16().double().requires_grad_()
q, k, v = x.split((heads * hd, kv * hd, kv * hd), -1)
nq = q.view(b, t, heads, hd)
nq = nq / (nq.pow(2).mean(-1, keepdim=True) + 1.19e-7).sqrt() * g64[:, None]
nk = k.view(b, t, kv, hd)
nk = nk / (nk.pow(2).mean(-1, keepdim=True) + 1.19e-7).sqrt()
q64, k64 = tg.apply_rotary(nq, cos.double(), sin.double()), tg.apply_rotary(nk, cos.double(), sin.double())
torch.autograd.backward((q64, k64, v.view(b, t, kv, hd)), (gq.double(), gk.double(), gv.double()))
truth = [q64.detach(), k64.detach(), v.detach().reshape(b, t, kv, hd), x.grad, g64.grad]

ref = run(tg.qk_norm_rotary_reference)
fused = run(tg.qk_norm_rotary)
for label, tr, r, f in zip("q k v dqkv dgain".split(), truth, ref, fused):
    e = lambda a: ((a - tr).norm() / tr.norm()).item()
    print(f"ACC {label:6s} plain vs fp64 {e(r):.2e}   fused vs fp64 {e(f):.2e}   fused vs plain {((f - r).norm() / r.norm()).item():.2e}")

compiled_ref = torch.compile(tg.qk_norm_rotary_reference)
for name, fn in (("plain compiled", compiled_ref), ("fused", tg.qk_norm_rotary)):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = fn(qkv, gain, cos, sin, heads)
        torch.autograd.backward((q, k, v), (gq, gk, gv))
    ms = do_bench(step, warmup=50, rep=300, return_mode="median")
    print(f"TIME {name:15s} fwd+bwd {1000 * ms:7.1f} us")

# block / warps sweep of the raw kernels
n = b * t
qo = torch.empty(b, t, heads, hd, device=dev, dtype=torch.bfloat16)
ko, vo = (torch.empty(b, t, kv, hd, device=dev, dtype=torch.bfloat16) for _ in range(2))
dqkv = torch.empty_like(qkv)
nbytes_f = 2 * qkv.numel() * 2
nbytes_b = (qkv.numel() * 2 + (heads + kv) * hd * n * 2 + qkv.numel() * 2)
for block in (16, 32, 64, 128):
    for warps in (2, 4, 8):
        grid = (triton.cdiv(n, block),)
        parts = torch.empty(grid[0], heads, device=dev)
        f = lambda: tg._qk_norm_rotary_fwd[grid](qkv, gain, cos, sin, qo, ko, vo, n, t, 1.19e-7, heads, kv, hd // 2, block, num_warps=warps)
        bw = lambda: tg._qk_norm_rotary_bwd[grid](qkv, gain, cos, sin, gq, gk, gv, dqkv, parts, n, t, 1.19e-7,
                                                 *gq.stride()[:3], *gk.stride()[:3], *gv.stride()[:3], heads, kv, hd // 2, block, num_warps=warps)
        tf, tb = do_bench(f, return_mode="median"), do_bench(bw, return_mode="median")
        print(f"SWEEP block {block:4d} warps {warps}: fwd {1000 * tf:6.1f} us ({nbytes_f / tf / 1e9:5.2f} TB/s)  "
              f"bwd {1000 * tb:6.1f} us ({nbytes_b / tb / 1e9:5.2f} TB/s)")
