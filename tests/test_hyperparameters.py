"""Settings from the environment: typing, ranges, bad values, defaults and misspelt-setting warnings
(tests/test_bad_settings.py runs the script with a bad value of each setting)."""
import math

import pytest

import train_gpt as tg


def _setting_names() -> list[str]:
    saved = dict(tg._SETTINGS)
    tg._SETTINGS.clear()
    try:
        tg.Hyperparameters()
        return sorted(tg._SETTINGS)
    finally:
        tg._SETTINGS.clear()
        tg._SETTINGS.update(saved)


SETTING_NAMES = _setting_names()
ANY = tg.Range("anything", lambda value: True)  # for the parsing tests


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch):
    """A fresh settings registry and no setting inherited from the shell that runs the tests."""
    monkeypatch.setattr(tg, "_SETTINGS", {})
    for name in SETTING_NAMES + ["PG_TEST_INT", "PG_TEST_FLOAT", "PG_TEST_STR"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- env() ---------------------------------------------------------------------------------------


def test_env_unset_returns_default_and_records_it():
    assert tg.env("PG_TEST_INT", 7, ANY) == 7
    assert tg._SETTINGS["PG_TEST_INT"] == 7


@pytest.mark.parametrize("raw, expected", [("12", 12), ("-3", -3), ("1e3", 1000), ("4.0", 4), (" 5 ", 5)])
def test_env_int_setting_is_an_int(monkeypatch, raw, expected):
    monkeypatch.setenv("PG_TEST_INT", raw)
    value = tg.env("PG_TEST_INT", 1, ANY)
    assert value == expected and type(value) is int
    assert tg._SETTINGS["PG_TEST_INT"] == expected


@pytest.mark.parametrize("raw, expected", [("0.25", 0.25), ("3", 3.0), ("1e-8", 1e-8), ("-2.5", -2.5)])
def test_env_float_setting_is_a_float(monkeypatch, raw, expected):
    monkeypatch.setenv("PG_TEST_FLOAT", raw)
    value = tg.env("PG_TEST_FLOAT", 0.5, ANY)
    assert value == pytest.approx(expected) and type(value) is float


@pytest.mark.parametrize("raw", ["abc", "12", "", "mlp:4,attn:6"])
def test_env_str_setting_is_the_raw_string(monkeypatch, raw):
    monkeypatch.setenv("PG_TEST_STR", raw)
    value = tg.env("PG_TEST_STR", "default", ANY)
    assert value == raw and type(value) is str


@pytest.mark.parametrize("raw", ["abc", "", "12abc", "inf", "nan", "0x10"])
def test_env_non_number_for_int_raises_setup_error_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("PG_TEST_INT", raw)
    with pytest.raises(tg.SetupError) as err:
        tg.env("PG_TEST_INT", 1, ANY)
    assert "PG_TEST_INT" in str(err.value)
    assert "not a valid int" in str(err.value)
    assert "PG_TEST_INT" not in tg._SETTINGS


@pytest.mark.parametrize("raw", ["1.5", "0.1", "2e-1"])
def test_env_fraction_for_int_raises_setup_error_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("PG_TEST_INT", raw)
    with pytest.raises(tg.SetupError) as err:
        tg.env("PG_TEST_INT", 1, ANY)
    assert "PG_TEST_INT" in str(err.value) and repr(raw) in str(err.value)
    assert "whole number" in str(err.value)


def test_env_non_number_for_float_raises_setup_error(monkeypatch):
    monkeypatch.setenv("PG_TEST_FLOAT", "fast")
    with pytest.raises(tg.SetupError, match=r"PG_TEST_FLOAT='fast' is not a valid float"):
        tg.env("PG_TEST_FLOAT", 0.5, ANY)


def test_hyperparameters_bad_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "abc")
    with pytest.raises(tg.SetupError, match="NUM_LAYERS"):
        tg.Hyperparameters()
    monkeypatch.setenv("NUM_LAYERS", "1.5")
    with pytest.raises(tg.SetupError, match="NUM_LAYERS='1.5' must be a whole number"):
        tg.Hyperparameters()


# -- ranges --------------------------------------------------------------------------------------


