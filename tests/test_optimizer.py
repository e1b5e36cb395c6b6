"""Optimizer section of train_gpt.py: Newton-Schulz orthogonalization, Muon, the optimizer split,
the LR schedule and the weight averager. Everything here runs on CPU in a fraction of a second."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import train_gpt as tg

NS_STEPS = 5
# Five quintic steps with the (3.4445, -4.7750, 2.0315) coefficients do not converge to 1; they push
# every singular value that started above ~1/500 of the Frobenius norm into roughly [0.68, 1.2].
BAND = (0.6, 1.3)


def svdvals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.float())


def conditioned(*shape: int, seed: int, smin: float = 0.1) -> torch.Tensor:
    """A random matrix (or stack) with random singular vectors and singular values uniform in [smin, 1]
    times a random overall scale. A square Gaussian matrix has a smallest singular value near 0, which
    no 5-step iteration lifts into the band, so square inputs are drawn with a bounded condition number."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    out = []
    for _ in range(batch[0] if batch else 1):
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
        s = smin + (1 - smin) * torch.rand(k, generator=g)
        scale = 10 ** (4 * torch.rand((), generator=g).item() - 2)  # 0.01 .. 100: the iteration normalizes
        out.append(scale * (u * s) @ v.T)
    return torch.stack(out) if batch else out[0]


# -----------------------------------------------------------------------------
# orthogonalize


@pytest.mark.parametrize(
    "shape, make",
    [
        pytest.param((48, 48), "conditioned", id="square"),
        pytest.param((32, 96), "gaussian", id="wide"),
        pytest.param((96, 32), "gaussian", id="tall"),
        pytest.param((4, 40, 40), "conditioned", id="batched_square"),
        pytest.param((3, 24, 64), "gaussian", id="batched_wide"),
        pytest.param((3, 64, 24), "gaussian", id="batched_tall"),
    ],
)
def test_orthogonalize_singular_values_land_in_band_and_shape_is_kept(shape, make):
    if make == "gaussian":
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    else:
        g = conditioned(*shape, seed=sum(shape))
    out = tg.orthogonalize(g, NS_STEPS)
    assert out.shape == g.shape
    s = svdvals(out)
    assert s.min().item() >= BAND[0], s.min().item()
    assert s.max().item() <= BAND[1], s.max().item()
    # Each matrix of a stack is orthogonalized on its own, like a single call on it would.
    if g.ndim == 3:
        for i in range(g.size(0)):
            torch.testing.assert_close(out[i].float(), tg.orthogonalize(g[i], NS_STEPS).float(), atol=2e-2, rtol=0)


def test_orthogonalize_never_overshoots_on_ill_conditioned_square_gaussians():
    """Square Gaussian matrices have tiny singular values that 5 steps leave small, but no singular
    value may blow up past the band, and the bulk of them must be near 1."""
    g = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    s = svdvals(tg.orthogonalize(g, NS_STEPS))
    assert s.max().item() <= BAND[1]
    assert s.median().item() >= BAND[0]


def test_orthogonalize_is_invariant_to_the_gradient_scale():
    g = conditioned(16, 32, seed=3)
    a, b = tg.orthogonalize(g, NS_STEPS).float(), tg.orthogonalize(1000 * g, NS_STEPS).float()
    # Equal up to bf16 rounding (a few percent after five steps); an unnormalized iteration diverges.
    assert ((a - b).norm() / a.norm()).item() < 0.1


def test_orthogonalize_needs_its_five_steps_to_reach_the_band():
    g = conditioned(32, 32, seed=4, smin=0.05)
    few, many = svdvals(tg.orthogonalize(g, 2)), svdvals(tg.orthogonalize(g, NS_STEPS))
    assert few.min() < BAND[0] <= many.min()  # two steps are not enough; five are


# -----------------------------------------------------------------------------
# Muon


def muon_update(p_before: torch.Tensor, p_after: torch.Tensor, lr: float) -> torch.Tensor:
    return (p_before - p_after) / lr


