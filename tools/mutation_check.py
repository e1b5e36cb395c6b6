#!/usr/bin/env python3
"""Break each technique's math in train_gpt.py, one way at a time, and show which test catches it.

  python3 tools/mutation_check.py [--only NAME_FRAGMENT]

Each mutation replaces one exact piece of train_gpt.py (it must occur once), runs the test files that
cover that section with pytest -x, and prints the first failing test, or "NOT CAUGHT". train_gpt.py is
restored after every mutation, also on Ctrl-C. Exit status 1 when any mutation is not caught or no
longer applies (the code moved on: update its line here). On this workplace's CPU the whole list took
129 s (2026-12-02).
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["tests/test_model.py", "tests/test_hyperparameters.py"]
OPTIM = ["tests/test_optimizer.py"]
QUANT = ["tests/test_quantization.py"]
EVAL = ["tests/test_evaluation.py"]

# (technique: how it is broken, the exact code, its broken form, test files to run)
MUTATIONS = [
    ("XSA: value direction not normalized", "vn = F.normalize(v.float(), dim=-1).unsqueeze(3)",
     "vn = v.float().unsqueeze(3)", MODEL),
    ("XSA: own-value component added, not removed", "return (yg - (yg.float()", "return (yg + (yg.float()", MODEL),
    ("parallel residuals: the MLP reads x + attention", "h = rms_norm(x if self.parallel else x + a)",
     "h = rms_norm(x + a)", MODEL),
    ("parallel residuals: one block too few", "parallel=i >= num_layers - parallel_last_n",
     "parallel=i > num_layers - parallel_last_n", MODEL),
    ("QK gain: QK_GAIN_INIT ignored", "self.q_gain = nn.Parameter(torch.full((heads,), qk_gain))",
     "self.q_gain = nn.Parameter(torch.full((heads,), 1.5))", MODEL),
    ("MLP_MULT ignored (3x)", "hidden = int(mult * dim)", "hidden = int(3 * dim)", MODEL),
    ("partial RoPE: ROPE_DIMS ignored", "rotated = (rope_dims or head_dim) // 2", "rotated = head_dim // 2", MODEL),
    ("partial RoPE: the full head's frequencies",
     "inv_freq = base ** (-torch.arange(rotated, dtype=torch.float32) / rotated)",
     "inv_freq = base ** (-torch.arange(rotated, dtype=torch.float32) / (head_dim // 2))", MODEL),
    ("LN scale: 1/sqrt(i+2)", "norm_scale=(i + 1) ** -0.5 if ln_scale", "norm_scale=(i + 2) ** -0.5 if ln_scale", MODEL),
    ("LeakyReLU²: half the slope", "return F.leaky_relu(h, slope) if slope else torch.relu(h)",
     "return F.leaky_relu(h, slope / 2) if slope else torch.relu(h)", MODEL),
    ("skip gates: the blend reversed", "return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))",
     "return torch.lerp(x, skip, torch.sigmoid(self.skip_gates[j]).to(x.dtype))", MODEL),
    ("BigramHash: the pair's order ignored", "h = ((prev * 0x9E3779B1) ^ (ids * 0x85EBCA77))",
     "h = ((prev * 0x85EBCA77) ^ (ids * 0x85EBCA77))", MODEL),
    ("MuonEq-R: column norms", "grads = grads / grads.float().norm(dim=-1, keepdim=True)",
     "grads = grads / grads.float().norm(dim=-2, keepdim=True)", OPTIM),
    ("weight decay: not scaled by the LR", 'torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])',
     'torch._foreach_mul_(params, 1 - group["weight_decay"])', OPTIM),
    ("Muon momentum warm-up reversed", "return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum",
     "return frac * args.muon_momentum_warmup_start + (1 - frac) * args.muon_momentum", OPTIM),
    ("EMA: decay and weight swapped", "[current[k].float() for k in self.ema], 1 - self.ema_decay)",
     "[current[k].float() for k in self.ema], self.ema_decay)", OPTIM),
    ("SWA: divided by one snapshot more", "return {k: v / self.swa_count for k, v in self.swa.items()}",
     "return {k: v / (self.swa_count + 1) for k, v in self.swa.items()}", OPTIM),
    ("warmdown fraction: its complement",
     "down = (1 - training_progress(step, elapsed_ms, args)) / args.warmdown_frac",
     "down = (1 - training_progress(step, elapsed_ms, args)) / (1 - args.warmdown_frac)", OPTIM),
    ("LR floor ignored", "return warm * (args.lr_floor + (1 - args.lr_floor) * down)", "return warm * down", OPTIM),
    ("SmearGate: blends toward itself", "blended = torch.lerp(x, prev, torch.sigmoid(self.gate).to(x.dtype))",
     "blended = torch.lerp(prev, x, torch.sigmoid(self.gate).to(x.dtype))", MODEL),
    ("SmearGate: a document's start smeared too", "return torch.where(starts[..., None], x, blended)",
     "return blended", MODEL),
    ("U-Net skips: first in, first out", "x = self.skip_in(pos - encoder, x, skips.pop())",
     "x = self.skip_in(pos - encoder, x, skips.pop(0))", MODEL),
    ("depth recurrence: the last looped block left out",
     "list(range(first, last + 1)) * loop_repeats", "list(range(first, last)) * loop_repeats", MODEL),
    ("SDClip: a step of k std / (qmax + 1)", "return (clip * w.std(dim=1, correction=0, keepdim=True) / qmax)",
     "return (clip * w.std(dim=1, correction=0, keepdim=True) / (qmax + 1))", QUANT),
    ("GPTQ: a column's error pushed the wrong way", "wb[:, i + 1 :] -= e * ub[i : i + 1, i + 1 :]",
     "wb[:, i + 1 :] += e * ub[i : i + 1, i + 1 :]", QUANT),
    ("GPTQ: a block's errors kept from later blocks", "w[:, end:] -= err @ u[start:end, end:]",
     "w[:, end:] -= 0 * (err @ u[start:end, end:])", QUANT),
    ("QUANT_ALLOC: wider clips for the more sensitive", "out[n] = k * min(max(math.exp(-alloc * (logs[n] - center))",
     "out[n] = k * min(max(math.exp(alloc * (logs[n] - center))", QUANT),
    ("TTT: each chunk trained on before it is scored", "train_on_chunk(model, params, opt, tokens, c, chunk,",
     "train_on_chunk(model, params, opt, tokens, c + 1, chunk,", EVAL),
    ("LoRA TTT: a target read as its own input", "step.pos.copy_(target - lo - 1)", "step.pos.copy_(target - lo)", EVAL),
]


def first_failure(files: list[str]) -> str | None:
    """The first failing test's id, or None when every test passes."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                       cwd=ROOT, capture_output=True, text=True)
    failed = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    return failed[0] if failed else (None if r.returncode == 0 else f"pytest exited {r.returncode}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run only the mutations whose name contains this")
    a = p.parse_args()
    script = ROOT / "train_gpt.py"
    original = script.read_text()
    missed = 0
    try:
        for name, code, broken, files in MUTATIONS:
            if a.only.lower() not in name.lower():
                continue
            if original.count(code) != 1:
                print(f"{name}: STALE (the code occurs {original.count(code)} times, not once)", flush=True)
                missed += 1
                continue
            script.write_text(original.replace(code, broken))
            caught = first_failure(files)
            print(f"{name}: {'caught by ' + caught if caught else 'NOT CAUGHT'}", flush=True)
            missed += caught is None
    finally:
        script.write_text(original)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
