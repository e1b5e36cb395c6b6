"""Quantization and packing: per-row integers with a clip search, the packed artifact (groups, fp16
keeps, codecs, report), its size against the bit widths and the cap, and a model rebuilt from it."""
import json
import math

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
    assert blob[:4] == b"PGQ1"
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


def test_packed_artifact_of_random_weights_is_near_the_payload():
    """Random weights barely compress: the packed size lies close to the payload estimate."""
    gen = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(256, 128, generator=gen) for i in range(4)}
    bits = tg.parse_quant_bits(SPEC)
    blob, _ = tg.pack_model(state, bits, [], 0, "auto")
    assert 0.85 < len(blob) / tg.payload_bytes(state, bits, [], 0) < 1.1
