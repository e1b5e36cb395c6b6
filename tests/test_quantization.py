"""Quantization and packing: per-row integers with a clip search or SDClip, GPTQ against a reference and
against rounding, Hessians from calibration hooks, the packed artifact (groups, fp16 keeps, codecs,
report), its size against the bit widths and the cap, a model rebuilt from it, and the script's
calibration (training tokens only, inside the budget) and an end-to-end run with GPTQ."""
import json
import math
import re

import numpy as np

import pytest
import torch

import train_gpt as tg

SPEC = "mlp:5,attn:6,embed:8,bigram:6,other:8"
VOCAB, DIM = 64, 32
FP16_MAX_NUMEL = 40  # small enough that most matrices (and resid_mix, 2 x 32) are quantized


def make_model(seed=0, vocab=VOCAB) -> tg.GPT:
    torch.manual_seed(seed)
    return tg.GPT(vocab, 2, DIM, 4, 2, 2.0, bigram_vocab_size=32, bigram_dim=16, bos_id=1, max_seq_len=64).float()


@torch.no_grad()
def perturb(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def expected_group(name: str) -> str:
    """The grouping, restated: mlp and attention matrices of the blocks, the tied embedding, the
    bigram table and projection, and everything else."""
    parts = name.split(".")
    if parts[0] == "blocks" and parts[2] in ("mlp", "attn"):
        return parts[2]
    return {"tok_emb": "embed", "bigram": "bigram"}.get(parts[0], "other")


def quantized_in_memory(state, bits, fp16_keep, fp16_max_numel):
    """What the artifact should hold, computed without pack/unpack."""
    out = {}
    for name, t in state.items():
        if t.ndim != 2 or t.numel() <= fp16_max_numel or any(k in name for k in fp16_keep):
            out[name] = t.half().float()
        else:
            out[name] = tg.dequantize_rows(*tg.quantize_rows(t, bits[expected_group(name)]))
    return out


def header_of(blob: bytes) -> tuple[dict, int]:
    n = int.from_bytes(blob[4:8], "little")
    return json.loads(blob[8 : 8 + n]), 8 + n


def sample_matrix(seed=0, rows=24, cols=96) -> torch.Tensor:
    """Gaussian rows of varied scale, a row of zeros, rows with one and with several outliers."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 1, rows)[:, None]
    w[0] = 0
    w[1, 7] = 40.0
    w[2, [3, 50, 90]] = torch.tensor([-25.0, 18.0, 30.0])
    w[3] = torch.randn(cols, generator=gen) ** 3  # heavy tails
    w[4, :] = 0.5
    w[4, 0] = -0.5
    return w




def row_sq_err(w, deq):
    return (deq.double() - w.double()).square().sum(dim=1)


# -- quantize_rows / dequantize_rows ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 5, 6, 8])
def test_quantize_rows_round_trip_error_is_at_most_half_a_step_inside_the_clip(bits):
    w = sample_matrix(bits)
    qmax = 2 ** (bits - 1) - 1
    q, scale = tg.quantize_rows(w, bits)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float16 and scale.shape == (w.shape[0],)
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax
    deq = tg.dequantize_rows(q, scale)
    assert deq.dtype == torch.float32
    assert torch.equal(deq, q.float() * scale.float()[:, None])
    s = scale.float()[:, None]
    inside = w.abs() <= qmax * s
    err = (deq - w).abs()
    assert torch.all(err[inside] <= (s * 0.5 * (1 + 1e-5)).expand_as(w)[inside])
    # outside the clip the value saturates at the extreme level of its sign
    outside = ~inside
    assert torch.equal(q[outside].float(), torch.sign(w[outside]) * qmax)
    assert torch.all(deq[0] == 0)  # a row of zeros comes back as zeros
    assert torch.all(scale.float() > 0)


@pytest.mark.parametrize("bits", [2, 4, 5, 6, 8])
def test_quantize_rows_clip_search_never_does_worse_than_no_clipping(bits):
    w = sample_matrix(bits + 10)
    qmax = 2 ** (bits - 1) - 1
    q, scale = tg.quantize_rows(w, bits)
    best = row_sq_err(w, tg.dequantize_rows(q, scale))
    s1 = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(2**-24).half().float()
    noclip = row_sq_err(w, (w / s1).round().clamp(-qmax, qmax) * s1)
    assert torch.all(best <= noclip * (1 + 1e-6) + 1e-30)
    # and at low widths the search does clip where it pays: some row improves on the full range
    if bits <= 6:
        assert torch.any(best < noclip * (1 - 1e-3))


def test_quantize_rows_more_bits_give_smaller_error():
    w = sample_matrix(3)
    errs = [float(row_sq_err(w, tg.dequantize_rows(*tg.quantize_rows(w, b))).sum()) for b in (3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


# -- SDClip: the clip as a multiple of the row's standard deviation --------------------------------


@pytest.mark.parametrize("bits, k", [(5, 6.0), (6, 12.85), (8, 20.0)])
def test_sdclip_scale_is_k_standard_deviations_over_qmax(bits, k):
    w = sample_matrix(bits)[5:]  # rows of varied scale and shape, none constant
    qmax = 2 ** (bits - 1) - 1
    q, scale = tg.quantize_rows(w, bits, k)
    want = (k * w.double().std(dim=1, correction=0) / qmax).half()
    assert torch.equal(scale, want)
    assert int(q.abs().max()) <= qmax
    s = scale.float()[:, None]
    assert torch.equal(q.float(), (w / s).round().clamp(-qmax, qmax))  # rounded to nearest at that scale


def test_sdclip_compressed_bytes_fall_as_k_grows_on_gaussian_rows():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 512, generator=gen) * torch.logspace(-2, 0, 128)[:, None]
    sizes = [len(tg.compress(tg.quantize_rows(w, 6, k)[0].numpy().tobytes(), "lzma")[1]) for k in (3.0, 6.0, 12.85, 20.0)]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] < 0.6 * sizes[0]  # roughly log2(20/3) = 2.7 bits a value fewer out of ~5.4


def test_parse_quant_clip_reads_search_and_numbers():
    assert tg.parse_quant_clip("mlp:12.85,attn:13,embed:20,bigram:search,other:search") == dict(
        mlp=12.85, attn=13.0, embed=20.0, bigram=None, other=None)


@pytest.mark.parametrize("spec", [
    "mlp:12,attn:13,embed:20,bigram:search",         # other missing
    "mlp:0,attn:13,embed:20,bigram:search,other:search",
    "mlp:-3,attn:13,embed:20,bigram:search,other:search",
    "mlp:inf,attn:13,embed:20,bigram:search,other:search",
    "mlp:nan,attn:13,embed:20,bigram:search,other:search",
    "mlp:wide,attn:13,embed:20,bigram:search,other:search",
    "mlp:,attn:13,embed:20,bigram:search,other:search",
    "head:12,mlp:12,attn:13,embed:20,bigram:search,other:search",
])
def test_parse_quant_clip_rejects_bad_specs(spec):
    with pytest.raises(tg.SetupError, match="QUANT_CLIP"):
        tg.parse_quant_clip(spec)


# -- GPTQ ------------------------------------------------------------------------------------------


def correlated_layer(seed=0, rows=48, cols=96, tokens=4000):
    """Inputs X with a far-from-identity covariance (mixed through a random matrix, with a few
    strong shared directions) and a weight matrix W of Gaussian rows."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + 0.5 * torch.randn(cols, 1, generator=gen) @ torch.randn(1, cols, generator=gen)
    x = torch.randn(tokens, cols, generator=gen) @ mix
    w = torch.randn(rows, cols, generator=gen) * 0.05
    return x, w


def output_sq_err(x, w, q, scale):
    return float((x.double() @ (tg.dequantize_rows(q, scale).double() - w.double()).T).square().sum())


def reference_gptq(w, scale, h, bits, damp=0.01):
    """GPTQ as optimal brain quantization in its plain form, in float64, columns in their own order:
    round column i, move the remaining columns by -error * Hinv[i, j] / Hinv[i, i], then drop i from
    the inverse Hessian (no Cholesky factor, no blocks)."""
    qmax = 2 ** (bits - 1) - 1
    w, s, h = w.double().clone(), scale.double()[:, None], h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for i in range(w.size(1)):
        q[:, i] = (w[:, i : i + 1] / s).round().clamp(-qmax, qmax)[:, 0]
        err = w[:, i] - q[:, i] * s[:, 0]
        w[:, i:] -= err[:, None] * (hinv[i, i:] / hinv[i, i])[None, :]
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return q.to(torch.int8)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_has_lower_output_error_than_round_to_nearest_at_the_same_scales(bits, act_order):
    x, w = correlated_layer(bits)
    h = x.T @ x
    qmax = 2 ** (bits - 1) - 1
    q_rtn, scale = tg.quantize_rows(w, bits)
    q = tg.gptq_rows(w, scale, h, bits, block=32, act_order=act_order)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax
    rtn_err, gptq_err = output_sq_err(x, w, q_rtn, scale), output_sq_err(x, w, q, scale)
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)


