"""Every setting checked: a bad value of any setting stops the run with one `error:` line that starts with
its name, exit code 2 and no traceback, within 30 s; a value that only the settings can rule out stops it
before anything is loaded or written.

BAD_VALUES holds one bad example per setting the script reads, and the test enumerates the settings from
the script's registry: a setting added without a bad example here fails
test_every_setting_has_a_bad_example (and one added without a range fails at env(), which requires one).
Most cases run in-process (train_gpt.run(), as `python3 train_gpt.py` does); a few run the script as a
subprocess to prove the real exit path."""
import re
import subprocess
import sys
import time

import pytest

import train_gpt as tg
from test_hyperparameters import SETTING_NAMES  # the settings the script reads, from its own registry
from test_training import SCRIPT, assert_setup_error, clean_env, tiny_config

BAD_VALUES = {
    "DATA_PATH": "data\nfolder",
    "TOKENIZER_PATH": "",
    "RUN_ID": "",
    "OUT_DIR": "",
    "SEED": "-1",
    "VOCAB_SIZE": "0",
    "NUM_LAYERS": "0",
    "MODEL_DIM": "-4",
    "NUM_HEADS": "0",
    "NUM_KV_HEADS": "0",
    "MLP_MULT": "0",
    "ROPE_BASE": "1",
    "QK_GAIN_INIT": "-1.5",
    "LOGIT_SOFTCAP": "0",
    "BIGRAM_VOCAB_SIZE": "1",
    "BIGRAM_DIM": "0",
    "TIED_EMBED_INIT_STD": "-0.005",
    "TRAIN_SEQ_LEN": "0",
    "TRAIN_BATCH_TOKENS": "-512",
    "ITERATIONS": "0",
    "WARMUP_STEPS": "-1",
    "LR_WARMUP_STEPS": "-1",
    "WARMDOWN_ITERS": "-1",
    "MAX_WALLCLOCK_SECONDS": "-5",
    "MATRIX_LR": "-0.02",
    "SCALAR_LR": "inf",
    "TIED_EMBED_LR": "nan",
    "MUON_MOMENTUM": "1",
    "MUON_MOMENTUM_WARMUP_START": "-0.1",
    "MUON_MOMENTUM_WARMUP_STEPS": "-1",
    "MUON_BACKEND_STEPS": "0",
    "BETA1": "1.0",
    "BETA2": "1.5",
    "ADAM_EPS": "0",
    "WEIGHT_DECAY": "-0.04",
    "GRAD_CLIP_NORM": "-1",
    "EMA_DECAY": "1.5",
    "SWA_START_FRAC": "1.5",
    "SWA_EVERY": "-1",
    "VAL_LOSS_EVERY": "-1",
    "VAL_TOKENS_LIMIT": "-5",
    "TRAIN_LOG_EVERY": "-1",
    "EVAL_SEQ_LEN": "99999",
    "EVAL_STRIDE": "-1",
    "EVAL_BATCH_SEQS": "0",
    "QUANT_BITS": "mlp:9",
    "QUANT_CLIP": "mlp:-3",
    "QUANT_ALLOC": "1.5",
    "GPTQ_CALIB_SEQS": "-1",
    "GPTQ_RESERVE_SECONDS": "-1",
    "GPTQ_DAMP": "0",
    "GPTQ_BLOCK": "0",
    "GPTQ_ACT_ORDER": "2",
    "SMEAR_GATE": "2",
    "ROPE_DIMS": "-2",
    "XSA_LAST_N": "-1",
    "LN_SCALE": "2",
    "PARALLEL_LAST_N": "-1",
    "MLP_NEG_SLOPE": "1.5",
    "SKIP_GATES": "2",
    "LOOP_FIRST": "-1",
    "LOOP_LAST": "-1",
    "LOOP_REPEATS": "-1",
    "LOOP_START_FRAC": "1.5",
    "GRAD_ACCUM_STEPS": "-1",
    "WARMDOWN_FRAC": "1.5",
    "LR_FLOOR": "-0.1",
    "MUON_ROW_NORM": "2",
    "TTT_EPOCHS": "-1",
    "TTT_CHUNK_TOKENS": "0",
    "TTT_PHASES": "-1",
    "TTT_LR": "-0.1",
    "TTT_MOMENTUM": "1",
    "TTT_GRAD_CLIP": "-1",
    "TTT_BATCH_SEQS": "0",
    "TTT_FREEZE_BLOCKS": "-1",
    "TTT_LORA_RANK": "-1",
    "TTT_LORA_LR": "-0.001",
    "TTT_LORA_CHUNK": "0",
    "FP16_KEEP": "attn\nmlp",
    "FP16_MAX_NUMEL": "-1",
    "COMPRESSOR": "gzip",
    "ALLOW_OVER_CAP": "2",
    "COMPILE": "2",
    "NAME": "two\nlines",
    "AUTHOR": "tab\there",
    "GITHUB_ID": "x\nfinal_score val_bpb:0.1",
    "BLURB": "x\nfinal_score val_bpb:0.1",
}