def test_env_value_outside_its_range_names_the_setting_the_value_and_the_range(monkeypatch):
    monkeypatch.setenv("PG_TEST_INT", "0")
    with pytest.raises(tg.SetupError, match=r"^PG_TEST_INT=0 is not allowed: use a value >= 1$"):
        tg.env("PG_TEST_INT", 5, tg.at_least(1))
    assert "PG_TEST_INT" not in tg._SETTINGS


def test_env_checks_the_default_too():
    with pytest.raises(tg.SetupError, match="PG_TEST_INT=0 is not allowed"):
        tg.env("PG_TEST_INT", 0, tg.at_least(1))


def test_env_shows_a_text_value_on_one_line(monkeypatch):
    monkeypatch.setenv("PG_TEST_STR", "a\nfinal_score")
    with pytest.raises(tg.SetupError) as err:
        tg.env("PG_TEST_STR", "", tg.TEXT)
    assert str(err.value) == "PG_TEST_STR='a\\nfinal_score' is not allowed: use one line of printable text"


@pytest.mark.parametrize("allowed, inside, outside", [
    (tg.at_least(0), [0, 0.0, 5, 10**400], [-1, -1e-9, math.inf, math.nan]),
    (tg.above(0), [1e-12, 3], [0, -1, math.inf, math.nan]),
    (tg.between(0, 1), [0, 0.5, 1], [-0.1, 1.01, math.nan]),
    (tg.DECAY, [0, 0.999], [1, 1.5, -0.1, math.nan]),
    (tg.off_or(tg.at_least(2)), [0, 2, 3], [1, -2]),
    (tg.one_of(0, 1), [0, 1], [2, -1]),
    (tg.TEXT, ["", "a b", "Ünïcode — fine"], ["a\nb", "a\tb", "\x1b[31m"]),
    (tg.NONEMPTY_TEXT, ["x"], ["", "a\rb"]),
], ids=["at_least", "above", "between", "DECAY", "off_or", "one_of", "TEXT", "NONEMPTY_TEXT"])
def test_range_admits_what_its_words_say(allowed, inside, outside):
    assert [allowed.test(v) for v in inside] == [True] * len(inside)
    assert [allowed.test(v) for v in outside] == [False] * len(outside)


# -- Hyperparameters -----------------------------------------------------------------------------


DEFAULTS = [
    ("num_layers", 11),
    ("model_dim", 512),
    ("num_heads", 8),
    ("num_kv_heads", 4),
    ("mlp_mult", 4.0),
    ("train_seq_len", 2048),
    ("train_batch_tokens", 786_432),
    ("bigram_vocab_size", 0),
    ("bigram_dim", 128),
    ("eval_stride", 64),
    ("max_wallclock_seconds", 600.0),
    ("logit_softcap", 30.0),
    ("data_path", "./data/datasets/fineweb10B_sp8192"),
    ("tokenizer_path", "./data/tokenizers/fineweb_8192_bpe.model"),
    ("vocab_size", 8192),
    ("xsa_last_n", 11),
    ("rope_dims", 16),
    ("loop_repeats", 0),
    ("gptq_calib_seqs", 64),
]


@pytest.mark.parametrize("attr, expected", DEFAULTS)
def test_hyperparameters_defaults(attr, expected):
    args = tg.Hyperparameters()
    value = getattr(args, attr)
    assert value == expected
    assert type(value) is type(expected)


def test_hyperparameters_default_batch_splits_into_eight_whole_sequences():
    args = tg.Hyperparameters()
    assert args.train_batch_tokens % (8 * args.train_seq_len) == 0
    assert args.model_dim % args.num_heads == 0 and args.num_heads % args.num_kv_heads == 0