def test_gptq_matches_the_plain_optimal_brain_quantization_reference():
    """The Cholesky-factor form with lazy block updates is the same algorithm as the plain one: the same
    integers up to float32 ties, and the same output error."""
    bits = 5
    x, w = correlated_layer(7, rows=32, cols=40, tokens=2000)
    h = x.T @ x
    _, scale = tg.quantize_rows(w, bits)
    want = reference_gptq(w, scale, h, bits)
    for block in (1, 8, 128):
        got = tg.gptq_rows(w, scale, h, bits, block=block, act_order=False)
        assert (got == want).float().mean() > 0.99, block
        assert output_sq_err(x, w, got, scale) == pytest.approx(output_sq_err(x, w, want, scale), rel=0.01)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal H passes no error between columns."""
    _, w = correlated_layer(3)
    gen = torch.Generator().manual_seed(1)
    h = torch.diag(torch.rand(w.size(1), generator=gen) + 0.1)
    q_rtn, scale = tg.quantize_rows(w, 6)
    assert torch.equal(tg.gptq_rows(w, scale, h, 6), q_rtn)


def test_gptq_rounds_a_dead_input_column_plainly_and_stays_finite():
    x, w = correlated_layer(4)
    x[:, [5, 17]] = 0  # two inputs that never fire
    h = x.T @ x
    q_rtn, scale = tg.quantize_rows(w, 6)
    q = tg.gptq_rows(w, scale, h, 6)
    assert torch.equal(q[:, [5, 17]], q_rtn[:, [5, 17]])
    assert output_sq_err(x, w, q, scale) < 0.7 * output_sq_err(x, w, q_rtn, scale)


# -- pack_model / unpack_model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_setup():
    model = perturb(make_model())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bits = tg.parse_quant_bits(SPEC)
    keep = ["attn.proj"]
    blob, report = tg.pack_model(state, bits, keep, FP16_MAX_NUMEL, "auto")
    return state, bits, keep, blob, report


def test_state_dict_covers_every_group_and_both_fp16_reasons(packed_setup):
    state, bits, keep, blob, _ = packed_setup
    header, _ = header_of(blob)
    groups = {e["name"]: e["group"] for e in header["tensors"]}
    assert set(groups.values()) == {"fp16", "mlp", "attn", "embed", "bigram", "other"}
    assert groups["blocks.0.attn.proj.weight"] == "fp16"  # named in fp16_keep despite 1024 elements
    assert groups["blocks.0.attn_scale"] == "fp16"  # a vector
    assert groups["skip_weights"] == "fp16"  # a 1 x 32 matrix under FP16_MAX_NUMEL
    assert groups["blocks.0.resid_mix"] == "other"  # a 2 x 32 matrix over it
    for name, group in groups.items():
        if group != "fp16":
            assert group == expected_group(name)


def test_fp16_max_numel_is_the_largest_matrix_kept_in_fp16():
    gen = torch.Generator().manual_seed(5)
    state = {"blocks.0.mlp.fc.weight": torch.randn(4, 8, generator=gen),     # 32 elements: kept
             "blocks.0.mlp.proj.weight": torch.randn(3, 11, generator=gen),  # 33: quantized
             "blocks.0.attn_scale": torch.randn(100, generator=gen),         # a vector: always kept
             "bigram.scale": torch.tensor(0.05)}                             # a scalar: always kept
    blob, report = tg.pack_model(state, tg.parse_quant_bits(SPEC), [], 32, "lzma")
    header, _ = header_of(blob)
    assert [e["group"] for e in header["tensors"]] == ["fp16", "mlp", "fp16", "fp16"]
    out = tg.unpack_model(blob)
    assert list(out) == list(state)
    assert out["bigram.scale"].shape == () and float(out["bigram.scale"]) == float(torch.tensor(0.05).half())
    for name in ("blocks.0.mlp.fc.weight", "blocks.0.attn_scale"):
        assert torch.equal(out[name], state[name].half().float())
    assert torch.equal(out["blocks.0.mlp.proj.weight"],
                       tg.dequantize_rows(*tg.quantize_rows(state["blocks.0.mlp.proj.weight"], 5)))


def test_unpack_preserves_names_shapes_and_order(packed_setup):
    state, _, _, blob, _ = packed_setup
    out = tg.unpack_model(blob)
    assert list(out) == list(state)
    for name in state:
        assert out[name].shape == state[name].shape
        assert out[name].dtype == torch.float32


def test_unpacked_tensors_match_their_bit_width_and_fp16_keeps_exactly(packed_setup):
    state, bits, keep, blob, _ = packed_setup
    out = tg.unpack_model(blob)
    expected = quantized_in_memory(state, bits, keep, FP16_MAX_NUMEL)
    n_quantized = 0
    for name, t in state.items():
        got = out[name]
        assert torch.equal(got, expected[name]), name
        kept = t.ndim != 2 or t.numel() <= FP16_MAX_NUMEL or any(k in name for k in keep)
        if kept:
            continue
        n_quantized += 1
        qmax = 2 ** (bits[expected_group(name)] - 1) - 1
        absmax = t.abs().amax(dim=1)
        # the bit width's bound: per-row error no worse than full-range rounding, half a step per element
        rms = (got - t).double().square().mean(dim=1).sqrt()
        assert torch.all(rms <= absmax.double() / qmax / 2 * (1 + 2**-9)), name
        assert not torch.equal(got, t.half().float()), name  # really quantized
    assert n_quantized >= 10


def test_report_bytes_add_up_to_the_artifact_and_counts_to_the_state_dict(packed_setup):
    state, bits, _, blob, report = packed_setup
    header, body_start = header_of(blob)
    assert blob[:4] == b"PGQ2"
    assert sum(r["bytes"] for r in report) == len(blob) - body_start
    assert header["sections"] == report
    assert sum(r["tensors"] for r in report) == len(state)
    assert sum(r["params"] for r in report) == sum(t.numel() for t in state.values())
    by_group = {r["group"]: r for r in report}
    assert by_group["fp16"]["bits"] == 16
    for group in ("mlp", "attn", "embed", "bigram", "other"):
        assert by_group[group]["bits"] == bits[group]
        members = [n for n, t in state.items() if n in {e["name"] for e in header["tensors"] if e["group"] == group}]
        assert by_group[group]["raw"] == sum(state[n].numel() + 2 * state[n].shape[0] for n in members)


def test_each_compressor_round_trips_and_auto_is_the_smallest(packed_setup):
    state, bits, keep, _, _ = packed_setup
    expected = quantized_in_memory(state, bits, keep, FP16_MAX_NUMEL)
    sizes = {}
    for method in ("zstd", "lzma", "auto"):
        blob, report = tg.pack_model(state, bits, keep, FP16_MAX_NUMEL, method)
        sizes[method] = len(blob)
        if method != "auto":
            assert {r["codec"] for r in report} == {method}
        out = tg.unpack_model(blob)
        assert list(out) == list(state)
        for name in state:
            assert torch.equal(out[name], expected[name]), (method, name)
    assert sizes["auto"] <= sizes["zstd"] and sizes["auto"] <= sizes["lzma"]


def test_unknown_compressor_raises_setup_error(packed_setup):
    state, bits, keep, _, _ = packed_setup
    with pytest.raises(tg.SetupError, match="COMPRESSOR"):
        tg.pack_model(state, bits, keep, FP16_MAX_NUMEL, "gzip")


def test_zstd_without_zstandard_is_a_setup_error_and_auto_falls_back_to_lzma(monkeypatch):
    monkeypatch.setattr(tg, "zstandard", None)
    with pytest.raises(tg.SetupError, match="pip install zstandard"):
        tg.codec_names("zstd")
    assert tg.codec_names("auto") == ["lzma"]
    assert tg.codec_names("lzma") == ["lzma"]


def test_unpack_rejects_bad_magic(packed_setup):
    blob = packed_setup[3]
    with pytest.raises(tg.SetupError, match="magic"):
        tg.unpack_model(b"XXXX" + blob[4:])
    with pytest.raises(tg.SetupError):
        tg.unpack_model(b"")


def test_gptq_through_the_packed_file_unpacks_to_exactly_scale_times_q():
    x, w = correlated_layer(5, rows=40, cols=64)
    state = {"blocks.0.mlp.fc.weight": w, "blocks.0.attn.q.weight": w[:8].clone(), "blocks.0.attn_scale": torch.ones(64)}
    hessians = {"blocks.0.mlp.fc.weight": x.T @ x}  # attn.q has none: rounded to nearest
    bits, clips = tg.parse_quant_bits(SPEC), tg.parse_quant_clip("mlp:8,attn:search,embed:search,bigram:search,other:search")
    blob, report = tg.pack_model(state, bits, [], 0, "auto", clips, hessians, block=16, damp=0.01, act_order=True)
    out = tg.unpack_model(blob)
    q_rtn, scale = tg.quantize_rows(w, 5, 8.0)
    q = tg.gptq_rows(w, scale, hessians["blocks.0.mlp.fc.weight"], 5, block=16)
    assert not torch.equal(q, q_rtn)
    assert torch.equal(out["blocks.0.mlp.fc.weight"], q.float() * scale.float()[:, None])
    assert torch.equal(out["blocks.0.attn.q.weight"], tg.dequantize_rows(*tg.quantize_rows(w[:8], 6)))
    rows = {r["group"]: r for r in report}
    assert rows["mlp"]["clip"] == 8.0 and rows["mlp"]["gptq"] == 1
    assert rows["attn"]["clip"] == "search" and rows["attn"]["gptq"] == 0
    assert 0 < rows["mlp"]["gptq_err"] < 0.7 * rows["mlp"]["rtn_err"]
    assert rows["mlp"]["rtn_err"] == pytest.approx(output_sq_err(x, w, q_rtn, scale) / float((x.double() @ w.double().T).square().sum()), rel=1e-3)


def test_scales_as_byte_planes_compress_smaller_than_interleaved():
    """Row scales of similar size share their high byte (sign, exponent): split into a low-byte and a
    high-byte plane, the high plane is nearly constant."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4096, 64, generator=gen) * (0.02 + 0.01 * torch.rand(4096, 1, generator=gen))
    halves = tg.quantize_rows(w, 6)[1].numpy().tobytes()
    planes = tg.byte_planes(halves)
    assert sorted(planes) == sorted(halves) and planes[:4096] == halves[0::2]
    for method in ("zstd", "lzma"):
        assert len(tg.compress(planes, method)[1]) < 0.95 * len(tg.compress(halves, method)[1]), method