def expected_update(nesterov_grad: torch.Tensor) -> torch.Tensor:
    """What Muon should apply for one matrix: orthogonalize(nesterov grad) * max(1, rows/cols)**0.5."""
    rows, cols = nesterov_grad.shape
    return (tg.orthogonalize(nesterov_grad[None], NS_STEPS) * max(1.0, rows / cols) ** 0.5)[0].float()


@pytest.mark.parametrize("shape", [(16, 32), (32, 16), (24, 24)], ids=["wide", "tall", "square"])
def test_muon_update_is_orthogonal_up_to_the_documented_scale(shape):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(*shape))
    p.grad = conditioned(*shape, seed=11)
    lr = 0.25
    opt = tg.Muon([p], lr=lr, momentum=0.9, ns_steps=NS_STEPS, weight_decay=0.0)
    before = p.detach().clone()
    opt.step()
    update = muon_update(before, p.detach(), lr)
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    s = svdvals(update) / scale
    assert s.min().item() >= BAND[0] and s.max().item() <= BAND[1], (s.min().item(), s.max().item())
    # First step: buf = g, Nesterov grad = g + momentum * g.
    torch.testing.assert_close(update, expected_update(p.grad + 0.9 * p.grad), atol=5e-3, rtol=0)


def test_muon_nesterov_momentum_bookkeeping_over_two_steps():
    shape, m, lr = (16, 24), 0.8, 0.5
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(*shape))
    g1, g2 = conditioned(*shape, seed=21), conditioned(*shape, seed=22)
    opt = tg.Muon([p], lr=lr, momentum=m, ns_steps=NS_STEPS, weight_decay=0.0)

    # Hand-kept bookkeeping: buf = momentum * buf + g; the update uses g + momentum * buf.
    buf = torch.zeros(shape)
    updates, expected = [], []
    for g in (g1, g2):
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        updates.append(muon_update(before, p.detach(), lr))
        buf = m * buf + g
        expected.append(expected_update(g + m * buf))
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, atol=1e-6, rtol=1e-6)

    for got, want in zip(updates, expected):
        torch.testing.assert_close(got, want, atol=5e-3, rtol=0)
    # The second update really depends on the momentum: neither the plain gradient nor the plain
    # (non-Nesterov) buffer gives it.
    plain = expected_update(g2)
    heavy_ball = expected_update(m * g1 + g2)
    assert (updates[1] - plain).abs().max() > 0.05
    assert (updates[1] - heavy_ball).abs().max() > 0.05


def test_muon_decoupled_weight_decay_shrinks_by_exactly_one_minus_lr_wd_with_zero_grad():
    torch.manual_seed(2)
    lr, wd = 0.1, 0.5
    p = nn.Parameter(torch.randn(12, 20))
    p.grad = torch.zeros_like(p)
    opt = tg.Muon([p], lr=lr, momentum=0.95, ns_steps=NS_STEPS, weight_decay=wd)
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before * (1 - lr * wd), atol=0, rtol=1e-6)
    assert not torch.allclose(p.detach(), before)  # it did shrink


def test_muon_zero_grad_without_decay_leaves_the_parameter_unchanged():
    torch.manual_seed(3)
    p = nn.Parameter(torch.randn(12, 20))
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    tg.Muon([p], lr=0.1, momentum=0.95, ns_steps=NS_STEPS, weight_decay=0.0).step()
    assert torch.equal(p.detach(), before)


def test_muon_weight_decay_is_decoupled_from_the_update():
    """p_after = p_before * (1 - lr*wd) - lr * update, with the same update as without decay."""
    torch.manual_seed(4)
    lr, wd = 0.2, 0.3
    p0 = torch.randn(16, 32)
    g = conditioned(16, 32, seed=5)
    results = {}
    for decay in (0.0, wd):
        p = nn.Parameter(p0.clone())
        p.grad = g.clone()
        tg.Muon([p], lr=lr, momentum=0.9, ns_steps=NS_STEPS, weight_decay=decay).step()
        results[decay] = p.detach()
    update = muon_update(p0, results[0.0], lr)
    torch.testing.assert_close(results[wd], p0 * (1 - lr * wd) - lr * update, atol=1e-5, rtol=0)


