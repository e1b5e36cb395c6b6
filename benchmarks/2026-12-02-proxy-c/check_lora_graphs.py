"""lora_graphs.py's padded steps (eagerly, as on the CPU) score what train_gpt.lora_sums scores, on the tests'
tiny looped model with a large adapter LR. Run from the repository root:
  python3 -m pytest -q benchmarks/2026-12-02-proxy-c/check_lora_graphs.py
Breaking the head's positions (off by one), the Adam bias correction, the reset of adapters for each batch
or their copy between row buckets each made it fail (checked 2026-12-02).
Since folded into train_gpt.py as LoraScorer; this file runs against the train_gpt.py of 08ebb01 (which
still has lora_sums): `git show 08ebb01:train_gpt.py > train_gpt.py` first. Its GPU runs are in
benchmarks/2026-12-02-proxy-d/."""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests import their conftest by name
import train_gpt as tg  # noqa: E402
from conftest import one_intra_op_thread, tiny_corpus, tiny_sp  # noqa: E402,F401
from test_evaluation import eval_setup, lora_args, lora_setup  # noqa: E402,F401

spec = importlib.util.spec_from_file_location("lora_graphs", Path(__file__).with_name("lora_graphs.py"))
lora_graphs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lora_graphs)


@pytest.mark.parametrize("seq_len,chunk,batch_seqs", [(16, 5, 3), (16, 5, 1000), (200, 7, 3), (16, 16, 2), (32, 5, 1)])
def test_padded_steps_score_as_lora_sums(lora_setup, seq_len, chunk, batch_seqs):
    model, tokens, luts = lora_setup
    args = lora_args(ttt_lora_chunk=chunk, eval_batch_seqs=batch_seqs)
    spans = sorted(tg.doc_spans(tokens.numpy(), model.bos_id), key=lambda s: s[0] - s[1])
    want, _, _ = tg.lora_sums(model, tokens, spans, seq_len, luts, args)
    runner = lora_graphs.PaddedLora(model, tokens.device, args, graphs=False)
    got, _, _ = runner(model, tokens, spans, seq_len, luts, args)
    assert runner.stats["padded_token_passes"] >= runner.stats["token_passes"] > 0
    assert got[1] == want[1] and got[2] == want[2]  # the same targets and bytes
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)


def test_padded_steps_serve_the_chunked_sgd_as_lora_sums_does(lora_setup, monkeypatch):
    """docs+lora+ttt: one runner for all of evaluate_ttt's calls, the base model trained between them."""
    model, tokens, luts = lora_setup
    args = lora_args(ttt_epochs=2)
    scores = []
    for patched in (False, True):
        twin = copy.deepcopy(model)
        if patched:
            monkeypatch.setattr(tg, "lora_sums", lora_graphs.PaddedLora(twin, tokens.device, args, graphs=False))
        scores.append(tg.evaluate_ttt(twin, list(twin.parameters()), tokens, 16, 5, luts, args, eager=twin)[:2])
    assert scores[1] == pytest.approx(scores[0], rel=1e-6)
