"""Evaluation: bytes per target (the bpb denominator), the sliding-window plan, and evaluate() checked
against brute-force scoring that runs the model on exactly the context each target is given."""
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import SHARED_TOKENIZER

BOS = 1


# Varied documents: plain English, punctuation, digits, leading/trailing/double spaces, newlines,
# accented letters, non-Latin scripts and emoji (byte-fallback pieces in the generated tokenizer).
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Wait... what?! (Really) -- yes; 100% sure, said Dr. O'Neil at 10:45 on 2024-03-07.",
    "  leading and trailing spaces  ",
    "double  spaces   inside    this  line",
    "first line\nsecond line\n\nthird paragraph\n",
    "Crème brûlée à la française, naïve señor, smörgåsbord and Ωmega ß.",
    "東京 is Tokyo; Москва is Moscow; 😀 means happy, 🎉🎉 means party.",
    "x=12345; y = [6, 7, 8] # code {a|b} <tag> back\\slash ~ok ^_^",
    "Ünïcödé çafé 東京 привет 😀",
    "a",
]

# ASCII documents the fineweb_1024 tokenizer covers without <unk> pieces.
ASCII_DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The year 2024 was busy: 3 meetings, 12 emails & one \"big\" launch!",
    "He said (quietly) that it's 9:30 a.m. -- maybe.",
    "  spaced   out  text  ",
    "tab\tsep\nnew line\n\nparagraph",
    "50% off! $19.99 today only, for 3 days.",
    "Q",
]


