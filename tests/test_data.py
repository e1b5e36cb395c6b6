"""Shard reading and validation, the val split loader, the endless token stream and the per-rank loader."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from make_data import write_shard

CPU = torch.device("cpu")
BIG_VOCAB = 65536  # every uint16 value is a legal id, so a token's value can name its stream position


def _header(magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=0) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, count)
    return header.tobytes()


def _write_position_shards(folder, sizes, prefix="fineweb_train_"):
    """Shards whose tokens are their global stream positions 0..sum(sizes)-1; returns (pattern, total)."""
    start = 0
    for i, n in enumerate(sizes):
        write_shard(folder / f"{prefix}{i:06d}.bin", np.arange(start, start + n))
        start += n
    assert start <= BIG_VOCAB
    return str(folder / f"{prefix}*.bin"), start


# -- read_shard ----------------------------------------------------------------------------------


def test_read_shard_returns_exactly_the_written_tokens(tmp_path):
    tokens = np.array([1, 0, 511, 7, 7, 300, 2], dtype=np.uint16)
    path = tmp_path / "good.bin"
    write_shard(path, tokens)
    out = tg.read_shard(path, vocab_size=512)
    assert out.dtype == np.uint16
    assert out.shape == tokens.shape
    np.testing.assert_array_equal(np.asarray(out), tokens)


def test_read_shard_accepts_the_largest_id_just_below_vocab_size(tmp_path):
    path = tmp_path / "edge.bin"
    write_shard(path, [0, 1023])
    np.testing.assert_array_equal(np.asarray(tg.read_shard(path, vocab_size=1024)), [0, 1023])


def test_read_shard_accepts_an_empty_shard(tmp_path):
    path = tmp_path / "empty.bin"
    write_shard(path, [])
    assert tg.read_shard(path, vocab_size=16).size == 0


def _shard_bytes(tokens) -> bytes:
    return _header(count=len(tokens)) + np.asarray(tokens, dtype="<u2").tobytes()


BAD_SHARDS = {
    # name: (file contents, fragments the one-line error must contain besides the path)
    "shorter_than_header": (_header(count=3)[:100], ["100 bytes", "header", "fetch it again"]),
    "empty_file": (b"", ["shorter than the 1024-byte header"]),
    "wrong_magic": (_header(magic=12345, count=2) + _shard_bytes([1, 2])[1024:],
                    ["magic 12345", str(tg.SHARD_MAGIC), "regenerate"]),
    "wrong_version": (_header(version=2, count=2) + _shard_bytes([1, 2])[1024:], ["version 2", "regenerate"]),
    "truncated": (_shard_bytes(range(100))[:-10], ["100 tokens", str(1024 + 200 - 10), "truncated", "fetch it again"]),
    "longer_than_header_count": (_shard_bytes(range(10)) + b"\x00\x00", ["header promises 10 tokens"]),
    "token_id_at_vocab_size": (_shard_bytes([5, 1, 512, 3]), ["token id 512", "VOCAB_SIZE=512", "TOKENIZER_PATH"]),
}


@pytest.mark.parametrize("case", BAD_SHARDS)
def test_read_shard_rejects_a_bad_file_naming_it_and_the_fix(tmp_path, case):
    contents, fragments = BAD_SHARDS[case]
    path = tmp_path / f"{case}.bin"
    path.write_bytes(contents)
    with pytest.raises(tg.SetupError) as err:
        tg.read_shard(path, vocab_size=512)
    msg = str(err.value)
    for fragment in [str(path)] + fragments:
        assert fragment in msg, (fragment, msg)


# -- shard_paths and load_val_tokens -------------------------------------------------------------


def test_shard_paths_without_match_raises_setup_error_with_fix(tmp_path):
    pattern = str(tmp_path / "fineweb_val_*.bin")
    with pytest.raises(tg.SetupError) as err:
        tg.shard_paths(pattern)
    msg = str(err.value)
    assert pattern in msg
    assert "DATA_PATH" in msg and "cached_challenge_fineweb.py" in msg


def test_shard_paths_are_sorted_by_name(tmp_path):
    for i in (2, 0, 10, 1):
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", [i])
    (tmp_path / "fineweb_train_000000.bin").write_bytes(b"")  # does not match the val pattern
    paths = tg.shard_paths(str(tmp_path / "fineweb_val_*.bin"))
    assert [p.name for p in paths] == [f"fineweb_val_{i:06d}.bin" for i in (0, 1, 2, 10)]


def test_load_val_tokens_concatenates_shards_in_sorted_order(tmp_path):
    # Written out of order so that creation order differs from name order.
    write_shard(tmp_path / "fineweb_val_000002.bin", [20, 21])
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    write_shard(tmp_path / "fineweb_val_000001.bin", [10])
    tokens = tg.load_val_tokens(str(tmp_path / "fineweb_val_*.bin"), vocab_size=64, limit=0)
    np.testing.assert_array_equal(tokens, [1, 2, 3, 10, 20, 21])


def test_load_val_tokens_limit_keeps_the_first_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    write_shard(tmp_path / "fineweb_val_000001.bin", [4, 5, 6])
    pattern = str(tmp_path / "fineweb_val_*.bin")
    np.testing.assert_array_equal(tg.load_val_tokens(pattern, 64, limit=4), [1, 2, 3, 4])
    np.testing.assert_array_equal(tg.load_val_tokens(pattern, 64, limit=2), [1, 2])
    # A limit beyond the split is no cut at all.
    np.testing.assert_array_equal(tg.load_val_tokens(pattern, 64, limit=100), [1, 2, 3, 4, 5, 6])


def test_load_val_tokens_with_too_few_tokens_errors(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [7])
    pattern = str(tmp_path / "fineweb_val_*.bin")
    with pytest.raises(tg.SetupError, match="too few to score") as err:
        tg.load_val_tokens(pattern, 64, limit=0)
    assert pattern in str(err.value) and "1 tokens" in str(err.value)


def test_load_val_tokens_limit_of_one_errors(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [7, 8, 9])
    with pytest.raises(tg.SetupError, match="too few to score"):
        tg.load_val_tokens(str(tmp_path / "fineweb_val_*.bin"), 64, limit=1)


def test_load_val_tokens_propagates_a_bad_shard(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    write_shard(tmp_path / "fineweb_val_000001.bin", [1, 99])
    with pytest.raises(tg.SetupError, match="fineweb_val_000001.bin: token id 99"):
        tg.load_val_tokens(str(tmp_path / "fineweb_val_*.bin"), 64, limit=0)


def test_load_val_tokens_on_generated_corpus(tiny_corpus):
    from pathlib import Path

    tokens = tg.load_val_tokens(str(Path(tiny_corpus["data_path"]) / "fineweb_val_*.bin"),
                                tiny_corpus["vocab_size"], limit=0)
    assert tokens.size == tiny_corpus["val_tokens"]
    assert int(tokens.max()) < tiny_corpus["vocab_size"]
    assert tokens[0] == 1  # every document starts with BOS


# -- TokenStream ---------------------------------------------------------------------------------


def test_token_stream_reads_across_shards_and_wraps_to_the_first(tmp_path):
    pattern, total = _write_position_shards(tmp_path, [5, 3, 4])
    stream = tg.TokenStream(pattern, BIG_VOCAB)
    np.testing.assert_array_equal(stream.take(4), [0, 1, 2, 3])
    np.testing.assert_array_equal(stream.take(3), [4, 5, 6])  # crosses shard 0 -> 1
    np.testing.assert_array_equal(stream.take(6), [7, 8, 9, 10, 11, 0])  # crosses 1 -> 2 -> back to 0
    np.testing.assert_array_equal(stream.take(2), [1, 2])
    assert total == 12


def test_token_stream_take_longer_than_all_shards_wraps_repeatedly(tmp_path):
    pattern, total = _write_position_shards(tmp_path, [2, 3])
    stream = tg.TokenStream(pattern, BIG_VOCAB)
    out = stream.take(3 * total + 1)
    np.testing.assert_array_equal(out, np.arange(3 * total + 1) % total)


def test_token_stream_single_shard_wraps_to_itself(tmp_path):
    pattern, _ = _write_position_shards(tmp_path, [3])
    stream = tg.TokenStream(pattern, BIG_VOCAB)
    np.testing.assert_array_equal(stream.take(7), [0, 1, 2, 0, 1, 2, 0])


def test_token_stream_skips_an_empty_shard(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [0, 1])
    write_shard(tmp_path / "fineweb_train_000001.bin", [])
    write_shard(tmp_path / "fineweb_train_000002.bin", [2])
    stream = tg.TokenStream(str(tmp_path / "fineweb_train_*.bin"), BIG_VOCAB)
    np.testing.assert_array_equal(stream.take(5), [0, 1, 2, 0, 1])


def test_token_stream_checks_every_shard_it_opens(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2])
    write_shard(tmp_path / "fineweb_train_000001.bin", [3, 500])
    stream = tg.TokenStream(str(tmp_path / "fineweb_train_*.bin"), 64)
    stream.take(2)
    with pytest.raises(tg.SetupError, match="fineweb_train_000001.bin: token id 500"):
        stream.take(1)


# -- DistributedTokenLoader ----------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_loader_ranks_tile_the_stream_without_overlap(tmp_path, world):
    seq_len, local_tokens, steps = 4, 8, 5
    span = local_tokens + 1
    # Shard sizes chosen so batches straddle shard boundaries; the whole run stays within one epoch.
    pattern, total = _write_position_shards(tmp_path, [37, 101, 250, world * span * steps])
    assert world * span * steps <= total
    loaders = [tg.DistributedTokenLoader(pattern, BIG_VOCAB, rank, world, CPU) for rank in range(world)]
    seen = []
    for step in range(steps):
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch(local_tokens, seq_len)
            assert x.shape == (local_tokens // seq_len, seq_len) and y.shape == x.shape
            assert x.dtype == torch.long and y.dtype == torch.long
            flat_x, flat_y = x.reshape(-1), y.reshape(-1)
            # y is x shifted by one: the target of each input is the next stream token.
            torch.testing.assert_close(flat_y[:-1], flat_x[1:], rtol=0, atol=0)
            start = (step * world + rank) * span
            torch.testing.assert_close(flat_x, torch.arange(start, start + local_tokens), rtol=0, atol=0)
            torch.testing.assert_close(flat_y, torch.arange(start + 1, start + span), rtol=0, atol=0)
            seen.append(torch.cat([flat_x, flat_y[-1:]]))
    positions = torch.cat(seen)
    # No token is read twice (across ranks or steps) and together they cover the stream's prefix.
    assert positions.unique().numel() == positions.numel()
    torch.testing.assert_close(positions.sort().values, torch.arange(world * span * steps), rtol=0, atol=0)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_loader_ranks_stay_in_step_across_the_epoch_wrap(tmp_path, world):
    seq_len, local_tokens, steps = 2, 4, 6
    span = local_tokens + 1
    pattern, total = _write_position_shards(tmp_path, [7, 11, 13])  # 31 tokens: several wraps for 8 ranks
    loaders = [tg.DistributedTokenLoader(pattern, BIG_VOCAB, rank, world, CPU) for rank in range(world)]
    for step in range(steps):
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch(local_tokens, seq_len)
            expected = (torch.arange(span) + (step * world + rank) * span) % total
            torch.testing.assert_close(x.reshape(-1), expected[:-1], rtol=0, atol=0)
            torch.testing.assert_close(y.reshape(-1), expected[1:], rtol=0, atol=0)


def test_loader_reset_rewinds_to_the_start(tmp_path):
    pattern, _ = _write_position_shards(tmp_path, [40, 40])
    loader = tg.DistributedTokenLoader(pattern, BIG_VOCAB, rank=1, world=2, device=CPU)
    first = loader.next_batch(6, 3)
    later = [loader.next_batch(6, 3) for _ in range(7)]  # runs past the first shard and wraps
    assert not torch.equal(later[-1][0], first[0])
    loader.reset()
    again = loader.next_batch(6, 3)
    torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
    torch.testing.assert_close(again[1], first[1], rtol=0, atol=0)
    torch.testing.assert_close(loader.next_batch(6, 3)[0], later[0][0], rtol=0, atol=0)


def test_loader_returns_real_token_values_not_positions(tmp_path):
    tokens = np.array([1, 9, 4, 4, 2, 1, 8, 3, 5], dtype=np.uint16)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    loader = tg.DistributedTokenLoader(str(tmp_path / "fineweb_train_*.bin"), 16, rank=0, world=1, device=CPU)
    x, y = loader.next_batch(8, 4)
    torch.testing.assert_close(x, torch.as_tensor(tokens[:-1].astype(np.int64)).view(2, 4), rtol=0, atol=0)
    torch.testing.assert_close(y, torch.as_tensor(tokens[1:].astype(np.int64)).view(2, 4), rtol=0, atol=0)
