"""Shared fixtures: the script imported as a module, a tiny generated corpus with its tokenizer, and the
script run in-process."""
import re
import signal
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


class TooSlow(Exception):
    pass


def _too_slow(signum, frame):
    raise TooSlow("train_gpt.run() took over 30 s")


@pytest.fixture
def run_in_process(monkeypatch, capsys, tmp_path):
    """train_gpt.run() in this process: what `python3 train_gpt.py` does from tmp_path with exactly the given
    settings (none inherited from the shell), stopped by SIGALRM after 30 s so that a hang fails the test.
    Returns (exit code, stderr). Saves the ~5 s (far more on a busy machine) of a fresh interpreter
    importing torch."""
    import train_gpt as tg

    names = set(re.findall(r'\benv\("([A-Z0-9_]+)"', (ROOT / "train_gpt.py").read_text()))

    def run(**settings) -> tuple[int, str]:
        for name in names | {"WORLD_SIZE", "RANK", "LOCAL_RANK"}:
            monkeypatch.delenv(name, raising=False)
        for name, value in settings.items():
            monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(tg, "_SETTINGS", {})
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        previous = signal.signal(signal.SIGALRM, _too_slow)
        signal.alarm(30)
        try:
            code = tg.run()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        return code, capsys.readouterr().err

    return run