def test_muon_row_norm_makes_the_update_blind_to_row_scales():
    """MuonEq-R: rows are normalized before Newton-Schulz, so scaling one row of the gradient by 1000
    leaves the update unchanged; without it, that row dominates the orthogonalized update."""
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(16, 32, generator=g)
    skewed = grad.clone()
    skewed[0] *= 1000
    updates = {}
    for row_norm in (True, False):
        for name, gr in (("plain", grad), ("skewed", skewed)):
            p = torch.nn.Parameter(torch.zeros(16, 32))
            p.grad = gr.clone()
            tg.Muon([p], lr=1.0, momentum=0.0, ns_steps=5, weight_decay=0.0, row_norm=row_norm).step()
            updates[row_norm, name] = p.detach().clone()
    torch.testing.assert_close(updates[True, "plain"], updates[True, "skewed"], atol=2e-2, rtol=0)
    assert (updates[False, "plain"] - updates[False, "skewed"]).abs().max() > 0.1
    assert (updates[True, "plain"] - updates[False, "plain"]).abs().max() > 1e-3  # it acts on plain rows too


def test_muon_updates_every_parameter_of_a_mixed_shape_group():
    shapes = [(8, 16), (16, 8), (8, 16), (12, 12), (20, 4)]
    torch.manual_seed(5)
    params = [nn.Parameter(torch.randn(*s)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = conditioned(*p.shape, seed=100 + i)
    lr, m = 0.3, 0.9
    before = [p.detach().clone() for p in params]
    tg.Muon(params, lr=lr, momentum=m, ns_steps=NS_STEPS, weight_decay=0.0).step()
    for p, b in zip(params, before):
        update = muon_update(b, p.detach(), lr)
        assert update.abs().max() > 0, f"parameter of shape {tuple(p.shape)} was not updated"
        torch.testing.assert_close(update, expected_update(p.grad + m * p.grad), atol=1e-2, rtol=0)


# -----------------------------------------------------------------------------
# build_optimizers


def opt_args(**kw):
    base = dict(tied_embed_lr=0.03, scalar_lr=0.02, matrix_lr=0.04, weight_decay=0.04, beta1=0.9, beta2=0.95,
                adam_eps=1e-8, muon_momentum=0.99, muon_backend_steps=NS_STEPS, muon_row_norm=0)
    base.update(kw)
    return SimpleNamespace(**base)


def tiny_gpt(num_layers=3, bigram=16):
    torch.manual_seed(0)
    return tg.GPT(vocab_size=64, num_layers=num_layers, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                  bigram_vocab_size=bigram, bigram_dim=8, max_seq_len=32)


def test_build_optimizers_splits_tables_matrices_and_scalars():
    model = tiny_gpt()
    args = opt_args()
    adam, muon = tg.build_optimizers(model, args)
    names = {id(p): n for n, p in model.named_parameters()}

    def group_names(group):
        return {names[id(p)] for p in group["params"]}

    tables, scalars = adam.param_groups
    assert group_names(tables) == {"tok_emb.weight", "bigram.table.weight"}
    assert tables["weight_decay"] == args.weight_decay
    assert tables["lr"] == tables["base_lr"] == args.tied_embed_lr

    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(muon.param_groups) == 1
    assert group_names(muon.param_groups[0]) == linear
    assert "bigram.proj.weight" in linear and "blocks.0.attn.q.weight" in linear and "blocks.2.mlp.proj.weight" in linear
    assert muon.param_groups[0]["base_lr"] == args.matrix_lr
    assert muon.param_groups[0]["weight_decay"] == args.weight_decay

    expected_scalars = {n for n in names.values() if n not in linear and n not in group_names(tables)}
    assert group_names(scalars) == expected_scalars
    for fragment in ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights", "smear.gate", "bigram.scale"):
        assert any(fragment in n for n in group_names(scalars)), fragment
    assert scalars["weight_decay"] == 0.0
    assert scalars["lr"] == scalars["base_lr"] == args.scalar_lr


@pytest.mark.parametrize("bigram", [16, 0], ids=["with_bigram", "without_bigram"])
def test_build_optimizers_holds_every_parameter_exactly_once(bigram):
    model = tiny_gpt(num_layers=2, bigram=bigram)
    optimizers = tg.build_optimizers(model, opt_args())
    seen = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}


def test_build_optimizers_steps_every_parameter():
    model = tiny_gpt(num_layers=2)
    with torch.no_grad():
        model.bigram.proj.weight.normal_(std=0.02)  # zero-initialized: give it a gradient path
    optimizers = tg.build_optimizers(model, opt_args())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, x.roll(-1, 1)).mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for opt in optimizers:
        opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged


