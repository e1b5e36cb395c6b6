#!/usr/bin/env python3
"""Data the project makes itself, for smoke runs, tests and speed benchmarks (never a FineWeb score).

  python3 tools/make_data.py text --out smoke/data          # generated prose + its own BPE tokenizer
  python3 tools/make_data.py markov --out /tmp/pg_bench     # large learnable token shards, sp1024 ids
  python3 tools/make_data.py corpus --val V.jsonl.xz --train T.jsonl.xz --tokenizer M.model --out DIR

`text`: documents of invented words (with accented letters, a few non-Latin characters and digits, so
byte-fallback pieces appear), a SentencePiece BPE tokenizer trained on them with the challenge's
special ids (pad 0, bos 1, eos 2, unk 3), and shards in the challenge's format, each document encoded
as BOS + pieces. No text is copied from anywhere: every word is drawn from random syllables.
`markov`: token shards for throughput runs, made fast with numpy: documents of phrases drawn from a
fixed random phrase bank (Zipf-distributed ids), so the loss falls as a model learns the unigram
distribution and then the bank, with some random noise tokens.
`corpus`: shards of real text given as .jsonl(.xz) files of {"text": ...} lines (the proxy benchmark's
text), encoded with any SentencePiece model on every core.
"""
import argparse
import random
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
SYLLABLES = ("ka", "lo", "mi", "ten", "ra", "su", "ve", "dor", "an", "is", "pel", "qu", "tha", "ne", "ro", "by",
             "gé", "fü", "ñá", "ør", "çi", "str", "wen", "ox", "ja", "li", "mun", "ze", "ha", "bri")
RARE_WORDS = ("Ωmega", "東京", "привет", "naïve", "café", "smörgås", "😀", "ß")
PUNCTUATION = (".", ".", ".", "!", "?")


def write_shard(path, tokens) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def generate_text(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of a few paragraphs of invented, Zipf-distributed words."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 1, 2, 2, 3)))) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(lexicon))]
    docs = []
    for _ in range(n_docs):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                words = rng.choices(lexicon, weights, k=rng.randint(4, 16))
                if rng.random() < 0.15:
                    words[rng.randrange(len(words))] = rng.choice(RARE_WORDS)
                if rng.random() < 0.1:
                    words.append(str(rng.randint(0, 2026)))
                sentences.append(" ".join(words).capitalize() + rng.choice(PUNCTUATION))
            paragraphs.append(" ".join(sentences))
        docs.append("\n\n".join(paragraphs))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int, out_prefix: str) -> str:
    """A BPE tokenizer with byte fallback and the challenge's special ids; returns the .model path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=out_prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.995, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        split_digits=True, num_threads=2, minloglevel=2,
    )
    return out_prefix + ".model"


def encode_docs(model_path: str, docs: list[str]) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return np.concatenate([np.asarray([sp.bos_id()] + ids, dtype=np.uint16) for ids in sp.encode(docs)])


def write_split(out: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[Path]:
    paths = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        paths.append(out / f"fineweb_{split}_{i:06d}.bin")
        write_shard(paths[-1], tokens[start : start + shard_tokens])
    return paths


def make_text_shards(out_dir: str, n_docs: int = 2000, val_docs: int = 200, vocab_size: int = 512,
                     shard_tokens: int = 1 << 20, seed: int = 0) -> dict:
    """Generated prose, its tokenizer and challenge-format shards under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = generate_text(n_docs + val_docs, seed)
    model = train_tokenizer(docs[val_docs:], vocab_size, str(out / f"gen_{vocab_size}_bpe"))
    val, train = encode_docs(model, docs[:val_docs]), encode_docs(model, docs[val_docs:])
    write_split(out, "val", val, shard_tokens)
    write_split(out, "train", train, shard_tokens)
    return dict(tokenizer=model, data_path=str(out), vocab_size=vocab_size, train_tokens=len(train), val_tokens=len(val))


