"""The GPT: per-token losses, causality, SmearGate, BigramHash, shape checks, U-Net skips and init."""
import math

import pytest
import torch

import train_gpt as tg

VOCAB, DIM, HEADS, KV_HEADS, BOS = 64, 32, 4, 2, 1


def make_model(num_layers=2, bigram=0, seed=0, **kw) -> tg.GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=VOCAB, num_layers=num_layers, model_dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS,
                mlp_mult=3.0, bigram_vocab_size=bigram, bigram_dim=8, bos_id=BOS, max_seq_len=64)
    args.update(kw)
    return tg.GPT(**args).eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Small noise on every parameter, so zero-initialized paths (bigram proj, smear gate) are active."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def random_ids(batch=2, seq=16, seed=0, low=4) -> torch.Tensor:
    """Token ids that avoid BOS (ids below `low`), so BOS positions are only those a test places."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, seq), generator=gen)


def capture_smear(model: tg.GPT, ids: torch.Tensor, targets: torch.Tensor):
    """(input, starts, output) of model.smear during one forward pass."""
    seen = {}

    def hook(module, inputs, output):
        seen["x"], seen["starts"], seen["out"] = inputs[0].detach().clone(), inputs[1].clone(), output.detach().clone()

    handle = model.smear.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids, targets)
    finally:
        handle.remove()
    return seen["x"], seen["starts"], seen["out"]


# -- forward -------------------------------------------------------------------------------------


def test_forward_returns_finite_per_token_losses_with_targets_shape():
    model = make_model(num_layers=3, bigram=32)
    ids, targets = random_ids(3, 12, seed=1), random_ids(3, 12, seed=2)
    with torch.no_grad():
        losses = model(ids, targets)
    assert losses.shape == targets.shape == (3, 12)
    assert losses.dtype == torch.float32
    assert torch.isfinite(losses).all()
    assert (losses >= 0).all()


def test_fresh_model_predicts_near_uniform():
    # Tiny tied embeddings give near-zero logits, so every loss starts near ln(vocab).
    model = make_model()
    with torch.no_grad():
        losses = model(random_ids(2, 16), random_ids(2, 16, seed=5))
    assert losses.mean().item() == pytest.approx(math.log(VOCAB), abs=0.05)


def test_changing_a_target_changes_only_its_own_loss():
    # A target changed at one position changes that position's loss only.
    model = perturb(make_model(bigram=16))
    ids, targets = random_ids(1, 10), random_ids(1, 10, seed=3)
    other = targets.clone()
    other[0, 6] = (other[0, 6] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids, targets), model(ids, other)
    changed = (a - b).abs() > 1e-6
    assert changed[0].nonzero().flatten().tolist() == [6]


def test_logit_softcap_bounds_the_loss():
    model = make_model(logit_softcap=5.0)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e4)  # logits far beyond the cap
        losses = model(random_ids(2, 16), random_ids(2, 16, seed=7))
    assert torch.isfinite(losses).all()
    assert losses.max().item() <= 2 * 5.0 + math.log(VOCAB) + 1e-4


def test_batch_rows_are_independent():
    model = perturb(make_model(bigram=16))
    ids, targets = random_ids(3, 12, seed=4), random_ids(3, 12, seed=6)
    ids[1, 5] = BOS
    with torch.no_grad():
        together = model(ids, targets)
        apart = torch.cat([model(ids[i : i + 1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bigram", [0, 16])
@pytest.mark.parametrize("t", [1, 7, 15])
def test_changing_a_token_changes_no_earlier_loss(bigram, t):
    model = perturb(make_model(num_layers=3, bigram=bigram))
    ids, targets = random_ids(2, 16, seed=t), random_ids(2, 16, seed=100 + t)
    ids[:, 4] = BOS  # a document boundary in the middle
    changed = ids.clone()
    changed[:, t] = (changed[:, t] - 4 + 1) % (VOCAB - 4) + 4  # another non-BOS token
    with torch.no_grad():
        before, after = model(ids, targets), model(changed, targets)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    # The change is visible from position t on, so the comparison above is not vacuous.
    assert (after[:, t:] - before[:, t:]).abs().max().item() > 1e-4


# -- SmearGate -----------------------------------------------------------------------------------


def test_smeargate_blends_each_token_with_its_predecessor():
    smear = tg.SmearGate(4)
    with torch.no_grad():
        smear.gate.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    starts = torch.zeros(2, 5, dtype=torch.bool)
    starts[:, 0] = True
    starts[1, 3] = True
    out = smear(x, starts)
    g = torch.sigmoid(smear.gate)
    expected = (1 - g) * x[:, 1:] + g * x[:, :-1]
    for b, t in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 4)]:
        torch.testing.assert_close(out[b, t], expected[b, t - 1])
    for b, t in [(0, 0), (1, 0), (1, 3)]:
        torch.testing.assert_close(out[b, t], x[b, t], rtol=0, atol=0)


@pytest.mark.parametrize("bigram", [0, 16])
def test_smeargate_bos_ignores_its_predecessor_but_other_tokens_do_not(bigram):
    model = perturb(make_model(bigram=bigram))
    ids, targets = random_ids(1, 12, seed=8), random_ids(1, 12, seed=9)
    bos_pos, plain_pos = 6, 10
    ids[0, bos_pos] = BOS
    changed = ids.clone()
    changed[0, bos_pos - 1] = (ids[0, bos_pos - 1] - 4 + 5) % (VOCAB - 4) + 4
    changed[0, plain_pos - 1] = (ids[0, plain_pos - 1] - 4 + 5) % (VOCAB - 4) + 4
    x_a, starts, out_a = capture_smear(model, ids, targets)
    _, _, out_b = capture_smear(model, changed, targets)
    assert starts[0, bos_pos] and not starts[0, plain_pos]
    # The BOS keeps its own embedding, whatever came before it.
    torch.testing.assert_close(out_a[0, bos_pos], x_a[0, bos_pos], rtol=0, atol=0)
    torch.testing.assert_close(out_b[0, bos_pos], out_a[0, bos_pos], rtol=0, atol=0)
    # A non-BOS token's output moves with its predecessor.
    assert (out_b[0, plain_pos] - out_a[0, plain_pos]).abs().max().item() > 1e-4


@pytest.mark.parametrize("first", [BOS, 17])
def test_smeargate_never_blends_position_zero(first):
    model = perturb(make_model())
    ids, targets = random_ids(2, 8, seed=10), random_ids(2, 8, seed=11)
    ids[:, 0] = first
    x, starts, out = capture_smear(model, ids, targets)
    assert starts[:, 0].all()
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)
    # Position 1 (not a BOS) is blended, so the check above is not vacuous.
    assert (out[:, 1] - x[:, 1]).abs().max().item() > 1e-4


# -- BigramHash ----------------------------------------------------------------------------------


def test_bigram_off_gives_no_module_and_fewer_parameters():
    off, on = make_model(bigram=0), make_model(bigram=32)
    assert off.bigram is None
    assert isinstance(on.bigram, tg.BigramHash)
    n_off = sum(p.numel() for p in off.parameters())
    n_on = sum(p.numel() for p in on.parameters())
    assert n_on - n_off == 32 * 8 + 8 * DIM + 1  # table, projection, scale
    assert not any(name.startswith("bigram.") for name in off.state_dict())


@pytest.mark.parametrize("buckets", [2, 3, 64, 2048])
def test_bigram_buckets_lie_in_range_and_reserve_the_last_for_starts(buckets):
    bigram = tg.BigramHash(buckets, 4, 8)
    gen = torch.Generator().manual_seed(buckets)
    ids = torch.randint(0, 65536, (8, 256), generator=gen)
    starts = torch.rand(8, 256, generator=gen) < 0.1
    starts[:, 0] = True
    h = bigram.bucket(ids, starts)
    assert h.shape == ids.shape
    assert h.min().item() >= 0 and h.max().item() < buckets
    assert (h[starts] == buckets - 1).all()
    assert (h[~starts] != buckets - 1).all()


def test_bigram_bucket_depends_on_the_pair_and_spreads():
    bigram = tg.BigramHash(2048, 4, 8)
    prev, cur = torch.meshgrid(torch.arange(VOCAB), torch.arange(VOCAB), indexing="ij")
    ids = torch.stack([prev.reshape(-1), cur.reshape(-1)], dim=1)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    h = bigram.bucket(ids, starts)[:, 1]
    # Same token after different predecessors lands in different buckets, and all 4096 pairs spread out.
    assert h.view(VOCAB, VOCAB)[:, 5].unique().numel() > VOCAB // 2
    assert h.unique().numel() > 1000
    # The pair is ordered: (a, b) and (b, a) are different bigrams, so they rarely share a bucket.
    assert (h.view(VOCAB, VOCAB) == h.view(VOCAB, VOCAB).T).float().mean() < 0.05


def test_bigram_start_bucket_via_model_for_bos_and_position_zero():
    model = make_model(bigram=32)
    ids = random_ids(1, 8, seed=12)
    ids[0, 3] = BOS
    starts = ids == BOS
    starts[:, 0] = True
    h = model.bigram.bucket(ids, starts)
    assert h[0, 0] == 31 and h[0, 3] == 31
    assert (h[0, [1, 2, 4, 5, 6, 7]] != 31).all()


def test_zero_initialized_bigram_is_a_no_op_until_its_projection_moves():
    with_bigram, without = make_model(bigram=32), make_model(bigram=0)
    shared = {k: v for k, v in with_bigram.state_dict().items() if not k.startswith("bigram.")}
    without.load_state_dict(shared)
    assert torch.count_nonzero(with_bigram.bigram.proj.weight) == 0
    ids, targets = random_ids(2, 16, seed=13), random_ids(2, 16, seed=14)
    with torch.no_grad():
        base = without(ids, targets)
        torch.testing.assert_close(with_bigram(ids, targets), base, rtol=0, atol=0)
        torch.nn.init.normal_(with_bigram.bigram.proj.weight, std=1.0)
        with_bigram.bigram.scale.fill_(1.0)
        moved = with_bigram(ids, targets)
    assert (moved - base).abs().max().item() > 1e-3


# -- shape checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, named",
    [
        (dict(model_dim=30, num_heads=4, num_kv_heads=2), "MODEL_DIM=30"),  # dim not divisible by heads
        (dict(model_dim=32, num_heads=4, num_kv_heads=3), "NUM_KV_HEADS=3"),  # heads not divisible by kv
        (dict(model_dim=12, num_heads=4, num_kv_heads=2), "MODEL_DIM=12"),  # odd head width breaks RoPE
        (dict(bigram=1), "BIGRAM_VOCAB_SIZE=1"),
    ],
)
def test_invalid_shapes_raise_setup_error(kw, named):
    with pytest.raises(tg.SetupError) as err:
        make_model(**kw)
    assert named in str(err.value)


def test_valid_gqa_and_mha_shapes_build():
    assert make_model(num_heads=4, num_kv_heads=4).blocks[0].attn.k.weight.shape == (DIM, DIM)
    assert make_model(num_heads=4, num_kv_heads=1).blocks[0].attn.k.weight.shape == (DIM // 4, DIM)
    assert make_model(bigram=2).bigram.buckets == 2


# -- U-Net ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 5])
def test_unet_encoder_half_and_skip_weights_shape(num_layers):
    model = make_model(num_layers=num_layers)
    assert len(model.orders[False]) == num_layers
    assert model.skip_weights.shape == (num_layers // 2, DIM)
    assert len(model.blocks) == num_layers
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 8), random_ids(1, 8, seed=1))).all()


def test_unet_skip_weights_reach_the_loss():
    model = perturb(make_model(num_layers=4))
    model(random_ids(2, 12), random_ids(2, 12, seed=1)).mean().backward()
    assert model.skip_weights.grad is not None
    assert (model.skip_weights.grad.abs().sum(dim=1) > 0).all()  # every skip is used


# -- init ----------------------------------------------------------------------------------------


def test_attention_fused_qkv_equals_three_separate_projections_and_their_grads():
    """Attention computes q, k and v in one matmul over the concatenated weights; the result and each
    weight's gradient must be those of the three separate projections."""
    torch.manual_seed(7)
    attn = tg.Attention(DIM, HEADS, KV_HEADS, rope_base=10000.0, qk_gain=1.5, max_seq_len=16)
    x = torch.randn(2, 16, DIM)

    def reference(x):
        b, t, _ = x.shape
        q = tg.rms_norm(attn.q(x).view(b, t, HEADS, -1)) * attn.q_gain[:, None]
        k = tg.rms_norm(attn.k(x).view(b, t, KV_HEADS, -1))
        v = attn.v(x).view(b, t, KV_HEADS, -1)
        q, k = tg.apply_rotary(q, attn.cos, attn.sin), tg.apply_rotary(k, attn.cos, attn.sin)
        return attn.proj(tg.causal_attention(q, k, v).reshape(b, t, DIM))

    grads = []
    for fn in (attn, reference):
        attn.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        grads.append((out.detach(), [attn.q.weight.grad.clone(), attn.k.weight.grad.clone(), attn.v.weight.grad.clone()]))
    (fused, fused_grads), (ref, ref_grads) = grads
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(fused_grads, ref_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_orthogonal_init_of_attention_and_mlp_matrices():
    num_layers = 4
    model = make_model(num_layers=num_layers, bigram=32)
    eye = torch.eye(DIM)
    shrink = (2 * num_layers) ** -0.5
    for block in model.blocks:
        q = block.attn.q.weight.detach()
        torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-5)
        k = block.attn.k.weight.detach()  # (kv_dim, dim): orthonormal rows
        torch.testing.assert_close(k @ k.T, torch.eye(k.shape[0]), rtol=0, atol=1e-5)
        fc = block.mlp.fc.weight.detach()  # (hidden, dim): orthonormal columns
        torch.testing.assert_close(fc.T @ fc, eye, rtol=0, atol=1e-5)
        for proj in (block.attn.proj.weight.detach(), block.mlp.proj.weight.detach()):
            torch.testing.assert_close(proj @ proj.T, eye * shrink**2, rtol=0, atol=1e-5)
    assert torch.count_nonzero(model.bigram.proj.weight) == 0
    assert torch.count_nonzero(model.smear.gate) == 0