# -- Hessians from calibration inputs --------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated():
    """Hessians of a perturbed toy model (so no matrix is zero and every input varies) over 6 sequences,
    and, independently, the input of every matrix product in the same forward pass, recorded by wrapping
    F.linear: (input, weight) pairs, through which nn.Linear, the fused q/k/v and the tied head all go."""
    model = perturb(make_model(seed=5))
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(0, VOCAB, (6, 16), generator=gen)
    y = torch.randint(0, VOCAB, (6, 16), generator=gen)
    hessians = tg.collect_hessians(model, x, y, batch_seqs=4)
    calls, linear = [], torch.nn.functional.linear

    def recording(a, weight, *rest):
        calls.append((a.detach().flatten(0, -2).double(), weight.detach()))
        return linear(a, weight, *rest)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(torch.nn.functional, "linear", recording)
        model(x, y)
    return model, x, hessians, calls


def test_hessians_equal_the_sum_of_x_xT_over_each_matrix_input(calibrated):
    model, _, hessians, calls = calibrated
    params = {name: p for name, p in model.named_parameters()}
    qkv = {n: torch.cat([params[f"{n}.{c}.weight"] for c in "qkv"]) for n in {k.rsplit(".", 2)[0] for k in params if k.endswith("attn.q.weight")}}
    seen = {}
    for a, weight in calls:
        names = [n for n, p in params.items() if p.dim() == 2 and p.shape == weight.shape and torch.equal(p, weight)]
        names += [f"{n}.{c}.weight" for n, fused in qkv.items() if fused.shape == weight.shape and torch.equal(fused, weight) for c in "qkv"]
        assert names, weight.shape
        for name in names:
            seen[name] = seen.get(name, 0) + a.T @ a
    assert set(hessians) == set(seen)
    for name, h in seen.items():
        torch.testing.assert_close(hessians[name].double(), h, rtol=1e-5, atol=1e-4, msg=name)