def markov_tokens(n: int, rng: np.random.Generator, bank: np.ndarray, vocab_size: int, bos_id: int, doc_len: int) -> np.ndarray:
    phrases = bank[rng.integers(0, len(bank), size=-(-n // bank.shape[1]))].reshape(-1)[:n]
    noise = rng.random(n) < 0.05
    phrases[noise] = rng.integers(4, vocab_size, size=int(noise.sum()), dtype=np.uint16)
    phrases[::doc_len] = bos_id
    return phrases


def make_markov_shards(out_dir: str, train_tokens: int, val_tokens: int, vocab_size: int = 1024,
                       shard_tokens: int = 100_000_000, seed: int = 0, bos_id: int = 1, doc_len: int = 1000) -> dict:
    """Learnable synthetic shards (a random bank of 8-token phrases of Zipf-distributed ids, 5% uniform
    noise, BOS every doc_len tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    zipf = 1 / np.arange(1, vocab_size - 3)  # a skewed unigram distribution, as in real text
    bank = rng.choice(np.arange(4, vocab_size, dtype=np.uint16), size=(4096, 8), p=zipf / zipf.sum())
    write_split(out, "val", markov_tokens(val_tokens, rng, bank, vocab_size, bos_id, doc_len), shard_tokens)
    for i, start in enumerate(range(0, train_tokens, shard_tokens)):
        n = min(shard_tokens, train_tokens - start)
        write_shard(out / f"fineweb_train_{i:06d}.bin", markov_tokens(n, rng, bank, vocab_size, bos_id, doc_len))
    return dict(data_path=str(out), vocab_size=vocab_size, train_tokens=train_tokens, val_tokens=val_tokens)


def read_jsonl_docs(path: str) -> list[str]:
    """The "text" of each line of a .jsonl or .jsonl.xz file, skipping blank documents."""
    import json
    import lzma
    with (lzma.open if path.endswith(".xz") else open)(path, "rt", encoding="utf-8") as f:
        docs = (json.loads(line).get("text", "") for line in f if line.strip())
        return [d for d in docs if d.strip()]


def _encode_slice(job: tuple[str, list[str]]) -> np.ndarray:
    return encode_docs(*job)


def make_corpus_shards(val_file: str, train_file: str, tokenizer: str, out_dir: str, workers: int = 0,
                       shard_tokens: int = 100_000_000) -> dict:
    """Challenge-format shards of a real-text corpus (the proxy's .jsonl.xz files): the val split from
    val_file, the train split from train_file, each document as BOS + pieces, in file order."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    info = dict(data_path=str(out), tokenizer=tokenizer)
    with ProcessPoolExecutor(workers) as pool:
        for split, path in (("val", val_file), ("train", train_file)):
            docs = read_jsonl_docs(path)
            if not docs:
                raise SystemExit(f"error: {path} holds no documents: the {split} split would be empty")
            step = -(-len(docs) // (4 * workers))
            parts = pool.map(_encode_slice, [(tokenizer, docs[i : i + step]) for i in range(0, len(docs), step)])
            tokens = np.concatenate(list(parts))
            write_split(out, split, tokens, shard_tokens)
            info[f"{split}_docs"], info[f"{split}_tokens"] = len(docs), len(tokens)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("text")
    t.add_argument("--out", required=True)
    t.add_argument("--docs", type=int, default=2000)
    t.add_argument("--val-docs", type=int, default=200)
    t.add_argument("--vocab", type=int, default=512)
    t.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("markov")
    m.add_argument("--out", required=True)
    m.add_argument("--train-tokens", type=int, default=200_000_000)
    m.add_argument("--val-tokens", type=int, default=1_000_000)
    m.add_argument("--vocab", type=int, default=1024)
    m.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("corpus")
    c.add_argument("--val", required=True, help="val.jsonl.xz: the validation split")
    c.add_argument("--train", required=True, help="train.jsonl.xz: the training split")
    c.add_argument("--tokenizer", required=True)
    c.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.mode == "corpus":
        info = make_corpus_shards(a.val, a.train, a.tokenizer, a.out)
    elif a.mode == "text":
        info = make_text_shards(a.out, a.docs, a.val_docs, a.vocab, seed=a.seed)
    else:
        info = make_markov_shards(a.out, a.train_tokens, a.val_tokens, a.vocab, seed=a.seed)
    print(" ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