def test_embedding_init_scales():
    model = make_model(num_layers=2, bigram=512, tied_embed_init_std=0.005)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.15)
    assert model.bigram.table.weight.std().item() == pytest.approx(0.02, rel=0.1)


# -- backward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("perturbed", [False, True])
def test_backward_gives_finite_grads_for_every_parameter(perturbed):
    model = make_model(num_layers=4, bigram=32).train()
    if perturbed:
        perturb(model)
    ids, targets = random_ids(2, 16, seed=15), random_ids(2, 16, seed=16)
    ids[:, 7] = BOS
    model(ids, targets).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
    if perturbed:  # with every path active, every parameter learns
        dead = [name for name, p in model.named_parameters() if torch.count_nonzero(p.grad) == 0]
        assert dead == []
    else:  # at init the zero bigram projection blocks the table's gradient, but not its own
        assert torch.count_nonzero(model.bigram.table.weight.grad) == 0
        assert torch.count_nonzero(model.bigram.proj.weight.grad) > 0


# -- fused q/k norm and rotary kernels -----------------------------------------------------------

QK_KERNEL_CHECK = """
import torch, train_gpt as tg
torch.manual_seed(0)
# (batch, time, heads, kv_heads, head_dim): GQA and MHA, a row count that is no multiple of the block
for b, t, heads, kv, hd in [(2, 24, 4, 2, 16), (3, 7, 2, 2, 8), (1, 40, 8, 4, 64)]:
    qkv = (3 * torch.randn(b, t, (heads + 2 * kv) * hd)).bfloat16().requires_grad_()
    gain = (torch.rand(heads) + 1.0).requires_grad_()
    cos, sin = tg.rotary_tables(t + 5, hd, 10000.0)
    # gradients laid out as cuDNN returns them, (b, h, t, d) in memory
    grads = [torch.randn(b, h, t, hd).bfloat16().transpose(1, 2) for h in (heads, kv, kv)]
    results = []
    for fn in (tg.qk_norm_rotary_reference, torch.ops.pgolf.qk_norm_rotary):
        qkv.grad = gain.grad = None
        out = fn(qkv, gain, cos[:, :t], sin[:, :t], heads)
        torch.autograd.backward(out, grads)
        results.append([x.detach().float() for x in (*out, qkv.grad, gain.grad)])
    for name, want, got in zip(["q", "k", "v", "dqkv", "dgain"], *results):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        err = ((got - want).norm() / want.norm()).item()
        # the interpreter truncates to bf16 where the GPU rounds; a wrong index or stride gives errors near 1
        assert err < 3e-2, (name, b, t, heads, kv, hd, err)
print("qk kernels match")
"""