def load_sp(path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


def shared_sp() -> spm.SentencePieceProcessor:
    if not SHARED_TOKENIZER.is_file():
        pytest.skip(f"the challenge tokenizer {SHARED_TOKENIZER} is not on this machine")
    return load_sp(SHARED_TOKENIZER)


def stream_of(sp, docs):
    """Documents encoded as the shards hold them: [bos] + ids, concatenated. Returns the stream and
    each document's (first target index, end index) in it: targets first..end-1 belong to it."""
    stream, spans = [], []
    for ids in sp.encode(docs):
        stream.append(sp.bos_id())
        first = len(stream)
        stream.extend(ids)
        spans.append((first, len(stream)))
    return torch.tensor(stream, dtype=torch.long), spans


def per_target_bytes(stream: torch.Tensor, luts) -> torch.Tensor:
    """Bytes of target t (t >= 1) at index t; index 0 (no target) holds 0."""
    out = torch.zeros(stream.numel(), dtype=torch.long)
    out[1:] = tg.target_bytes(stream[:-1], stream[1:], luts).long()
    return out


def check_documents_byte_counts(sp, docs):
    luts = tg.byte_luts(sp, sp.vocab_size(), torch.device("cpu"))
    stream, spans = stream_of(sp, docs)
    counted = per_target_bytes(stream, luts)
    for doc, ids, (first, end) in zip(docs, sp.encode(docs), spans):
        expected = len(sp.decode(ids).encode("utf-8"))
        assert int(counted[first:end].sum()) == expected, (doc, [sp.id_to_piece(i) for i in ids])
        if first > 1:  # the BOS that opens this document is a target of the previous context: 0 bytes
            assert int(counted[first - 1]) == 0
    assert int(counted.sum()) == sum(len(sp.decode(ids).encode("utf-8")) for ids in sp.encode(docs))


# -- bytes per target ------------------------------------------------------------------------------


def test_generated_tokenizer_documents_use_byte_fallback_and_leading_space_pieces(tiny_sp):
    """The fixture documents really exercise the byte-fallback and space-mark paths."""
    pieces = [i for ids in tiny_sp.encode(DOCUMENTS) for i in ids]
    assert any(tiny_sp.is_byte(i) for i in pieces)
    assert any(tiny_sp.id_to_piece(i).startswith("\u2581") for i in pieces)
    # the first piece of a document carries the dummy-prefix space that decode drops
    assert all(tiny_sp.id_to_piece(ids[0]).startswith("\u2581") for ids in tiny_sp.encode(DOCUMENTS))


def test_target_bytes_sum_to_utf8_bytes_of_each_decoded_document_generated_tokenizer(tiny_sp):
    check_documents_byte_counts(tiny_sp, DOCUMENTS)


def test_target_bytes_sum_to_utf8_bytes_of_each_decoded_document_fineweb_tokenizer():
    sp = shared_sp()
    for ids in sp.encode(ASCII_DOCUMENTS):
        assert sp.unk_id() not in ids  # these sentences must be fully covered for a decode comparison
    check_documents_byte_counts(sp, ASCII_DOCUMENTS)


def test_fineweb_tokenizer_unknown_pieces_count_zero_and_drop_the_following_space():
    """With <unk> pieces (no byte fallback in fineweb_1024) the count equals the decoded text of the
    runs between <unk> pieces: <unk> is a boundary like BOS, so it counts 0 and the space mark of the
    piece after it counts 0 too (decode drops a run's leading space the same way)."""
    sp = shared_sp()
    luts = tg.byte_luts(sp, sp.vocab_size(), torch.device("cpu"))
    docs = ["café 東京 😀 ok", "x=1; y = [2, 3]  # code", "50% off! $19.99 @shop #deal ~ok {a|b} <tag> back\\slash"]
    stream, spans = stream_of(sp, docs)
    counted = per_target_bytes(stream, luts)
    saw_unk = False
    for ids, (first, end) in zip(sp.encode(docs), spans):
        runs, run = [], []
        for i in ids:
            if i == sp.unk_id():
                saw_unk = True
                runs.append(run)
                run = []
            else:
                run.append(i)
        runs.append(run)
        expected = sum(len(sp.decode(r).encode("utf-8")) for r in runs)
        assert int(counted[first:end].sum()) == expected
        unk_positions = [first + k for k, i in enumerate(ids) if i == sp.unk_id()]
        assert all(int(counted[p]) == 0 for p in unk_positions)
    assert saw_unk


def test_control_and_unknown_ids_count_zero_bytes_and_byte_pieces_one(tiny_sp):
    sp = tiny_sp
    vocab = sp.vocab_size() + 8  # a model vocabulary padded past the tokenizer's: the extra ids are unused
    luts = tg.byte_luts(sp, vocab, torch.device("cpu"))
    specials = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    assert sorted(specials) == [0, 1, 2, 3]  # pad, bos, eos, unk
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    word = sp.piece_to_id("\u2581ja")
    assert not sp.is_unknown(word)
    prevs = [BOS, 3, word, byte_ids[10]]
    for prev in prevs:
        for target in specials + list(range(sp.vocab_size(), vocab)):
            assert int(tg.target_bytes(torch.tensor([prev]), torch.tensor([target]), luts)) == 0
        got = tg.target_bytes(torch.tensor([prev] * len(byte_ids)), torch.tensor(byte_ids), luts)
        assert got.tolist() == [1] * len(byte_ids)
    # a space-marked piece: its text, plus the space unless it follows a boundary (BOS, <unk>)
    assert int(tg.target_bytes(torch.tensor([word]), torch.tensor([word]), luts)) == 3
    assert int(tg.target_bytes(torch.tensor([byte_ids[0]]), torch.tensor([word]), luts)) == 3
    assert int(tg.target_bytes(torch.tensor([BOS]), torch.tensor([word]), luts)) == 2
    assert int(tg.target_bytes(torch.tensor([3]), torch.tensor([word]), luts)) == 2


def test_multibyte_pieces_count_their_utf8_bytes(tiny_sp):
    sp = tiny_sp
    luts = tg.byte_luts(sp, sp.vocab_size(), torch.device("cpu"))
    checked = 0
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        text = piece[1:] if piece.startswith("\u2581") else piece
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or text.isascii():
            continue
        after_word = int(tg.target_bytes(torch.tensor([sp.piece_to_id("ja")]), torch.tensor([i]), luts))
        assert after_word == len(text.encode("utf-8")) + piece.startswith("\u2581"), piece
        checked += 1
    assert checked > 0  # the generated vocabulary has accented pieces (é, ñá, ør...)


# -- window plan -----------------------------------------------------------------------------------

PLANS = [
    (100, 16, 4),     # n-1 = 99 not a multiple of the stride
    (100, 16, 5),
    (130, 32, 7),
    (101, 16, 16),    # stride == seq_len, n-1 a multiple of it
    (100, 16, 16),    # stride == seq_len, a tail window
    (101, 16, 0),     # plain
    (100, 16, 0),     # plain with a tail
    (50, 64, 8),      # seq_len > n: one window of n-1 targets
    (50, 64, 0),
    (50, 64, 49),
    (37, 10, 1),      # stride 1
    (37, 10, 3),
    (17, 16, 16),     # window exactly the stream
    (2, 8, 0),        # a single target
    (2, 8, 1),
]


@pytest.mark.parametrize("n,seq_len,stride", PLANS)
def test_window_plan_scores_every_target_exactly_once(n, seq_len, stride):
    starts, first = tg.window_plan(n, seq_len, stride)
    length = min(seq_len, n - 1)
    assert len(starts) == len(first) >= 1
    assert starts[0] == 0 and first[0] == 0  # the first window scores all its targets
    assert np.all(np.diff(starts) > 0)
    assert np.all(starts >= 0) and np.all(starts + length <= n - 1)  # tokens[s : s + length + 1] fit
    assert np.all(first >= 0) and np.all(first < length)  # every window scores something
    times_scored = np.zeros(n, dtype=int)
    for s, f in zip(starts, first):
        for j in range(f, length):
            times_scored[s + j + 1] += 1
    assert times_scored[0] == 0
    assert np.all(times_scored[1:] == 1)
    step = stride or length
    assert np.all(starts[:-1] == step * np.arange(len(starts) - 1))  # regular starts, then maybe a flush tail
    assert np.all(first[1:] >= length - step)  # every later target sees at least length - stride context


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 17), (50, 64, 50), (50, 64, 64), (100, 16, -1), (100, 16, -16), (1, 8, 0)])
def test_window_plan_rejects_stride_outside_the_window(n, seq_len, stride):
    with pytest.raises(tg.SetupError, match="EVAL_STRIDE"):
        tg.window_plan(n, seq_len, stride)