# Values that only other settings (at the tiny configuration: MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1,
# TRAIN_SEQ_LEN=64) rule out: (settings, the setting the error line must name, a fragment of it).
COMBINATIONS = {
    "head_width_not_whole": (dict(MODEL_DIM=33), "MODEL_DIM", "NUM_HEADS=2"),
    "head_width_odd": (dict(MODEL_DIM=34), "MODEL_DIM", "even"),
    "heads_not_a_multiple_of_kv_heads": (dict(NUM_HEADS=4, NUM_KV_HEADS=3), "NUM_HEADS", "NUM_KV_HEADS=3"),
    "mlp_without_hidden_units": (dict(MLP_MULT=0.01), "MLP_MULT", "MODEL_DIM=32"),
    "batch_not_whole_sequences": (dict(TRAIN_BATCH_TOKENS=1000), "TRAIN_BATCH_TOKENS", "multiple of 512"),
    "eval_window_over_4x_train": (dict(EVAL_SEQ_LEN=257), "EVAL_SEQ_LEN", "at most 256"),
    "stride_over_eval_window": (dict(EVAL_STRIDE=65), "EVAL_STRIDE", "1..64"),
    "stride_over_set_eval_window": (dict(EVAL_SEQ_LEN=32, EVAL_STRIDE=33), "EVAL_STRIDE", "1..32"),
    "batch_not_whole_sequences_per_micro_step": (dict(GRAD_ACCUM_STEPS=16), "TRAIN_BATCH_TOKENS", "1 x 16"),
    "loop_past_the_last_block": (dict(LOOP_REPEATS=1, LOOP_FIRST=1, LOOP_LAST=2), "LOOP_FIRST", "NUM_LAYERS=2"),
    "loop_first_after_last": (dict(LOOP_REPEATS=1, LOOP_FIRST=1, LOOP_LAST=0), "LOOP_FIRST", "LOOP_FIRST <= LOOP_LAST"),
    "ttt_freezing_more_than_layers": (dict(TTT_FREEZE_BLOCKS=3), "TTT_FREEZE_BLOCKS", "NUM_LAYERS=2"),
    "lora_chunk_over_eval_window": (dict(TTT_LORA_RANK=2, TTT_LORA_CHUNK=65), "TTT_LORA_CHUNK", "1..64"),
    "rope_dims_odd": (dict(ROPE_DIMS=3), "ROPE_DIMS", "even"),
    "rope_dims_over_head_width": (dict(ROPE_DIMS=18), "ROPE_DIMS", "head width 16"),
    "gptq_reserve_over_the_cap": (dict(MAX_WALLCLOCK_SECONDS=5, GPTQ_RESERVE_SECONDS=5), "GPTQ_RESERVE_SECONDS", "below"),
    "quant_alloc_without_calibration": (dict(QUANT_ALLOC=0.5, GPTQ_CALIB_SEQS=0), "QUANT_ALLOC", "GPTQ_CALIB_SEQS"),
    "weight_decay_flips_matrices": (dict(WEIGHT_DECAY=50), "WEIGHT_DECAY", "MATRIX_LR=0.02"),
    "weight_decay_flips_embedding": (dict(WEIGHT_DECAY=40, TIED_EMBED_LR=0.05), "WEIGHT_DECAY", "TIED_EMBED_LR=0.05"),
}

# Values that only the data rules out: caught once the validation split is read, so the run has a log
# by then, which must end saying that it did not finish.
AGAINST_DATA = {
    "eval_window_over_val_split": (dict(EVAL_SEQ_LEN=200, VAL_TOKENS_LIMIT=150), "EVAL_SEQ_LEN", "at most 149"),
    "train_window_over_val_split": (dict(VAL_TOKENS_LIMIT=50), "TRAIN_SEQ_LEN", "VAL_TOKENS_LIMIT=50"),
}