def test_hessians_cover_every_matrix_the_model_multiplies_by_and_q_k_v_share_one(calibrated):
    model, _, hessians, _ = calibrated
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(hessians) == linear | {"tok_emb.weight"}
    assert "bigram.table.weight" not in hessians  # a lookup: its Hessian would be diagonal, GPTQ = rounding
    for i in range(2):
        q, k, v = (hessians[f"blocks.{i}.attn.{c}.weight"] for c in "qkv")
        assert q is k is v
        assert q.shape == (DIM, DIM)
    assert hessians["blocks.0.mlp.proj.weight"].shape == (2 * DIM, 2 * DIM)


def test_tied_head_hessian_comes_from_the_final_rms_normed_states(calibrated):
    model, x, hessians, _ = calibrated
    finals = []
    hook = model.blocks[-1].register_forward_hook(lambda m, i, out: finals.append(out))
    with torch.no_grad():
        model(x, torch.zeros_like(x))
    hook.remove()
    a = tg.rms_norm(finals[0]).flatten(0, -2).double()
    torch.testing.assert_close(hessians["tok_emb.weight"].double(), a.T @ a, rtol=1e-5, atol=1e-4)
    # normed: every token's vector has mean square 1, so the trace is tokens x width
    assert float(hessians["tok_emb.weight"].trace()) == pytest.approx(x.numel() * DIM, rel=1e-4)