# -- evaluate --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_setup(tiny_corpus, tiny_sp):
    """A tiny perturbed GPT over the generated tokenizer's vocabulary and 150 validation tokens."""
    vocab = tiny_corpus["vocab_size"]
    torch.manual_seed(0)
    model = tg.GPT(vocab, 2, 32, 4, 2, 2.0, bigram_vocab_size=64, bigram_dim=16, bos_id=tiny_sp.bos_id(),
                   max_seq_len=160).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    val = tg.load_val_tokens(str(Path(tiny_corpus["data_path"]) / "fineweb_val_*.bin"), vocab, 150)
    tokens = torch.from_numpy(val.astype(np.int32))
    assert (tokens == tiny_sp.bos_id()).sum() >= 2  # a document boundary inside the stream
    luts = tg.byte_luts(tiny_sp, vocab, torch.device("cpu"))
    return model, tokens, luts


def token_loss(model, context: torch.Tensor, target: int) -> float:
    """The model's loss on `target` given exactly `context` (the last loss of one forward)."""
    x = context.long()[None]
    y = torch.cat([context.long()[1:], torch.tensor([target])])[None]
    with torch.no_grad():
        return float(model(x, y)[0, -1])


def window_start_for_target(t: int, n: int, seq_len: int, stride: int) -> int:
    """The rule, stated without window_plan: windows of length L = min(seq_len, n - 1) start at
    0, stride, 2 stride, ... while they fit, plus one flush with the end; target t is scored by the
    earliest window that holds it (the one giving it the most context)."""
    length = min(seq_len, n - 1)
    stride = stride or length
    candidates = list(range(0, n - length, stride)) + [n - 1 - length]
    return min(c for c in candidates if c < t <= c + length)


def brute_force_per_target(model, tokens, seq_len, stride, luts):
    n = tokens.numel()
    nats, nbytes = 0.0, 0
    for t in range(1, n):
        start = window_start_for_target(t, n, seq_len, stride)
        assert t - start <= min(seq_len, n - 1)
        nats += token_loss(model, tokens[start:t], int(tokens[t]))
        nbytes += int(tg.target_bytes(tokens[t - 1 : t].long(), tokens[t : t + 1].long(), luts))
    return nats / (n - 1), nats / math.log(2) / nbytes


def brute_force_per_window(model, tokens, seq_len, stride, luts):
    """Each window of window_plan run on its own; its scored part summed."""
    n = tokens.numel()
    length = min(seq_len, n - 1)
    starts, first = tg.window_plan(n, seq_len, stride)
    nats, count, nbytes = 0.0, 0, 0
    for s, f in zip(starts.tolist(), first.tolist()):
        w = tokens[s : s + length + 1].long()
        x, y = w[None, :-1], w[None, 1:]
        with torch.no_grad():
            losses = model(x, y)[0]
        nats += float(losses[f:].double().sum())
        count += length - f
        nbytes += int(tg.target_bytes(x[0], y[0], luts)[f:].sum())
    assert count == n - 1
    return nats / count, nats / math.log(2) / nbytes


def test_evaluate_stride_equal_to_seq_len_matches_plain(eval_setup):
    model, tokens, luts = eval_setup
    plain = tg.evaluate(model, tokens, 32, 0, 4, luts)
    same = tg.evaluate(model, tokens, 32, 32, 4, luts)
    assert same == pytest.approx(plain, rel=1e-12)
    assert math.isfinite(plain[0]) and plain[0] > 0 and plain[1] > 0


def test_model_outputs_are_not_trivial(eval_setup):
    model, tokens, _ = eval_setup
    x, y = tokens[None, :-1].long(), tokens[None, 1:].long()
    with torch.no_grad():
        losses = model(x, y)
    assert float(losses.std()) > 0.1  # otherwise context would not matter and the checks below are weak