def escaped(raw: str) -> str:
    """The value as the one-line error shows it."""
    return raw.encode("unicode_escape").decode()


def the_error_line(code: int, stderr: str, name: str) -> str:
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.match(rf"error: {name}\b", lines[0]), (name, lines[0])  # about this setting first, not another's
    return lines[0]


def test_every_setting_has_a_bad_example():
    missing = sorted(set(SETTING_NAMES) - set(BAD_VALUES))
    assert not missing, f"add a bad example for {missing} to BAD_VALUES (and a range to its env() call)"
    assert not set(BAD_VALUES) - set(SETTING_NAMES), "BAD_VALUES names a setting the script no longer reads"


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_value_stops_the_run_before_anything_is_loaded(run_in_process, tiny_corpus, tmp_path, name):
    raw = BAD_VALUES[name]
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code, stderr = run_in_process(**tiny_config(tiny_corpus, out, **{name: raw}))
    line = the_error_line(code, stderr, name)
    assert escaped(raw) in line, line
    assert re.search(r"\b(use|expected)\b", line), line  # it says what is allowed
    assert not out.exists()  # no log, no files: the run never started
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("settings, name, fragment", COMBINATIONS.values(), ids=list(COMBINATIONS))
def test_bad_combination_stops_the_run_before_anything_is_loaded(run_in_process, tiny_corpus, tmp_path, settings,
                                                                 name, fragment):
    out = tmp_path / "out"
    code, stderr = run_in_process(**tiny_config(tiny_corpus, out, **settings))
    assert fragment in the_error_line(code, stderr, name)
    assert not out.exists()


@pytest.mark.parametrize("settings, name, fragment", AGAINST_DATA.values(), ids=list(AGAINST_DATA))
def test_value_the_data_rules_out_stops_the_run_with_an_unfinished_log(run_in_process, tiny_corpus, tmp_path,
                                                                       settings, name, fragment):
    out = tmp_path / "out"
    code, stderr = run_in_process(**tiny_config(tiny_corpus, out, **settings))
    line = the_error_line(code, stderr, name)
    assert fragment in line
    log = (out / "train.log").read_text().splitlines()
    assert log[-1] == "run did not finish: " + line
    assert not any(entry.startswith("step:") for entry in log)
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]


def test_out_dir_that_cannot_be_written_is_one_error_line(run_in_process, tiny_corpus, tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("")
    code, stderr = run_in_process(**tiny_config(tiny_corpus, taken / "out"))
    assert "cannot be written" in the_error_line(code, stderr, "OUT_DIR")


@pytest.mark.parametrize("good", [dict(NUM_LAYERS=1), dict(EMA_DECAY=0.999), dict(BIGRAM_VOCAB_SIZE=0),
                                  dict(BIGRAM_VOCAB_SIZE=2), dict(EVAL_SEQ_LEN=256), dict(EVAL_STRIDE=64),
                                  dict(MAX_WALLCLOCK_SECONDS=0), dict(SWA_START_FRAC=1), dict(SEED=2**32 - 1),
                                  dict(WEIGHT_DECAY=33), dict(NAME="Ünïcode name — fine"), dict(FP16_KEEP="")],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_values_at_the_edge_of_their_range_are_accepted(monkeypatch, tiny_corpus, tmp_path, good):
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in tiny_config(tiny_corpus, tmp_path, **good).items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(tg, "_SETTINGS", {})
    tg.Hyperparameters()


# The real exit path: a fresh interpreter, its stderr and exit code. Its time limit is the in-process one's
# plus room for importing torch, which took 10-20 s on this 2-core machine when shared with other jobs.
@pytest.mark.parametrize("settings, name", [(dict(NUM_LAYERS=0), "NUM_LAYERS"),
                                            (dict(EVAL_SEQ_LEN=200, VAL_TOKENS_LIMIT=150), "EVAL_SEQ_LEN")],
                         ids=["NUM_LAYERS=0", "EVAL_SEQ_LEN_over_val_split"])
def test_bad_value_in_a_real_run_exits_2_with_one_error_line(tiny_corpus, tmp_path, settings, name):
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=clean_env(**tiny_config(tiny_corpus, tmp_path / "out", **settings)))
    assert_setup_error(proc, f"{name}=")
    assert proc.stdout == "" or "run did not finish: error: " in proc.stdout.strip().splitlines()[-1]
