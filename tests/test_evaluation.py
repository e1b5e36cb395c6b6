"""Evaluation: bytes per target (the bpb denominator), the sliding-window plan, and evaluate() checked
against brute-force scoring that runs the model on exactly the context each target is given."""
import copy
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


# -- score-first test-time training ----------------------------------------------------------------


@pytest.mark.parametrize("n,seq_len,stride", PLANS)
@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 36, 1000])
def test_chunk_windows_score_every_target_once_in_its_own_chunk_with_unchanged_context(n, seq_len, stride, chunk):
    """Cutting the windows at chunk boundaries keeps window_plan's context for every target, scores each
    target exactly once, and only in the chunk that holds it, chunk after chunk in order."""
    length = min(seq_len, n - 1)
    starts, first = tg.window_plan(n, seq_len, stride)
    plan_start = {s + j + 1: s for s, f in zip(starts.tolist(), first.tolist()) for j in range(f, length)}
    chunks = tg.chunk_windows(n, seq_len, stride, chunk)
    assert len(chunks) == math.ceil((n - 1) / chunk)
    scored = []
    for c, (s, f, e) in enumerate(chunks):
        assert len(s) == len(f) == len(e) >= 1
        assert np.all(f < e) and np.all(f >= 0) and np.all(e <= length)  # every piece scores something
        for start, lo, hi in zip(s.tolist(), f.tolist(), e.tolist()):
            for j in range(lo, hi):
                t = start + j + 1
                assert 1 + c * chunk <= t < 1 + (c + 1) * chunk  # in its own chunk
                assert plan_start[t] == start  # the same window, so the same context, as plain sliding
                scored.append(t)
    assert scored == list(range(1, n))  # each target once, in order


def ttt_args(**overrides) -> SimpleNamespace:
    args = dict(ttt_epochs=3, ttt_chunk_tokens=36, ttt_phases=0, ttt_lr=0.5, ttt_momentum=0.9, ttt_grad_clip=0.0,
                ttt_batch_seqs=2, eval_batch_seqs=3, ttt_lora_rank=0)
    args.update(overrides)
    return SimpleNamespace(**args)


