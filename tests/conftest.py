"""Shared fixtures: the script imported as a module, and a tiny generated corpus with its tokenizer."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "fineweb_1024_bpe.model"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Generated prose, a 512-piece BPE tokenizer with byte fallback, and challenge-format shards."""
    from make_data import make_text_shards

    return make_text_shards(str(tmp_path_factory.mktemp("corpus")), n_docs=300, val_docs=40, vocab_size=512,
                            shard_tokens=20_000)


@pytest.fixture(scope="session")
def tiny_sp(tiny_corpus):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tiny_corpus["tokenizer"])


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """The test models are tiny: intra-op threads only contend (tens of times slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