# -----------------------------------------------------------------------------
# lr_multiplier


def sched(**kw):
    base = dict(lr_warmup_steps=10, iterations=1000, warmdown_iters=200, max_wallclock_seconds=0.0, warmdown_frac=0.0,
                lr_floor=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_lr_multiplier_linear_warmup_over_lr_warmup_steps():
    args = sched()
    values = [tg.lr_multiplier(s, 0.0, args) for s in range(10)]
    assert values == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[-1] == pytest.approx(1.0)


def test_lr_multiplier_is_one_between_warmup_and_warmdown():
    args = sched()
    assert all(tg.lr_multiplier(s, 0.0, args) == pytest.approx(1.0) for s in range(10, 801))


def test_lr_multiplier_without_warmup_starts_at_one():
    assert tg.lr_multiplier(0, 0.0, sched(lr_warmup_steps=0)) == pytest.approx(1.0)


def test_lr_multiplier_iteration_warmdown_is_linear_and_reaches_zero_at_iterations():
    args = sched()
    for s in range(800, 1001, 20):
        assert tg.lr_multiplier(s, 0.0, args) == pytest.approx((1000 - s) / 200), s
    assert tg.lr_multiplier(900, 0.0, args) == pytest.approx(0.5)
    assert tg.lr_multiplier(1000, 0.0, args) == 0.0
    assert tg.lr_multiplier(1005, 0.0, args) == 0.0  # never negative
    assert 0 < tg.lr_multiplier(999, 0.0, args) < 0.01


def test_lr_multiplier_is_zero_once_the_wallclock_cap_is_reached():
    args = sched(iterations=10**6, max_wallclock_seconds=10.0)
    for step, elapsed in [(500, 10_000.0), (500, 10_001.0), (700, 15_000.0), (1, 10_000.0)]:
        assert tg.lr_multiplier(step, elapsed, args) == 0.0


def test_lr_multiplier_wallclock_warmdown_is_remaining_over_warmdown_time():
    # Constant 20 ms steps, a 10 s cap, WARMDOWN_ITERS=100: the warmdown takes the last 2 s.
    args = sched(lr_warmup_steps=0, iterations=10**6, warmdown_iters=100, max_wallclock_seconds=10.0)
    step_ms = 20.0
    values = []
    for step in range(350, 501, 10):
        elapsed = step * step_ms
        mean_step_ms = elapsed / step
        want = min(1.0, max(10_000.0 - elapsed, 0.0) / (args.warmdown_iters * mean_step_ms))
        got = tg.lr_multiplier(step, elapsed, args)
        assert got == pytest.approx(want, abs=1e-12), step
        values.append(got)
    assert values[0] == 1.0 and values[-1] == 0.0
    assert tg.lr_multiplier(450, 9_000.0, args) == pytest.approx(0.5)
    tail = values[values.index(1.0, 0) + 5 :]
    assert all(a > b for a, b in zip(tail, tail[1:])), "multiplier must decrease towards the cap"
    # Uneven step times: the mean step time so far is what counts.
    assert tg.lr_multiplier(300, 9_500.0, args) == pytest.approx(500.0 / (100 * 9_500.0 / 300))


def test_lr_multiplier_takes_whichever_warmdown_ends_first():
    # The iteration warmdown (ends at 460) is further along than the time one at step 450.
    args = sched(lr_warmup_steps=0, iterations=460, warmdown_iters=100, max_wallclock_seconds=10.0)
    assert tg.lr_multiplier(450, 9_000.0, args) == pytest.approx(0.1)
    # And the other way round: plenty of iterations left, the cap is close.
    args = sched(lr_warmup_steps=0, iterations=10**6, warmdown_iters=100, max_wallclock_seconds=10.0)
    assert tg.lr_multiplier(490, 9_800.0, args) == pytest.approx(0.1)


def test_lr_multiplier_warmdown_fraction_is_linear_in_steps_without_a_cap():
    args = sched(warmdown_frac=0.3)
    for step in (100, 699, 700, 850, 1000):
        assert tg.lr_multiplier(step, 0.0, args) == pytest.approx(min(1.0, (1000 - step) / 300)), step


def test_lr_multiplier_warmdown_fraction_follows_the_clock_under_a_cap():
    # 100 s cap, warmdown over the last 40%: at 80 s (80%) the multiplier is half, whatever the step.
    args = sched(warmdown_frac=0.4, max_wallclock_seconds=100.0, iterations=10**6)
    assert tg.lr_multiplier(50, 80_000.0, args) == pytest.approx(0.5)
    assert tg.lr_multiplier(50, 50_000.0, args) == pytest.approx(1.0)
    assert tg.lr_multiplier(50, 100_000.0, args) == pytest.approx(0.0)


@pytest.mark.parametrize("frac", [0.0, 0.5])
def test_lr_multiplier_floor_is_where_the_warmdown_ends(frac):
    args = sched(lr_floor=0.1, warmdown_frac=frac)
    assert tg.lr_multiplier(1000, 0.0, args) == pytest.approx(0.1)
    assert tg.lr_multiplier(500, 0.0, args) == pytest.approx(1.0)
    mid = 900 if frac == 0 else 750  # half-way through the warmdown
    assert tg.lr_multiplier(mid, 0.0, args) == pytest.approx(0.1 + 0.9 * 0.5)


def test_lr_multiplier_decreases_as_elapsed_approaches_cap_at_a_fixed_step():
    args = sched(lr_warmup_steps=0, iterations=10**6, warmdown_iters=100, max_wallclock_seconds=10.0)
    values = [tg.lr_multiplier(450, e, args) for e in (8_000.0, 8_500.0, 9_000.0, 9_500.0, 9_900.0, 10_000.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] == 0.0


def test_muon_momentum_rises_linearly_from_its_warmup_start_then_holds():
    args = SimpleNamespace(muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=100)
    for step, want in ((0, 0.92), (25, 0.9325), (50, 0.945), (100, 0.97), (5000, 0.97)):
        assert tg.muon_momentum(step, args) == pytest.approx(want), step
    args.muon_momentum_warmup_steps = 0
    assert tg.muon_momentum(0, args) == pytest.approx(0.97)


# -----------------------------------------------------------------------------
# WeightAverager


def toy_linear():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def weights_at(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"weight": torch.randn(2, 3, generator=g), "bias": torch.randn(2, generator=g)}


def set_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in state.items():
            getattr(model, k).copy_(v)


def assert_state_close(got: dict, want: dict, **tol) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol)


def test_weight_averager_ema_follows_the_recursion_from_the_initial_weights():
    model, d = toy_linear(), 0.8
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    avg = tg.WeightAverager(model, ema_decay=d, swa_start_frac=0.5, swa_every=0)
    for step in range(1, 7):
        w = weights_at(step)
        set_weights(model, w)
        avg.update(model, step, lr_mul=1.0)
        ema = {k: d * ema[k] + (1 - d) * w[k] for k in ema}
    state, how = avg.averaged(model)
    assert_state_close(state, ema, atol=1e-6, rtol=1e-6)
    assert how.startswith("EMA") and "0.8" in how
    # Not the last weights, nor their plain mean.
    assert not torch.allclose(state["weight"], weights_at(6)["weight"], atol=1e-3)


LR_MULS = [1.0, 0.9, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # steps 1..8
SWA_STEPS = [6, 8]  # lr_mul < 0.5 and step % 2 == 0 (step 4 has lr_mul == 0.5: not below)


def feed(avg, model, on_step=None):
    for step, lr_mul in enumerate(LR_MULS, start=1):
        set_weights(model, weights_at(step))
        avg.update(model, step, lr_mul)
        if on_step:
            on_step(step)


def test_weight_averager_swa_is_the_mean_of_snapshots_at_the_right_steps():
    model = toy_linear()
    avg = tg.WeightAverager(model, ema_decay=0.0, swa_start_frac=0.5, swa_every=2)
    feed(avg, model)
    state, how = avg.averaged(model)
    want = {k: sum(weights_at(s)[k] for s in SWA_STEPS) / len(SWA_STEPS) for k in ("weight", "bias")}
    assert_state_close(state, want, atol=1e-6, rtol=1e-6)
    assert avg.swa_count == 2
    assert how == "SWA over 2 checkpoints of the raw weights"


def test_weight_averager_swa_over_ema_averages_the_ema_snapshots():
    model, d = toy_linear(), 0.5
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots = []
    avg = tg.WeightAverager(model, ema_decay=d, swa_start_frac=0.5, swa_every=2)

    def track(step):
        w = weights_at(step)
        for k in ema:
            ema[k] = d * ema[k] + (1 - d) * w[k]
        if step in SWA_STEPS:
            snapshots.append({k: v.clone() for k, v in ema.items()})

    feed(avg, model, track)
    state, how = avg.averaged(model)
    want = {k: sum(s[k] for s in snapshots) / len(snapshots) for k in ema}
    assert_state_close(state, want, atol=1e-6, rtol=1e-6)
    assert how == "SWA over 2 checkpoints of the EMA weights"
    raw_mean = {k: sum(weights_at(s)[k] for s in SWA_STEPS) / 2 for k in ema}
    assert not torch.allclose(state["weight"], raw_mean["weight"], atol=1e-3)


def test_weight_averager_without_averaging_returns_a_copy_of_the_current_weights():
    model = toy_linear()
    avg = tg.WeightAverager(model, ema_decay=0.0, swa_start_frac=0.5, swa_every=0)
    feed(avg, model)
    state, how = avg.averaged(model)
    assert how == "none (final weights)"
    assert_state_close(state, weights_at(len(LR_MULS)), atol=0, rtol=0)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(state["weight"], weights_at(len(LR_MULS))["weight"])  # a copy, not a view


def test_weight_averager_swa_takes_no_snapshot_before_the_lr_drops():
    model = toy_linear()
    avg = tg.WeightAverager(model, ema_decay=0.0, swa_start_frac=0.5, swa_every=1)
    for step in range(1, 5):
        set_weights(model, weights_at(step))
        avg.update(model, step, lr_mul=0.5)
    state, how = avg.averaged(model)
    assert avg.swa_count == 0 and how == "none (final weights)"
    assert_state_close(state, weights_at(4), atol=0, rtol=0)


def test_weight_averager_result_loads_into_the_model():
    model = toy_linear()
    avg = tg.WeightAverager(model, ema_decay=0.9, swa_start_frac=0.5, swa_every=2)
    feed(avg, model)
    state, _ = avg.averaged(model)
    model.load_state_dict(state)  # strict: same keys and shapes
    assert torch.equal(model.weight.detach(), state["weight"])