def reference_train(model, opt, tokens, c, n_chunks, seq_len, args):
    """TTT_EPOCHS passes of SGD over chunk c of n_chunks, as in reference_ttt."""
    chunk = args.ttt_chunk_tokens
    length = min(seq_len, chunk)
    seqs = [c * chunk + k * length for k in range(chunk // length)] + ([c * chunk + chunk - length] if chunk % length else [])
    opt.param_groups[0]["lr"] = args.ttt_lr * (1 + math.cos(math.pi * c / (n_chunks - 1))) / 2
    for _ in range(args.ttt_epochs):
        for i in range(0, len(seqs), args.ttt_batch_seqs):
            batch = torch.stack([tokens[s : s + length + 1].long() for s in seqs[i : i + args.ttt_batch_seqs]])
            opt.zero_grad()
            model(batch[:, :-1], batch[:, 1:]).mean().backward()
            if args.ttt_grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.ttt_grad_clip)
            opt.step()


def reference_ttt(model, tokens, seq_len, stride, luts, args, update_first=False):
    """Score-first TTT written out plainly: each target of chunk c scored on its own, on exactly the context
    plain sliding evaluation gives it, by a copy of the model that has trained on chunks 0..c-1 only.
    Training tiles a chunk's targets with sequences of min(seq_len, chunk), the last flush with its end,
    in batches of TTT_BATCH_SEQS, one SGD step on each batch's mean loss, LR cosine over the chunks.
    update_first=True is the leak the order forbids: train on a chunk, then score it."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.ttt_lr, momentum=args.ttt_momentum)
    n, chunk = tokens.numel(), args.ttt_chunk_tokens
    n_chunks = math.ceil((n - 1) / chunk)
    nats, count, nbytes = 0.0, 0, 0

    def train(c):
        reference_train(model, opt, tokens, c, n_chunks, seq_len, args)

    for c in range(n_chunks):
        last = c == n_chunks - 1
        if update_first and not last:
            train(c)
        for t in range(1 + c * chunk, min(1 + (c + 1) * chunk, n)):
            nats += token_loss(model, tokens[window_start_for_target(t, n, seq_len, stride) : t], int(tokens[t]))
            nbytes += int(tg.target_bytes(tokens[t - 1 : t].long(), tokens[t : t + 1].long(), luts))
            count += 1
        if not update_first and not last:
            train(c)
    assert count == n - 1
    return nats / count, nats / math.log(2) / nbytes


def run_ttt(model, tokens, seq_len, stride, luts, args, rank=0, world=1):
    """evaluate_ttt on a copy of the model: (loss, bpb), and the adapted copy."""
    model = copy.deepcopy(model)
    loss, bpb, score_s, adapt_s = tg.evaluate_ttt(model, list(model.parameters()), tokens, seq_len, stride, luts, args,
                                                  rank, world, eager=model)
    assert score_s > 0 and adapt_s >= 0
    return (loss, bpb), model


def test_ttt_scores_each_chunk_with_the_model_trained_only_on_the_chunks_before_it(eval_setup):
    """With a large learning rate the tiny model memorizes what it trains on, so a chunk scored after
    training on it would score far lower. evaluate_ttt must match the plain score-first reference, and
    not the update-first one."""
    model, tokens, luts = eval_setup
    args = ttt_args()
    got, _ = run_ttt(model, tokens, 16, 5, luts, args)
    score_first = reference_ttt(model, tokens, 16, 5, luts, args)
    update_first = reference_ttt(model, tokens, 16, 5, luts, args, update_first=True)
    plain = tg.evaluate(model, tokens, 16, 5, 3, luts)
    assert update_first[0] < score_first[0] - 1.0  # memorized: the leak would be plain to see
    assert score_first[0] != pytest.approx(plain[0], rel=1e-3)  # and TTT does change the score
    assert got == pytest.approx(score_first, rel=1e-5)


@pytest.mark.parametrize("phases", [2, 3, 7])
def test_ttt_phases_cut_the_split_into_that_many_chunks_scored_first(eval_setup, phases):
    """TTT_PHASES=k: k chunks of ceil(targets / k), whatever TTT_CHUNK_TOKENS says, each scored before the
    model trains on it (the score-first reference at that chunk length)."""
    model, tokens, luts = eval_setup
    n = tokens.numel()
    chunk = tg.ttt_chunk_tokens(ttt_args(ttt_phases=phases), n)
    assert len(tg.chunk_windows(n, 16, 5, chunk)) == phases and chunk == math.ceil((n - 1) / phases)
    got, _ = run_ttt(model, tokens, 16, 5, luts, ttt_args(ttt_phases=phases, ttt_chunk_tokens=5))
    assert got == pytest.approx(reference_ttt(model, tokens, 16, 5, luts, ttt_args(ttt_chunk_tokens=chunk)), rel=1e-5)
    assert tg.ttt_chunk_tokens(ttt_args(ttt_phases=phases, ttt_epochs=0), n) == n  # no SGD: one chunk


def test_ttt_with_one_chunk_is_the_sliding_evaluation_bit_for_bit(eval_setup):
    """The last chunk is scored and never trained on: one chunk holding every target is plain evaluate()."""
    model, tokens, luts = eval_setup
    for seq_len, stride in [(24, 5), (16, 0), (200, 40)]:
        got, adapted = run_ttt(model, tokens, seq_len, stride, luts, ttt_args(ttt_chunk_tokens=tokens.numel() - 1))
        assert got == tg.evaluate(model, tokens, seq_len, stride, 3, luts)
        for a, b in zip(adapted.parameters(), model.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [5, 36, 100])
def test_ttt_without_learning_scores_every_target_once_like_evaluate(eval_setup, chunk):
    """LR 0: the chunked scoring alone, which must reproduce evaluate's nats, target count and bytes."""
    model, tokens, luts = eval_setup
    got, _ = run_ttt(model, tokens, 24, 5, luts, ttt_args(ttt_chunk_tokens=chunk, ttt_lr=0.0))
    assert got == pytest.approx(tg.evaluate(model, tokens, 24, 5, 3, luts), rel=1e-9)
    tokens_fixed = torch.tensor([1, 4, 5, 6, 1, 7, 5], dtype=torch.int32)  # FixedLoss: the sums by hand
    base = torch.tensor([0, 0, 0, 0, 2, 3, 1, 4], dtype=torch.int32)
    space = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    boundary = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    fixed = FixedLossWithWeight()
    loss, bpb, _, _ = tg.evaluate_ttt(fixed, list(fixed.parameters()), tokens_fixed, 4, 1, (base, space, boundary),
                                      ttt_args(ttt_chunk_tokens=chunk % 4 + 1))
    assert loss == pytest.approx(2.8 / 6, rel=1e-6) and bpb == pytest.approx(2.8 / math.log(2) / 15, rel=1e-6)


class FixedLossWithWeight(FixedLoss):
    """FixedLoss with a weight that TTT can train and that changes nothing."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y):
        return super().forward(x, y) + 0 * self.w


def test_ttt_freezes_the_first_blocks_and_adapts_the_rest(eval_setup):
    model, tokens, luts = eval_setup
    model = copy.deepcopy(model)
    before = copy.deepcopy(model)
    params = tg.ttt_parameters(model, 1)
    frozen = {id(p) for p in model.blocks[0].parameters()}
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} - frozen
    tg.evaluate_ttt(model, params, tokens, 16, 5, luts, ttt_args(ttt_lr=0.05))
    for (name, a), b in zip(model.named_parameters(), before.parameters()):
        assert torch.equal(a, b) == name.startswith("blocks.0."), name


def ttt_rank(rank, world, init_file, model, tokens, luts, args, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        score, adapted = run_ttt(model, tokens, 16, 5, luts, args, rank, world)
        torch.save((score, adapted.state_dict()), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
        time.sleep(0.2)  # see the end of train_gpt.main: lets gloo's workers free their tensors
    finally:
        dist.destroy_process_group()


def assert_two_gloo_ranks_match_one_process(model, tokens, luts, args, tmp_path):
    """TTT on two gloo ranks gives one process's score, and both ranks end with its model."""
    one, adapted = run_ttt(model, tokens, 16, 5, luts, args)
    mp.spawn(ttt_rank, args=(2, tmp_path / "store", model, tokens, luts, args, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        score, state = torch.load(tmp_path / f"rank{rank}.pt")
        assert score == pytest.approx(one, rel=1e-6)
        for name, p in adapted.state_dict().items():
            torch.testing.assert_close(state[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_ttt_on_two_gloo_processes_matches_one_process(eval_setup, tmp_path):
    """Two ranks split each chunk's windows and each step's sequences (one rank holds none in some steps)
    and all-reduce the gradients: the score is one process's, and both ranks end with its model."""
    model, tokens, luts = eval_setup
    args = ttt_args(ttt_lr=0.05, ttt_grad_clip=1.0, ttt_batch_seqs=3)
    assert_two_gloo_ranks_match_one_process(model, tokens, luts, args, tmp_path)


# -- per-document LoRA TTT -------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [
    [1, 5, 6, 1, 7, 1, 1, 8, 9],  # opens with BOS; an empty document (BOS, BOS)
    [5, 6, 1, 7, 8],  # opens mid-document
    [5, 6, 7],  # no BOS at all
    [1, 5, 6, 1],  # ends with a BOS, which the last document predicts
    [1, 1, 1],
])
def test_doc_spans_cover_every_target_once_each_document_from_its_bos_to_the_next(tokens):
    tokens = np.asarray(tokens)
    spans = tg.doc_spans(tokens, BOS)
    targets = [t for a, b in spans for t in range(a + 1, b + 1)]
    assert targets == list(range(1, len(tokens)))
    for a, b in spans:
        assert a == 0 or tokens[a] == BOS
        assert not (tokens[a + 1 : b] == BOS).any()  # no BOS inside, only at the ends
        assert b == len(tokens) - 1 or tokens[b] == BOS


@pytest.fixture(scope="module")
def lora_setup(eval_setup, tiny_sp):
    """A tiny perturbed GPT with every model feature the adapters must thread through (looped block, XSA,
    parallel block, LN scale, gated skips, bigram, smear), and the validation tokens opening mid-document,
    with more document starts put in (one document of a single target)."""
    _, tokens, luts = eval_setup
    torch.manual_seed(0)
    model = tg.GPT(luts[0].numel(), 3, 32, 4, 2, 2.0, bigram_vocab_size=64, bigram_dim=16, bos_id=tiny_sp.bos_id(),
                   max_seq_len=160, rope_dims=4, xsa_last_n=2, ln_scale=True, parallel_last_n=1, mlp_neg_slope=0.5,
                   skip_gates=True, loop_layers=(1, 1), loop_repeats=1).float().eval()
    model.looping = True
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    tokens = tokens[3:].clone()
    tokens[[30, 75, 76]] = tiny_sp.bos_id()
    assert tokens[0] != tiny_sp.bos_id()
    lengths = [b - a for a, b in tg.doc_spans(tokens.numpy(), tiny_sp.bos_id())]
    assert len(lengths) >= 3 and max(lengths) > 24  # several documents, one longer than the windows below
    return model, tokens, luts


def lora_args(**overrides) -> SimpleNamespace:
    """Per-document LoRA alone (TTT_EPOCHS=0); the chunked SGD settings for runs that add it."""
    args = dict(ttt_epochs=0, ttt_lora_rank=2, ttt_lora_lr=0.03, ttt_lora_chunk=5, eval_batch_seqs=3, seed=0,
                ttt_chunk_tokens=36, ttt_phases=0, ttt_lr=0.5, ttt_momentum=0.9, ttt_grad_clip=0.0, ttt_batch_seqs=2)
    args.update(overrides)
    return SimpleNamespace(**args)


def reference_lora(model, tokens, seq_len, luts, args, update_first=False):
    """Per-document LoRA TTT written out plainly: documents one at a time (each target's document opens at
    the last BOS before it, or at 0), each with fresh adapters and its own Adam; each target scored on its
    own, on its document's tokens from max(0, (k+1)C - seq_len) for chunk k, by adapters trained on the
    chunks before its own. With TTT_EPOCHS, the documents that open in chunk c of TTT_CHUNK_TOKENS are
    scored first, then the base model takes reference_train's SGD on chunk c. update_first=True is the
    leak: train (adapters and base) on a chunk, then score it."""
    model = copy.deepcopy(model)
    base_opt = torch.optim.SGD(model.parameters(), lr=args.ttt_lr, momentum=args.ttt_momentum)
    n, chunk = tokens.numel(), args.ttt_lora_chunk
    base_chunk = args.ttt_chunk_tokens if args.ttt_epochs else n
    n_chunks = math.ceil((n - 1) / base_chunk)
    opens = [t for t in range(n) if t == 0 or int(tokens[t]) == model.bos_id]
    docs = [(a, b) for a, b in zip(opens, opens[1:] + [n - 1]) if b > a]
    nats, count, nbytes = 0.0, 0, 0

    def score_document(a, b):
        nonlocal nats, count, nbytes
        doc = tokens[a : b + 1].long()
        adapters = tg.DocAdapters(model, 1, args.ttt_lora_rank, args.seed)
        opt = torch.optim.Adam(adapters.parameters(), lr=args.ttt_lora_lr, betas=(0.0, 0.999))
        n_doc_chunks = math.ceil((b - a) / chunk)
        for k in range(n_doc_chunks):
            hi = min((k + 1) * chunk, b - a)
            lo = max(0, (k + 1) * chunk - seq_len)

            def train():
                losses = model(doc[None, lo:hi], doc[None, lo + 1 : hi + 1], adapters)[0]
                opt.zero_grad()
                losses[k * chunk - lo :].sum().backward(inputs=adapters.parameters())
                opt.step()

            if update_first and k < n_doc_chunks - 1:
                train()
            for j in range(k * chunk + 1, hi + 1):
                with torch.no_grad():
                    nats += float(model(doc[None, lo:j], doc[None, lo + 1 : j + 1], adapters)[0, -1])
                nbytes += int(tg.target_bytes(doc[j - 1 : j], doc[j : j + 1], luts))
                count += 1
            if not update_first and k < n_doc_chunks - 1:
                train()

    for c in range(n_chunks):
        if update_first and c < n_chunks - 1:
            reference_train(model, base_opt, tokens, c, n_chunks, seq_len, args)
        for a, b in docs:
            if a // base_chunk == c:
                score_document(a, b)
        if not update_first and c < n_chunks - 1:
            reference_train(model, base_opt, tokens, c, n_chunks, seq_len, args)
    assert count == n - 1
    return nats / count, nats / math.log(2) / nbytes


def run_lora(model, tokens, seq_len, luts, args):
    model = copy.deepcopy(model)
    loss, bpb, score_s, adapt_s = tg.evaluate_ttt(model, list(model.parameters()), tokens, seq_len, 5, luts, args,
                                                  eager=model)
    assert score_s > 0 and adapt_s >= 0
    return loss, bpb


@pytest.mark.parametrize("batch_seqs", [1, 3, 1000])
def test_lora_scores_each_chunk_before_its_documents_adapters_train_on_it(lora_setup, batch_seqs):
    """With a large learning rate the adapters memorize the chunk they train on. evaluate_ttt with LoRA,
    which runs several documents at once (batch_seqs 1: one at a time), must match the plain score-first
    reference and not the update-first one."""
    model, tokens, luts = lora_setup
    args = lora_args(eval_batch_seqs=batch_seqs)
    score_first = reference_lora(model, tokens, 16, luts, args)
    update_first = reference_lora(model, tokens, 16, luts, args, update_first=True)
    without = reference_lora(model, tokens, 16, luts, lora_args(ttt_lora_lr=0.0))
    assert update_first[0] < score_first[0] - 0.5  # memorized: the leak would be plain to see
    assert abs(score_first[0] - without[0]) > 0.01  # and the adapters do change the score
    assert run_lora(model, tokens, 16, luts, args) == pytest.approx(score_first, rel=1e-5)


@pytest.mark.parametrize("lora_lr", [0.0, 0.03])
def test_lora_with_chunked_sgd_scores_each_chunks_documents_before_the_base_model_trains_on_it(lora_setup, lora_lr):
    """TTT_EPOCHS > 0 with LoRA: the documents opening in chunk c are scored (each alone, with its own
    adapters) by the base model trained on chunks 0..c-1 only; a base model memorizing what it trains on
    shows any leak."""
    model, tokens, luts = lora_setup
    args = lora_args(ttt_epochs=2, ttt_lora_lr=lora_lr)
    score_first = reference_lora(model, tokens, 16, luts, args)
    update_first = reference_lora(model, tokens, 16, luts, args, update_first=True)
    lora_only = reference_lora(model, tokens, 16, luts, lora_args(ttt_lora_lr=lora_lr))
    assert update_first[0] < score_first[0] - 0.5
    assert abs(score_first[0] - lora_only[0]) > 0.01  # the base model's SGD changes the score
    assert run_lora(model, tokens, 16, luts, args) == pytest.approx(score_first, rel=1e-5)
    phases = 3  # the default's form: the chunks are thirds of the text (the reference is told their length)
    third = lora_args(ttt_epochs=2, ttt_lora_lr=lora_lr, ttt_chunk_tokens=math.ceil((tokens.numel() - 1) / phases))
    got = run_lora(model, tokens, 16, luts, lora_args(ttt_epochs=2, ttt_lora_lr=lora_lr, ttt_phases=phases))
    assert got == pytest.approx(reference_lora(model, tokens, 16, luts, third), rel=1e-5)


@pytest.mark.parametrize("seq_len,chunk", [(16, 5), (16, 16), (200, 7)])
def test_lora_without_learning_scores_each_document_alone_on_its_own_tokens(lora_setup, seq_len, chunk):
    """LR 0: each target scored once, with the context of its own document only, from the window's start
    (the chunk's end minus seq_len); with windows longer than every document, one forward per document."""
    model, tokens, luts = lora_setup
    args = lora_args(ttt_lora_lr=0.0, ttt_lora_chunk=chunk)
    got = run_lora(model, tokens, seq_len, luts, args)
    assert got == pytest.approx(reference_lora(model, tokens, seq_len, luts, args), rel=1e-6)
    if seq_len == 200:
        nats = nbytes = 0.0
        for a, b in tg.doc_spans(tokens.numpy(), model.bos_id):
            doc = tokens[a : b + 1].long()[None]
            with torch.no_grad():
                nats += float(model(doc[:, :-1], doc[:, 1:]).double().sum())
            nbytes += int(tg.target_bytes(doc[0, :-1], doc[0, 1:], luts).sum())
        assert got == pytest.approx((nats / (tokens.numel() - 1), nats / math.log(2) / nbytes), rel=1e-6)
        assert got[0] != pytest.approx(tg.evaluate(model, tokens, seq_len, 0, 3, luts)[0], rel=1e-4)  # documents cut apart


@pytest.mark.parametrize("seq_len,chunk,batch_seqs", [(16, 5, 3), (16, 5, 1000), (200, 7, 3), (32, 5, 1)])
def test_lora_steps_come_in_powers_of_two_within_the_token_budget(lora_setup, seq_len, chunk, batch_seqs):
    """A step's shape is a power of two of documents by a power of two of positions (or seq_len), and their
    product stays within EVAL_BATCH_SEQS x seq_len: padded batches as large as lora's unpadded ones once ran
    out of the H200's memory. Every target is still scored once."""
    model, tokens, luts = lora_setup
    args = lora_args(ttt_lora_chunk=chunk, eval_batch_seqs=batch_seqs)
    scorer = tg.LoraScorer(model, args, luts, tokens.device)
    spans = sorted(tg.doc_spans(tokens.numpy(), model.bos_id), key=lambda s: s[0] - s[1])
    assert int(scorer(tokens, spans, seq_len)[1]) == tokens.numel() - 1
    assert len(scorer.steps) > 1
    for rows, window in scorer.steps:
        assert rows & (rows - 1) == 0 and (window & (window - 1) == 0 or window == seq_len)
        assert rows * window <= batch_seqs * seq_len


def test_doc_adapters_add_their_low_rank_deltas_per_document_at_each_site(lora_setup):
    """Site by site, a delta x @ A @ B must act as written: on q/k/v it equals adding (A @ B)^T to those
    weights; on the attention's and the MLP's outputs and on the logits, it equals adding x @ A @ B there by
    hand (a forward hook, a hand-made head); and only its own document's loss moves."""
    model, tokens, luts = lora_setup
    model = copy.deepcopy(model)
    docs = [tokens[a : b + 1].long() for a, b in tg.doc_spans(tokens.numpy(), model.bos_id)][:2]
    length = min(d.numel() for d in docs)
    x = torch.stack([d[: length - 1] for d in docs])
    y = torch.stack([d[1:length] for d in docs])
    last = len(model.orders[True]) - 1  # the last virtual layer: block 2, which runs once
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        base = model(x, y)
    for site in ("qkv", "attn", "mlp", "head"):
        adapters = tg.DocAdapters(model, 2, 2, 0)
        a, b = adapters.pairs[(None if site == "head" else last), site]
        with torch.no_grad():
            b[0].normal_(generator=gen)  # document 0 only
            got = model(x, y, adapters)
        delta = (a[0] @ b[0]).detach()
        twin = copy.deepcopy(model)
        block = twin.blocks[2]
        if site == "qkv":
            with torch.no_grad():
                q, k, v = delta.t().split([block.attn.q.out_features, block.attn.k.out_features, block.attn.v.out_features])
                block.attn.q.weight += q
                block.attn.k.weight += k
                block.attn.v.weight += v
        elif site in ("attn", "mlp"):
            getattr(block, site).register_forward_hook(lambda mod, inp, out: out + inp[0] @ delta)
        else:
            cap = twin.logit_softcap
            twin.head_logits = lambda h, lora=None: cap * torch.tanh((h @ twin.tok_emb.weight.t() + h @ delta) / cap)
        with torch.no_grad():
            want = twin(x, y)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, msg=site)
        assert not torch.allclose(got[0], base[0], atol=1e-3), site
        torch.testing.assert_close(got[1], base[1], rtol=0, atol=0, msg=site)  # the other document: untouched


@pytest.mark.parametrize("epochs", [0, 2])
def test_lora_on_two_gloo_processes_matches_one_process(lora_setup, tmp_path, epochs):
    """Two ranks take every other document of each chunk (longest first) and, with the chunked SGD, all-reduce
    its gradients: the score is one process's, and both ranks end with its base model."""
    model, tokens, luts = lora_setup
    args = lora_args(ttt_epochs=epochs, ttt_lr=0.05, ttt_batch_seqs=3)
    assert_two_gloo_ranks_match_one_process(model, tokens, luts, args, tmp_path)