def test_hessians_add_up_over_calls_whatever_the_batching():
    """Batches are separate forward calls of every module: one sequence per call gives the same sums."""
    model = perturb(make_model(seed=8))
    gen = torch.Generator().manual_seed(9)
    x, y = (torch.randint(0, VOCAB, (5, 12), generator=gen) for _ in range(2))
    whole, single = tg.collect_hessians(model, x, y, batch_seqs=5), tg.collect_hessians(model, x, y, batch_seqs=1)
    assert set(whole) == set(single)
    for name in whole:
        torch.testing.assert_close(single[name], whole[name], rtol=1e-5, atol=1e-4)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hooks are gone


# -- sensitivities and clips allocated by them ------------------------------------------------------


def exact_fisher_means(model, x) -> dict[str, float]:
    """Per matrix, the mean over weights of E[g^2] var(row), g the gradient of the mean loss over x's tokens
    with each target drawn from the model, computed exactly: the targets are independent and each token's
    expected gradient is zero, so E[g^2] is the sum over tokens t and labels y of p_t(y) (d -log p_t(y))^2,
    over tokens^2."""
    heads = []
    hook = model.head_input.register_forward_hook(lambda m, i, out: heads.append(out))
    model(x, torch.zeros_like(x))
    hook.remove()
    logp = model.head_logits(heads[0]).log_softmax(-1).flatten(0, 1)
    matrices = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    total = dict.fromkeys(matrices, 0.0)
    row_var = {n: p.detach().double().var(dim=1, correction=0, keepdim=True) for n, p in matrices.items()}
    for t in range(logp.size(0)):
        for y in range(logp.size(1)):
            grads = torch.autograd.grad(-logp[t, y], list(matrices.values()), retain_graph=True, allow_unused=True)
            for (n, p), g in zip(matrices.items(), grads):
                if g is not None:
                    total[n] += logp[t, y].exp().item() * (g.double().square() * row_var[n]).sum().item()
    return {n: total[n] / logp.size(0) ** 2 / p.numel() for n, p in matrices.items()}


def test_sensitivities_average_to_the_exact_fisher_diagonal_times_row_variance_of_each_matrix():
    """A soft cap that binds (logits of +-8 capped at 2), so targets drawn from uncapped logits or taken as
    the argmax would give other means."""
    torch.manual_seed(11)
    model = tg.GPT(16, 2, 16, 2, 1, 2.0, logit_softcap=2.0, bigram_vocab_size=0, max_seq_len=8, smear_gate=False).float()
    perturb(model, scale=0.3, seed=12)
    with torch.no_grad():
        model.tok_emb.weight.mul_(4)
    x = torch.randint(0, 16, (2, 3), generator=torch.Generator().manual_seed(13))
    exact = exact_fisher_means(model, x)
    gen = torch.Generator().manual_seed(14)
    draws = [tg.weight_sensitivities(model, x, gen) for _ in range(400)]
    assert set(draws[0]) == {n for n, v in exact.items() if v > 0}
    for name, value in exact.items():
        if value > 0:
            mean = sum(d[name] for d in draws) / len(draws)
            assert mean == pytest.approx(value, rel=0.12), name
    assert all(p.grad is None for p in model.parameters())  # leaves no gradient behind