def test_qk_norm_rotary_kernels_match_the_plain_path_in_triton_interpreter():
    """The Triton kernels (forward and backward, with strided gradients and a ragged last block) against
    qk_norm_rotary_reference, run on the CPU by Triton's interpreter."""
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of torch)")
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(tg.__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", QK_KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qk kernels match" in proc.stdout


@pytest.mark.parametrize("head_dim, kv_heads, fits", [(64, 4, True), (64, 2, True), (16, 1, True), (64, 3, False),
                                                     (48, 4, False), (96, 2, False)])
def test_qk_kernels_take_only_power_of_two_tiles(head_dim, kv_heads, fits):
    """Other shapes (NUM_KV_HEADS=3, head_dim 48) take the plain path instead of failing to compile."""
    assert tg.qk_kernels_fit(head_dim, kv_heads) is fits


def test_qk_norm_rotary_without_a_gpu_is_the_reference():
    torch.manual_seed(0)
    qkv = torch.randn(2, 8, (HEADS + 2 * KV_HEADS) * (DIM // HEADS))
    gain = torch.rand(HEADS) + 1
    cos, sin = tg.rotary_tables(8, DIM // HEADS, 10000.0)
    for got, want in zip(tg.qk_norm_rotary(qkv, gain, cos, sin, HEADS), tg.qk_norm_rotary_reference(qkv, gain, cos, sin, HEADS)):
        assert torch.equal(got, want)


# -- act(h)^2 MLP (relu^2, leaky relu^2) -----------------------------------------------------------


@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_act_squared_mlp_function_matches_the_plain_mlp_and_its_gradients(slope):
    """ActSquaredMLP's hand-written backward (the gradient at h from the saved act(h)^2 for relu, from the
    saved signed act(h) for a leaky slope) against autograd through the plain MLP in float64; on the
    CPU act2_matmul runs its PyTorch form."""
    torch.manual_seed(3)
    tokens, dim, hidden = 64, 16, 48
    x = torch.randn(tokens, dim)
    fc, proj = torch.randn(hidden, dim) / dim**0.5, torch.randn(dim, hidden) / hidden**0.5
    grad = torch.randn(tokens, dim)
    leaves = [t.double().requires_grad_() for t in (x, fc, proj)]
    plain = torch.nn.functional.leaky_relu(leaves[0] @ leaves[1].T, slope).square() @ leaves[2].T
    plain.backward(grad.double())
    want = [plain.detach()] + [t.grad for t in leaves]
    xb, up, down = (t.bfloat16().requires_grad_() for t in (x, fc.T.contiguous(), proj))
    out = tg.ActSquaredMLP.apply(xb, up, down, slope)
    out.backward(grad.bfloat16())
    got = [out, xb.grad, up.grad.T, down.grad]
    for name, g, w in zip(["out", "dx", "dfc", "dproj"], got, want):
        assert g.shape == w.shape, name
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err < 2e-2, (name, err)  # bf16 inputs and outputs; a wrong formula is off by far more
    frozen = xb.detach().requires_grad_()  # weights that take no gradient (LoRA TTT): the same dx, none for them
    tg.ActSquaredMLP.apply(frozen, up.detach(), down.detach(), slope).backward(grad.bfloat16())
    torch.testing.assert_close(frozen.grad, xb.grad, rtol=0, atol=0)


@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_act2_matmul_backward_form_is_the_gradient_at_the_pre_activation(slope):
    torch.manual_seed(4)
    a, b = torch.randn(32, 8), torch.randn(8, 24)
    h = a @ b
    act = torch.nn.functional.leaky_relu(h, slope)
    if slope:
        post, saved = tg.leaky2_matmul(a, b, slope)
        torch.testing.assert_close(saved, act)
    else:
        post = saved = tg.act2_matmul(a, b, None, 0.0)
    torch.testing.assert_close(post, act.square())
    g, w = torch.randn(32, 5), torch.randn(5, 24)
    derivative = 2 * act * torch.where(h > 0, 1.0, slope)
    torch.testing.assert_close(tg.act2_matmul(g, w, saved, slope), (g @ w) * derivative, rtol=1e-4, atol=1e-4)


def test_mlp_negative_slope_lets_negative_pre_activations_through():
    torch.manual_seed(5)
    mlp = tg.MLP(8, 2.0, neg_slope=0.5)
    x = torch.randn(4, 8)
    h = mlp.fc(x)
    torch.testing.assert_close(mlp(x), mlp.proj(torch.where(h > 0, h, 0.5 * h).square()))
    assert (h < 0).any()


def test_lora_forward_takes_the_triton_mlp_with_frozen_weights_and_flash_attention_first(monkeypatch):
    """LoRA TTT's steps come in a few padded shapes: its forward takes the Triton MLP (one compile per row
    count) with the weights detached, so that its backward skips their gradients, and puts cuDNN attention
    (one plan per shape) last; the plain forward keeps cuDNN first and the weights' gradients. On the CPU the
    Triton MLP is replaced by a recorder and told it may run."""
    seen = {"frozen": [], "priorities": []}

    class RecordingMLP:
        @staticmethod
        def apply(x, up, down, slope):
            seen["frozen"].append(not (up.requires_grad or down.requires_grad))
            return tg.act2_reference(x @ up, slope).square() @ down.t()

    def recording_sdpa_kernel(priority, **kw):
        seen["priorities"].append(list(priority))
        return real_sdpa_kernel(priority, **kw)

    real_sdpa_kernel = tg.sdpa_kernel
    monkeypatch.setattr(tg, "triton_runs", lambda x: True)
    monkeypatch.setattr(tg, "qk_kernels_fit", lambda *a: False)  # the q/k kernels stay on their reference
    monkeypatch.setattr(tg, "ActSquaredMLP", RecordingMLP)
    monkeypatch.setattr(tg, "sdpa_kernel", recording_sdpa_kernel)
    model = make_model(num_layers=3)
    ids = random_ids(batch=2, seq=16)
    model(ids[:, :-1], ids[:, 1:])
    assert seen["frozen"] == [False] * 3
    assert len(seen["priorities"]) == 3 and all(p[0] == tg.SDPBackend.CUDNN_ATTENTION for p in seen["priorities"])
    seen.update(frozen=[], priorities=[])
    model(ids[:, :-1], ids[:, 1:], tg.DocAdapters(model, 2, 2, 0))
    assert seen["frozen"] == [True] * 3
    assert len(seen["priorities"]) == 3
    assert all(p[0] == tg.SDPBackend.FLASH_ATTENTION and tg.SDPBackend.CUDNN_ATTENTION not in p for p in seen["priorities"])


@pytest.mark.skipif(not torch.cuda.is_available() or tg.triton is None, reason="the Triton kernels need a GPU")
@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_act_squared_mlp_kernels_match_the_plain_path_on_the_gpu(slope):
    torch.manual_seed(6)
    mlp = tg.MLP(512, 3.0, neg_slope=slope).cuda()
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused in (True, False):
        x.grad = None
        mlp.zero_grad()
        if fused:
            out = mlp(x)
        else:
            h = torch.nn.functional.linear(x, mlp.fc.weight.bfloat16())
            out = torch.nn.functional.linear(tg.act2_reference(h, slope).square(), mlp.proj.weight.bfloat16())
        out.backward(grad)
        results.append([out.float(), x.grad.float(), mlp.fc.weight.grad.float(), mlp.proj.weight.grad.float()])
    for name, got, want in zip(["out", "dx", "dfc", "dproj"], *results):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, err)


# -- the records' upgrades ------------------------------------------------------------------------


def test_partial_rope_tables_rotate_only_the_first_pairs_at_a_narrow_heads_frequencies():
    cos, sin = tg.rotary_tables(10, 16, 10000.0, rope_dims=4)
    assert cos.shape == sin.shape == (1, 10, 1, 8)
    pos = torch.arange(10, dtype=torch.float32)[:, None]
    angles = pos * torch.tensor([1.0, 10000.0**-0.5])  # rope_dims 4: two pairs, frequencies base^(-j/2)
    torch.testing.assert_close(cos[0, :, 0, :2], angles.cos())
    torch.testing.assert_close(sin[0, :, 0, :2], angles.sin())
    assert (cos[..., 2:] == 1).all() and (sin[..., 2:] == 0).all()  # the other pairs carry no position
    full = tg.rotary_tables(10, 16, 10000.0, rope_dims=16)
    assert all(torch.equal(a, b) for a, b in zip(full, tg.rotary_tables(10, 16, 10000.0)))


def test_partial_rope_leaves_the_unrotated_dims_of_q_and_k_as_they_are():
    torch.manual_seed(8)
    cos, sin = tg.rotary_tables(6, 8, 10000.0, rope_dims=2)
    x = torch.randn(1, 6, 2, 8)
    y = tg.apply_rotary(x, cos, sin)
    keep = [1, 2, 3, 5, 6, 7]  # pair (0, 4) rotates; pairs (1, 5), (2, 6), (3, 7) do not
    torch.testing.assert_close(y[..., keep], x[..., keep])
    assert not torch.allclose(y[:, 1:, :, [0, 4]], x[:, 1:, :, [0, 4]])


def test_exclusive_attention_removes_each_heads_own_value_direction_only():
    torch.manual_seed(9)
    b, t, kv, group, d = 2, 5, 2, 3, 8
    y = torch.randn(b, t, kv * group, d)
    v = torch.randn(b, t, kv, d)
    out = tg.exclusive(y, v)
    own = v.repeat_interleave(group, dim=2)  # query head h shares kv head h // group
    unit = own / own.norm(dim=-1, keepdim=True)
    torch.testing.assert_close((out * unit).sum(-1), torch.zeros(b, t, kv * group), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, y - (y * unit).sum(-1, keepdim=True) * unit, atol=1e-5, rtol=1e-5)
    other = torch.randn(b, t, kv * group, d)
    ortho = other - (other * unit).sum(-1, keepdim=True) * unit
    torch.testing.assert_close(tg.exclusive(ortho, v), ortho, atol=1e-5, rtol=1e-5)  # nothing else is touched


def test_xsa_last_n_sets_exclusive_attention_on_the_last_layers_only():
    model = make_model(num_layers=4, xsa_last_n=2)
    assert [blk.attn.xsa for blk in model.blocks] == [False, False, True, True]
    plain, xsa = perturb(make_model(num_layers=4)), perturb(make_model(num_layers=4, xsa_last_n=2))
    ids, targets = random_ids(1, 12), random_ids(1, 12, seed=2)
    with torch.no_grad():
        assert not torch.allclose(plain(ids, targets), xsa(ids, targets))


def capture_inputs(module: torch.nn.Module, call):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen


def test_ln_scale_damps_block_i_inputs_by_one_over_sqrt_i_plus_one():
    model = perturb(make_model(num_layers=4, ln_scale=True))
    ids, targets = random_ids(1, 12), random_ids(1, 12, seed=2)
    for i, blk in enumerate(model.blocks):
        for module in (blk.attn, blk.mlp):
            (x,) = capture_inputs(module, lambda: model(ids, targets))
            rms = x.float().square().mean(-1).sqrt()
            torch.testing.assert_close(rms, torch.full_like(rms, (i + 1) ** -0.5), rtol=1e-3, atol=1e-4)


def test_parallel_block_feeds_attention_and_mlp_the_same_input_and_adds_both():
    torch.manual_seed(10)
    blk = perturb(tg.Block(DIM, HEADS, KV_HEADS, 2.0, 10000.0, 1.5, 16, parallel=True))
    x, x0 = torch.randn(2, 8, DIM), torch.randn(2, 8, DIM)
    with torch.no_grad():
        mixed = blk.resid_mix[0] * x + blk.resid_mix[1] * x0
        h = tg.rms_norm(mixed)
        want = mixed + blk.attn_scale * blk.attn(h) + blk.mlp_scale * blk.mlp(h)
        torch.testing.assert_close(blk(x, x0), want)
        blk.parallel = False
        assert not torch.allclose(blk(x, x0), want)


def test_parallel_last_n_sets_the_last_blocks_parallel():
    assert [b.parallel for b in make_model(num_layers=5, parallel_last_n=2).blocks] == [False] * 3 + [True] * 2


def model_from_settings(monkeypatch, **settings) -> tg.GPT:
    """A small GPT built as the script builds it, from settings in the environment."""
    small = dict(VOCAB_SIZE=VOCAB, NUM_LAYERS=2, MODEL_DIM=DIM, NUM_HEADS=HEADS, NUM_KV_HEADS=KV_HEADS, ROPE_DIMS=0)
    for name, value in {**small, **settings}.items():
        monkeypatch.setenv(name, str(value))
    return tg.build_model(tg.Hyperparameters(), BOS)


def test_mlp_mult_sets_each_mlps_hidden_width(monkeypatch):
    for mult, hidden in ((2.5, 80), (4, 128)):
        for blk in model_from_settings(monkeypatch, MLP_MULT=mult).blocks:
            assert blk.mlp.fc.weight.shape == (hidden, DIM) and blk.mlp.proj.weight.shape == (DIM, hidden)


def test_qk_gain_init_is_every_heads_starting_query_gain(monkeypatch):
    for gain in (1.5, 5.25):
        for blk in model_from_settings(monkeypatch, QK_GAIN_INIT=gain).blocks:
            torch.testing.assert_close(blk.attn.q_gain.detach(), torch.full((HEADS,), gain))


def test_unet_skips_feed_the_encoders_outputs_to_the_decoder_last_in_first_out():
    model = perturb(make_model(num_layers=6))  # 3 encoder blocks, 3 decoder blocks
    outs, seen = [], []
    for blk in model.blocks[:3]:
        blk.register_forward_hook(lambda module, inputs, out: outs.append(out.detach().clone()))
    skip_in = model.skip_in
    model.skip_in = lambda j, x, skip: seen.append((j, skip.detach().clone())) or skip_in(j, x, skip)
    with torch.no_grad():
        model(random_ids(1, 12), random_ids(1, 12, seed=2))
    assert [j for j, _ in seen] == [0, 1, 2]
    for j, skip in seen:
        torch.testing.assert_close(skip, outs[2 - j])


def test_skip_gates_blend_by_their_sigmoid_starting_even_and_learn():
    model = perturb(make_model(num_layers=4, skip_gates=True))
    with torch.no_grad():
        model.skip_gates.zero_()
    x, skip = torch.randn(1, 3, DIM), torch.randn(1, 3, DIM)
    with torch.no_grad():
        torch.testing.assert_close(model.skip_in(1, x, skip), 0.5 * x + 0.5 * model.skip_weights[1] * skip)
        model.skip_gates.normal_()  # away from the even blend the gate's sigmoid is the running stream's share
        g = torch.sigmoid(model.skip_gates[1])
        torch.testing.assert_close(model.skip_in(1, x, skip), g * x + (1 - g) * model.skip_weights[1] * skip)
    model(random_ids(2, 12), random_ids(2, 12, seed=1)).mean().backward()
    assert (model.skip_gates.grad.abs().sum(dim=1) > 0).all()


def test_depth_recurrence_runs_the_looped_blocks_again_only_once_looping():
    model = perturb(make_model(num_layers=4, loop_layers=(1, 2), loop_repeats=1))
    assert model.orders == {False: [0, 1, 2, 3], True: [0, 1, 2, 1, 2, 3]}
    assert model.skip_weights.shape == (3, DIM)  # skips pair the 6 virtual layers
    calls = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    ids, targets = random_ids(1, 12), random_ids(1, 12, seed=2)
    with torch.no_grad():
        plain = model(ids, targets)
        assert calls == [0, 1, 2, 3]
        calls.clear()
        model.looping = True
        looped = model(ids, targets)
        assert calls == [0, 1, 2, 1, 2, 3]
    assert not torch.allclose(plain, looped)


def test_depth_recurrence_off_is_the_plain_model():
    reference = perturb(make_model(num_layers=4))
    model = make_model(num_layers=4, loop_layers=(1, 2), loop_repeats=1)
    state = dict(reference.state_dict())
    state["skip_weights"] = torch.cat([state["skip_weights"], torch.ones(1, DIM)])
    model.load_state_dict(state)
    ids, targets = random_ids(1, 12), random_ids(1, 12, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, targets), reference(ids, targets))


def test_smear_gate_off_leaves_no_gate():
    model = make_model(smear_gate=False)
    assert model.smear is None and not any("smear" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 8), random_ids(1, 8, seed=1))).all()
