"""tools/make_data.py: the shard format, the generated prose, its tokenizer and shards, the markov shards."""
from pathlib import Path

import numpy as np
import pytest

import make_data as md

MAGIC, VERSION = 20240520, 1


def read_shard(path):
    """(header, tokens) of a challenge-format shard, checking its size against the header's count."""
    raw = np.fromfile(path, dtype=np.uint8)
    header = raw[: 256 * 4].view("<i4")
    tokens = raw[256 * 4 :].view("<u2")
    assert header[0] == MAGIC and header[1] == VERSION
    assert header[2] == len(tokens)
    return header, tokens


def shards(data_path, split):
    return sorted(Path(data_path).glob(f"fineweb_{split}_*.bin"))


def test_write_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 2, 255, 256, 1023, 40000, 65535], dtype=np.int64)
    path = tmp_path / "shard.bin"
    md.write_shard(path, tokens)
    assert path.stat().st_size == 256 * 4 + 2 * len(tokens)
    header, read = read_shard(path)
    assert header[2] == 8 and not header[3:].any()
    np.testing.assert_array_equal(read, tokens)
    raw = path.read_bytes()
    assert int.from_bytes(raw[:4], "little") == MAGIC
    assert raw[256 * 4 + 2 * 4 : 256 * 4 + 2 * 5] == (256).to_bytes(2, "little")  # little-endian uint16


def test_generate_text_is_seeded():
    a, b, c = md.generate_text(20, seed=1), md.generate_text(20, seed=1), md.generate_text(20, seed=2)
    assert a == b and a != c
    assert len(a) == 20 and all(isinstance(d, str) and d for d in a)
    text = "".join(md.generate_text(200, seed=0))
    assert any(ord(ch) > 127 for ch in text)
    assert any(ord(ch) > 0xFFFF for ch in text) or any("\u0400" <= ch <= "\u9fff" for ch in text)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    import sentencepiece as spm

    info = md.make_text_shards(str(tmp_path_factory.mktemp("text")), n_docs=100, val_docs=10, vocab_size=512,
                               shard_tokens=4000, seed=0)
    return info, spm.SentencePieceProcessor(model_file=info["tokenizer"])


def test_text_tokenizer_special_ids_and_byte_fallback(text_data):
    info, sp = text_data
    assert sp.vocab_size() == info["vocab_size"] == 512
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    byte_pieces = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_pieces) == 256
    assert sp.id_to_piece(byte_pieces[0]) == "<0x00>"
    ids = sp.encode("\u2603")  # a snowman, never in the generated text: spelled in bytes
    assert set(ids) <= set(byte_pieces) | {sp.piece_to_id("▁")}
    assert sp.decode(ids) == "\u2603"


def test_text_shards(text_data):
    info, sp = text_data
    val = np.concatenate([read_shard(p)[1] for p in shards(info["data_path"], "val")])
    train_paths = shards(info["data_path"], "train")
    train = np.concatenate([read_shard(p)[1] for p in train_paths])
    assert len(val) == info["val_tokens"] and len(train) == info["train_tokens"]
    assert len(train_paths) == -(-len(train) // 4000) > 1
    assert all(len(read_shard(p)[1]) == 4000 for p in train_paths[:-1])
    assert val[0] == sp.bos_id() and train[0] == sp.bos_id()
    assert (val == sp.bos_id()).sum() == 10 and (train == sp.bos_id()).sum() == 100
    assert val.max() < 512 and train.max() < 512
    assert not np.isin(val, [0, 2, 3]).any() and not np.isin(train, [0, 2, 3]).any()
    # val holds the first val_docs generated documents, in order (SentencePiece folds "\n\n" into a space)
    val_docs = [sp.decode(doc[1:].tolist()) for doc in np.split(val, np.flatnonzero(val == sp.bos_id())[1:])]
    assert val_docs == [" ".join(doc.split()) for doc in md.generate_text(110, seed=0)[:10]]


def test_markov_shards(tmp_path):
    kwargs = dict(train_tokens=25_000, val_tokens=7_000, vocab_size=300, shard_tokens=10_000, seed=3, doc_len=500)
    info = md.make_markov_shards(str(tmp_path / "a"), **kwargs)
    assert info["train_tokens"] == 25_000 and info["val_tokens"] == 7_000
    train_paths, val_paths = shards(info["data_path"], "train"), shards(info["data_path"], "val")
    assert [len(read_shard(p)[1]) for p in train_paths] == [10_000, 10_000, 5_000]
    assert [len(read_shard(p)[1]) for p in val_paths] == [7_000]
    for path in train_paths + val_paths:
        tokens = read_shard(path)[1]
        assert tokens.max() < 300
        np.testing.assert_array_equal(np.flatnonzero(tokens == 1), np.arange(0, len(tokens), 500))
        assert not np.isin(tokens, [0, 2, 3]).any()
    again = md.make_markov_shards(str(tmp_path / "b"), **kwargs)
    other = md.make_markov_shards(str(tmp_path / "c"), **{**kwargs, "seed": 4})
    for a, b, c in zip(train_paths + val_paths, shards(again["data_path"], "train") + shards(again["data_path"], "val"),
                       shards(other["data_path"], "train") + shards(other["data_path"], "val")):
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()


def test_corpus_shards_encode_each_document_as_bos_and_pieces_in_order(tmp_path, tiny_corpus, tiny_sp):
    import json
    import lzma
    docs = ["Kalo miten rasu.", "", "Ve dor an is pel.", "Tha ne ro by."]
    for name, part in (("val.jsonl.xz", docs[:2]), ("train.jsonl.xz", docs[2:])):
        with lzma.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    info = md.make_corpus_shards(str(tmp_path / "val.jsonl.xz"), str(tmp_path / "train.jsonl.xz"),
                                 tiny_corpus["tokenizer"], str(tmp_path / "out"), workers=2)
    assert info["val_docs"] == 1 and info["train_docs"] == 2  # the blank document is skipped
    for split, part in (("val", docs[:1]), ("train", docs[2:])):
        (path,) = shards(tmp_path / "out", split)
        want = [t for d in part for t in [tiny_sp.bos_id()] + tiny_sp.encode(d)]
        assert read_shard(path)[1].tolist() == want


@pytest.mark.parametrize("empty", ["val", "train"])
def test_corpus_shards_of_a_split_without_documents_stop_with_an_error_line(tmp_path, tiny_corpus, empty):
    import json
    import lzma
    for split in ("val", "train"):
        with lzma.open(tmp_path / f"{split}.jsonl.xz", "wt", encoding="utf-8") as f:
            f.write("" if split == empty else json.dumps({"text": "Kalo miten rasu."}) + "\n")
    with pytest.raises(SystemExit, match=rf"^error: .*{empty}\.jsonl\.xz holds no documents: the {empty} split would be empty"):
        md.make_corpus_shards(str(tmp_path / "val.jsonl.xz"), str(tmp_path / "train.jsonl.xz"), tiny_corpus["tokenizer"],
                              str(tmp_path / "out"), workers=1)