def clip_setup(sizes, sens, alloc, k=12.0):
    state = {f"m{i}": torch.zeros(n, 4) for i, n in enumerate(sizes)} | {"s": torch.zeros(8, 4), "v": torch.zeros(4)}
    groups = {n: "mlp" for n in state if n.startswith("m")} | {"s": "other", "v": "fp16"}
    clips = dict.fromkeys(tg.QUANT_GROUPS) | {"mlp": k}
    sensitivities = {f"m{i}": s for i, s in enumerate(sens)} | {"s": 5.0}
    return state, tg.allocated_clips(state, groups, clips, sensitivities, alloc)


def test_allocated_clips_halve_the_step_for_four_times_the_sensitivity_and_keep_the_group_bytes():
    state, clips = clip_setup([3, 5, 2], [1.0, 4.0, 0.5], 0.5)
    assert clips["m1"] / clips["m0"] == pytest.approx(0.5) and clips["m2"] / clips["m0"] == pytest.approx(2**0.5)
    # bytes go as -log k: their size-weighted sum stays that of the group's k
    assert sum(state[n].numel() * math.log(clips[n]) for n in ("m0", "m1", "m2")) == pytest.approx(10 * 4 * math.log(12.0))
    assert clips["s"] is None and clips["v"] is None  # a search-clip group and fp16 are left alone


def test_allocated_clips_stay_within_twice_the_group_clip_and_alloc_zero_is_the_group_clip():
    _, clips = clip_setup([4, 4], [1.0, 1e6], 0.5)
    assert clips == dict(m0=24.0, m1=6.0, s=None, v=None)
    _, clips = clip_setup([4, 4], [1.0, 1e6], 0.0)
    assert clips == dict(m0=12.0, m1=12.0, s=None, v=None)


def test_allocated_clips_lower_the_expected_loss_at_the_same_bytes():
    """Expected loss ~ sum of size x sensitivity x k^2; at alloc 0.5 it is the least for the bytes."""
    gen = torch.Generator().manual_seed(15)
    sizes = torch.randint(1, 9, (6,), generator=gen).tolist()
    sens = torch.exp(0.25 * torch.randn(6, generator=gen)).mul(0.1).tolist()  # spread inside the 2x bounds
    losses = {}
    for alloc in (0.0, 0.25, 0.5, 0.75):
        state, clips = clip_setup(sizes, sens, alloc)
        names = [f"m{i}" for i in range(6)]
        assert sum(state[n].numel() * math.log(clips[n]) for n in names) == pytest.approx(4 * sum(sizes) * math.log(12.0))
        losses[alloc] = sum(state[n].numel() * s * clips[n] ** 2 for n, s in zip(names, sens))
    assert losses[0.5] < losses[0.25] < losses[0.0] and losses[0.5] < losses[0.75]


