"""Session-4 experiment, kept as run (2026-11-25): the MLP's fused relu^2 path against the plain one on GPU, compiled, fwd+bwd."""
import sys, torch
sys.path.insert(0, ".")
import train_gpt as tg
import torch.nn.functional as F
from triton.testing import do_bench
torch.manual_seed(0)
mlp = tg.MLP(512, 3.0).cuda()
x = torch.randn(48, 2048, 512, device="cuda", requires_grad=True)
g = torch.randn(48, 2048, 512, device="cuda").bfloat16()
plain = lambda x: mlp.proj(F.relu(mlp.fc(x)).square())
def run(fn):
    x.grad = None; mlp.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fn(tg.rms_norm(x))
    y.backward(g)
    return [t.detach().double() for t in (y, x.grad, mlp.fc.weight.grad, mlp.proj.weight.grad)]
ref, fused = run(plain), run(mlp)
for name, r, f in zip(["out", "dx", "dfc", "dproj"], ref, fused):
    print(f"ACC {name}: fused vs plain {((f - r).norm() / r.norm()).item():.2e}")
def step(fn):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fn(tg.rms_norm(x))
    y.backward(g)
for name, fn in (("plain", plain), ("fused", mlp.forward)):
    c = torch.compile(fn)
    step(c)
    print(f"TIME {name} compiled norm+MLP fwd+bwd: {1000 * do_bench(lambda: step(c), return_mode='median'):.1f} us")