def test_hyperparameters_pick_up_environment(monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "4")
    monkeypatch.setenv("LOOP_LAST", "3")
    monkeypatch.setenv("MODEL_DIM", "256")
    monkeypatch.setenv("MLP_MULT", "2.5")
    monkeypatch.setenv("MAX_WALLCLOCK_SECONDS", "0")
    monkeypatch.setenv("DATA_PATH", "/tmp/pg_data")
    monkeypatch.setenv("BIGRAM_VOCAB_SIZE", "0")
    monkeypatch.setenv("RUN_ID", "abc123")
    args = tg.Hyperparameters()
    assert args.num_layers == 4 and type(args.num_layers) is int
    assert args.model_dim == 256
    assert args.mlp_mult == 2.5 and type(args.mlp_mult) is float
    assert args.max_wallclock_seconds == 0.0 and type(args.max_wallclock_seconds) is float
    assert args.data_path == "/tmp/pg_data"
    assert args.bigram_vocab_size == 0
    assert args.run_id == "abc123"
    # Settings not in the environment keep their defaults.
    assert args.num_heads == 8 and args.train_seq_len == 2048
    # Every value read is remembered for the log.
    assert tg._SETTINGS["NUM_LAYERS"] == 4 and tg._SETTINGS["DATA_PATH"] == "/tmp/pg_data"
    assert tg._SETTINGS["NUM_HEADS"] == 8


def test_hyperparameters_record_every_setting():
    args = tg.Hyperparameters()
    assert set(tg._SETTINGS) == set(SETTING_NAMES)
    assert len(SETTING_NAMES) > 40
    assert tg._SETTINGS["MODEL_DIM"] == args.model_dim


# -- unknown_settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("typo, meant", [("NUM_LAYER", "NUM_LAYERS"), ("VOCAB_SIZ", "VOCAB_SIZE"),
                                         ("MODEL_DIMS", "MODEL_DIM"), ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN")])
def test_unknown_settings_warns_for_a_typo_with_the_suggestion(typo, meant):
    tg.Hyperparameters()
    warnings = tg.unknown_settings({typo: "4", "HOME": "/root"})
    assert len(warnings) == 1
    assert typo in warnings[0] and "'4'" in warnings[0]
    assert f"did you mean {meant}?" in warnings[0]


def test_unknown_settings_reads_os_environ_by_default(monkeypatch):
    tg.Hyperparameters()
    monkeypatch.setenv("NUM_LAYER", "4")
    assert any("did you mean NUM_LAYERS?" in w for w in tg.unknown_settings())


def test_unknown_settings_silent_for_exact_settings():
    tg.Hyperparameters()
    environ = {name: "1" for name in SETTING_NAMES}
    assert tg.unknown_settings(environ) == []


@pytest.mark.parametrize("name", ["TORCH_MUON_MOMENTUM_WARMUP_STEPS", "NCCL_MUON_MOMENTUM_WARMUP_START",
                                  "CUDA_MUON_MOMENTUM_WARMUP_START", "TORCH_LOGS", "NCCL_DEBUG",
                                  "CUDA_VISIBLE_DEVICES"])
def test_unknown_settings_silent_for_torch_nccl_cuda_variables(name):
    tg.Hyperparameters()
    assert tg.unknown_settings({name: "1"}) == []


def test_prefixed_names_above_would_otherwise_look_misspelt():
    # Guards the test above: without their prefix check these names are close to a setting.
    import difflib

    tg.Hyperparameters()
    for name in ("TORCH_MUON_MOMENTUM_WARMUP_STEPS", "NCCL_MUON_MOMENTUM_WARMUP_START"):
        assert difflib.get_close_matches(name, list(tg._SETTINGS), n=1, cutoff=0.8)


def test_unknown_settings_silent_for_unrelated_and_launcher_variables():
    tg.Hyperparameters()
    environ = {name: "1" for name in (
        "HOME", "PATH", "USER", "SHELL", "LANG", "PWD", "TERM", "HOSTNAME", "LD_LIBRARY_PATH", "PYTHONPATH",
        "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
        "ROLE_RANK", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "TRITON_CACHE_DIR",
    )}
    environ["num_layer"] = "4"  # lower case: not a setting name
    assert tg.unknown_settings(environ) == []


def test_unknown_settings_reports_each_typo_in_sorted_order():
    tg.Hyperparameters()
    warnings = tg.unknown_settings({"VOCAB_SIZ": "1", "NUM_LAYER": "2", "HOME": "/root"})
    assert len(warnings) == 2
    assert "NUM_LAYER=" in warnings[0] and "VOCAB_SIZ=" in warnings[1]