@pytest.mark.parametrize("reference,seq_len,stride", [
    (brute_force_per_target, 24, 5), (brute_force_per_target, 32, 7), (brute_force_per_target, 16, 1),
    (brute_force_per_target, 24, 0), (brute_force_per_target, 200, 40),
    (brute_force_per_window, 24, 5), (brute_force_per_window, 32, 7), (brute_force_per_window, 32, 32),
])
def test_evaluate_sliding_matches_brute_force(eval_setup, reference, seq_len, stride):
    model, tokens, luts = eval_setup
    loss, bpb = tg.evaluate(model, tokens, seq_len, stride, 3, luts)
    ref_loss, ref_bpb = reference(model, tokens, seq_len, stride, luts)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert bpb == pytest.approx(ref_bpb, rel=1e-6)


def test_sliding_context_changes_the_score(eval_setup):
    """The stride is honoured: more context per target gives a different (here: any) score than plain."""
    model, tokens, luts = eval_setup
    assert tg.evaluate(model, tokens, 24, 4, 4, luts)[0] != pytest.approx(tg.evaluate(model, tokens, 24, 0, 4, luts)[0], rel=1e-6)


@pytest.mark.parametrize("batch_seqs", [3, 5, 64])
def test_evaluate_padding_partial_batches_matches_batch_of_one(eval_setup, batch_seqs):
    model, tokens, luts = eval_setup
    starts, _ = tg.window_plan(tokens.numel(), 24, 5)
    assert len(starts) % batch_seqs != 0  # the last batch is padded
    one = tg.evaluate(model, tokens, 24, 5, 1, luts)
    batched = tg.evaluate(model, tokens, 24, 5, batch_seqs, luts)
    assert batched == pytest.approx(one, rel=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_evaluate_rank_shares_recombine_to_the_single_process_score(eval_setup, world):
    """Without torch.distributed each rank returns its own share's averages; weighted by the targets and
    bytes of the windows that share holds (recomputed from window_plan), they recombine to world=1."""
    model, tokens, luts = eval_setup
    seq_len, stride = 24, 5
    n = tokens.numel()
    length = min(seq_len, n - 1)
    starts, first = tg.window_plan(n, seq_len, stride)
    per_target = per_target_bytes(tokens.long(), luts)
    full_loss, full_bpb = tg.evaluate(model, tokens, seq_len, stride, 4, luts)
    total_nats, total_count, total_bytes = 0.0, 0, 0
    owned = []
    for rank in range(world):
        lo, hi = len(starts) * rank // world, len(starts) * (rank + 1) // world
        assert hi > lo
        targets = [s + j + 1 for s, f in zip(starts[lo:hi], first[lo:hi]) for j in range(f, length)]
        owned += targets
        count, nbytes = len(targets), int(per_target[targets].sum())
        loss, bpb = tg.evaluate(model, tokens, seq_len, stride, 4, luts, rank=rank, world=world)
        nats = loss * count
        assert nats / math.log(2) / nbytes == pytest.approx(bpb, rel=1e-9)  # the share's bytes are these
        total_nats, total_count, total_bytes = total_nats + nats, total_count + count, total_bytes + nbytes
    assert sorted(owned) == list(range(1, n))  # the shares partition the targets
    assert total_nats / total_count == pytest.approx(full_loss, rel=1e-6)
    assert total_nats / math.log(2) / total_bytes == pytest.approx(full_bpb, rel=1e-6)


class FixedLoss(torch.nn.Module):
    """A stand-in model whose loss on each target is 0.1 * the target id."""

    def forward(self, x, y):
        return 0.1 * y.float()


def test_val_bpb_is_nats_over_ln2_over_bytes_by_hand():
    base = torch.tensor([0, 0, 0, 0, 2, 3, 1, 4], dtype=torch.int32)
    space = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    boundary = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    luts = (base, space, boundary)
    tokens = torch.tensor([1, 4, 5, 6, 1, 7, 5], dtype=torch.int32)
    # targets: 4 (2 bytes), 5 (3+1), 6 (1), BOS (0), 7 after BOS (4, no space), 5 (3+1) -> 15 bytes
    # nats: 0.4 + 0.5 + 0.6 + 0.1 + 0.7 + 0.5 = 2.8 over 6 targets
    for seq_len, stride in [(6, 0), (3, 0), (4, 1), (4, 3), (2, 2)]:
        loss, bpb = tg.evaluate(FixedLoss(), tokens, seq_len, stride, 2, luts)
        assert loss == pytest.approx(2.8 / 6, rel=1e-6)
        assert bpb == pytest.approx(2.8 / math.log(2) / 15, rel=1e-6)