# -- a trained toy model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT trained 40 Adam steps on a learnable pattern (each token follows from the one before),
    so its weights carry structure rather than pure initialization noise."""
    model = make_model(seed=3)
    gen = torch.Generator().manual_seed(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch():
        start = torch.randint(2, VOCAB, (8, 1), generator=gen)
        seq = (start + 7 * torch.arange(33)[None]) % (VOCAB - 2) + 2
        return seq[:, :-1], seq[:, 1:]

    losses = []
    for _ in range(40):
        x, y = batch()
        loss = model(x, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # it learned something
    model.eval()
    x, y = batch()
    return model, x, y


def test_packed_size_shrinks_with_fewer_bits(trained):
    model, _, _ = trained
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sizes = []
    for b in (8, 6, 4):
        bits = tg.parse_quant_bits(",".join(f"{g}:{b}" for g in ("mlp", "attn", "embed", "bigram", "other")))
        blob, _ = tg.pack_model(state, bits, [], 0, "auto")
        sizes.append(len(blob))
    assert sizes[0] > sizes[1] > sizes[2], sizes


def test_model_rebuilt_from_the_artifact_scores_like_the_in_memory_quantized_model(trained):
    model, x, y = trained
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bits = tg.parse_quant_bits(SPEC)
    blob, _ = tg.pack_model(state, bits, [], FP16_MAX_NUMEL, "auto")

    fresh = make_model(seed=99)
    fresh.load_state_dict(tg.unpack_model(blob))
    fresh.eval()
    reference = make_model(seed=98)
    reference.load_state_dict(quantized_in_memory(state, bits, [], FP16_MAX_NUMEL))
    reference.eval()
    with torch.no_grad():
        got, want, float_losses = fresh(x, y), reference(x, y), model(x, y)
    assert torch.equal(got, want)
    assert not torch.allclose(got, float_losses, rtol=0, atol=1e-6)  # quantization changed something
    assert (got.mean() - float_losses.mean()).abs() < 0.5  # ...without wrecking the model


# -- settings and the cap --------------------------------------------------------------------------


def test_parse_quant_bits_reads_a_full_spec():
    assert tg.parse_quant_bits(SPEC) == dict(mlp=5, attn=6, embed=8, bigram=6, other=8)
    assert tg.parse_quant_bits(" other:2 , bigram:8,embed:3,attn:4,mlp:7,") == dict(mlp=7, attn=4, embed=3, bigram=8, other=2)


@pytest.mark.parametrize("spec", [
    "mlp:5,attn:6,embed:8,bigram:6",            # other missing
    "attn:6,embed:8,bigram:6,other:8",          # mlp missing
    "",                                         # everything missing
    "mpl:5,attn:6,embed:8,bigram:6,other:8",    # misspelt group
    "mlp:5,attn:6,embed:8,bigram:6,other:8,head:6",
    "mlp:1,attn:6,embed:8,bigram:6,other:8",    # too few bits
    "mlp:9,attn:6,embed:8,bigram:6,other:8",    # too many
    "mlp:16,attn:6,embed:8,bigram:6,other:8",
    "mlp:0,attn:6,embed:8,bigram:6,other:8",
    "mlp:-5,attn:6,embed:8,bigram:6,other:8",
    "mlp:5.5,attn:6,embed:8,bigram:6,other:8",
    "mlp:,attn:6,embed:8,bigram:6,other:8",
    "mlp5,attn:6,embed:8,bigram:6,other:8",
])
def test_parse_quant_bits_rejects_bad_specs(spec):
    with pytest.raises(tg.SetupError, match="QUANT_BITS"):
        tg.parse_quant_bits(spec)


def test_parse_quant_bits_reports_a_non_decimal_digit_as_a_setup_error():
    """'²'.isdigit() is True but int('²') fails: the bad setting must still be a one-line SetupError,
    not a ValueError traceback."""
    with pytest.raises(tg.SetupError, match="QUANT_BITS"):
        tg.parse_quant_bits("mlp:\u00b2,attn:6,embed:8,bigram:6,other:8")


def test_check_artifact_size_under_and_at_the_cap_returns_the_total():
    assert tg.ARTIFACT_CAP_BYTES == 16_000_000
    assert tg.check_artifact_size(60_000, 15_000_000, False) == 15_060_000
    assert tg.check_artifact_size(1_000_000, 15_000_000, False) == 16_000_000


def test_check_artifact_size_over_the_cap_says_by_how_much_and_what_to_turn():
    with pytest.raises(tg.SetupError) as err:
        tg.check_artifact_size(61_234, 15_999_000, False)
    msg = str(err.value)
    assert "16,060,234" in msg  # the total
    assert "60,234 over" in msg  # how many bytes over
    assert "QUANT_BITS" in msg and "ALLOW_OVER_CAP" in msg
    with pytest.raises(tg.SetupError, match="1 over"):
        tg.check_artifact_size(1, 16_000_000, False)


def test_check_artifact_size_allow_over_cap_returns_the_total():
    assert tg.check_artifact_size(61_234, 15_999_000, True) == 16_060_234


def test_payload_bytes_counts_bits_per_value_row_scales_and_fp16():
    state = {
        "blocks.0.mlp.fc.weight": torch.zeros(8, 16),  # 128 values at 5 bits + 8 fp16 scales
        "blocks.0.attn.q.weight": torch.zeros(16, 16),  # 256 values at 6 bits + 16 scales
        "blocks.0.attn_scale": torch.zeros(16),  # a vector: fp16
        "tok_emb.weight": torch.zeros(4, 4),  # 16 values, under FP16_MAX_NUMEL: fp16
    }
    bits = tg.parse_quant_bits(SPEC)
    expected = (128 * 5 / 8 + 2 * 8) + (256 * 6 / 8 + 2 * 16) + 2 * 16 + 2 * 16
    assert tg.payload_bytes(state, bits, [], 16) == int(expected)
    assert tg.payload_bytes(state, bits, ["mlp.fc"], 16) == int(expected - (128 * 5 / 8 + 2 * 8) + 2 * 128)


def test_payload_estimate_with_sdclip_is_the_entropy_of_the_rounded_gaussian_and_near_the_packed_bytes():
    """SDClip at k standard deviations rounds a Gaussian row at steps of k/qmax of its std: about
    log2(qmax sqrt(2 pi e) / k) bits a value, which the compressors come close to."""
    gen = torch.Generator().manual_seed(1)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(256, 512, generator=gen) for i in range(4)}
    bits = tg.parse_quant_bits("mlp:6,attn:6,embed:8,bigram:6,other:8")
    clips = tg.parse_quant_clip("mlp:14,attn:search,embed:search,bigram:search,other:search")
    per_value = math.log2(31 * math.sqrt(2 * math.pi * math.e) / 14)  # 3.19 bits
    estimate = tg.payload_bytes(state, bits, [], 0, clips)
    assert estimate == int(4 * (256 * 512 * per_value / 8 + 2 * 256))
    blob, _ = tg.pack_model(state, bits, [], 0, "auto", clips)
    assert 0.95 < len(blob) / estimate < 1.1
    assert tg.payload_bytes(state, bits, [], 0) > 1.8 * estimate  # 6 bits a value without the clip


def test_packed_artifact_of_random_weights_is_near_the_payload():
    """Random weights barely compress: the packed size lies close to the payload estimate."""
    gen = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(256, 128, generator=gen) for i in range(4)}
    bits = tg.parse_quant_bits(SPEC)
    blob, _ = tg.pack_model(state, bits, [], 0, "auto")
    assert 0.85 < len(blob) / tg.payload_bytes(state, bits, [], 0) < 1.1


# -- the script: calibration inside the training budget, GPTQ end to end ----------------------------


def test_calibration_reads_the_training_stream_right_after_training_never_validation(tiny_corpus, tmp_path, monkeypatch):
    """main() in this process, with collect_hessians spied on: the calibration sequences are exactly the
    training stream's next tokens after the last training batch, none of them a stretch of the
    validation split, and they run through an uncompiled fp32 GPT."""
    from test_training import SETTING_NAMES, tiny_config

    settings = tiny_config(tiny_corpus, tmp_path / "out", ITERATIONS=3, WARMUP_STEPS=1, GPTQ_CALIB_SEQS=5)
    for name in SETTING_NAMES | {"WORLD_SIZE", "RANK", "LOCAL_RANK"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, str(value))
    seen = []

    def spy(model, x, y, *rest, **kw):
        seen.append((model, x.clone(), y.clone()))
        return real(model, x, y, *rest, **kw)

    real = tg.collect_hessians
    monkeypatch.setattr(tg, "collect_hessians", spy)
    tg.main()

    (model, x, y), = seen
    assert type(model) is tg.GPT and next(model.parameters()).dtype == torch.float32
    seq, local = settings["TRAIN_SEQ_LEN"], settings["TRAIN_BATCH_TOKENS"] // 8
    stream = tg.TokenStream(f"{tiny_corpus['data_path']}/fineweb_train_*.bin", tiny_corpus["vocab_size"])
    stream.take(3 * 8 * (local + 1))  # 3 steps of 8 micro-batches (the warm-up's are rewound)
    tokens = torch.from_numpy(stream.take(5 * seq + 1).astype(np.int64))
    assert torch.equal(x, tokens[:-1].view(5, seq)) and torch.equal(y, tokens[1:].view(5, seq))
    val = tg.load_val_tokens(f"{tiny_corpus['data_path']}/fineweb_val_*.bin", tiny_corpus["vocab_size"], 0)
    windows = np.lib.stride_tricks.sliding_window_view(val, seq)
    assert not any((windows == row.numpy()).all(axis=1).any() for row in x)
    log = (tmp_path / "out" / "train.log").read_text()
    assert re.search(r"^gptq calibration: 5 training sequences \(320 tokens\), 14 matrices, sensitivities of \d+, in ", log, re.M)


def test_script_with_gptq_and_sdclip_runs_end_to_end(tiny_corpus, tmp_path):
    from test_training import FINAL_SCORE, run_script, tiny_config

    out = tmp_path / "out"
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, FP16_MAX_NUMEL=0, GPTQ_CALIB_SEQS=8, GPTQ_BLOCK=16, QUANT_ALLOC=0,
                                              QUANT_CLIP="mlp:6,attn:search,embed:20,bigram:search,other:search"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "train.log").read_text().splitlines()
    assert FINAL_SCORE.match(lines[-1]), lines[-1]
    assert any(line.startswith("gptq calibration: 8 training sequences (512 tokens), 14 matrices") for line in lines)
    groups = {m.group(1): m.group(0) for m in (re.match(r"quant group:(\w+) .*", line) for line in lines) if m}
    assert "clip:6.0 gptq:4 output error gptq:" in groups["mlp"]  # fc and proj of 2 layers
    assert "clip:search gptq:8 output error" in groups["attn"]  # q, k, v, proj of 2 layers
    assert "clip:search gptq:1 output error" in groups["bigram"]  # the projection; the table is a lookup
    assert "clip:20.0 gptq:1 output error" in groups["embed"]  # the tied head
    assert "gptq:0" in groups["other"]  # resid_mix and skip weights: no Hessian, rounded to nearest


def test_script_with_quant_alloc_spreads_each_group_clip_over_its_matrices(tiny_corpus, tmp_path):
    from test_training import FINAL_SCORE, run_script, tiny_config

    out = tmp_path / "out"
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, FP16_MAX_NUMEL=0, GPTQ_CALIB_SEQS=8, QUANT_ALLOC=0.5,
                                              QUANT_CLIP="mlp:6,attn:8,embed:20,bigram:search,other:search"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert FINAL_SCORE.match(log.splitlines()[-1])
    assert re.search(r"^gptq calibration: 8 training sequences \(512 tokens\), 14 matrices, sensitivities of \d+, in ", log, re.M)
    for group, k in (("mlp", 6), ("attn", 8)):
        lo, hi = map(float, re.search(rf"^quant group:{group} .* clip:([\d.]+)-([\d.]+) gptq:", log, re.M).groups())
        assert k / 2 <= lo < k < hi <= 2 * k
    assert re.search(r"^quant group:embed .* clip:20.0 gptq:1", log, re.M)  # alone in its group


def test_gptq_reserve_must_leave_training_time(tiny_corpus, tmp_path):
    from test_training import assert_setup_error, run_script, tiny_config

    proc = run_script(tmp_path, **tiny_config(tiny_corpus, tmp_path / "out", MAX_WALLCLOCK_SECONDS=5, GPTQ_RESERVE_SECONDS=5))
    assert_setup_error(proc, "GPTQ_RESERVE_SECONDS=5", "MAX_WALLCLOCK_SECONDS=5")
