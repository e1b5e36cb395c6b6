"""Training section of train_gpt.py: gradient accumulation, and whole runs of the script as a
subprocess (the CPU smoke run of run.sh, setup errors on a fresh machine, misspelt settings, the
compile warm-up leaving the run unchanged, and a run scored with test-time training)."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
# Every setting the script reads, so a stray one in the caller's environment cannot change a run.
SETTING_NAMES = set(re.findall(r'\benv\("([A-Z0-9_]+)"', SCRIPT.read_text()))
FINAL_SCORE = re.compile(r"^final_score val_loss:(\d+(?:\.\d+)?) val_bpb:(\d+(?:\.\d+)?) eval:sliding( |$)")
TRAIN_LOSS = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) ", re.M)


def clean_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in SETTING_NAMES and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def tiny_config(corpus: dict, out_dir: Path, **overrides) -> dict:
    cfg = dict(DATA_PATH=corpus["data_path"], TOKENIZER_PATH=corpus["tokenizer"], VOCAB_SIZE=corpus["vocab_size"],
               NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512,
               ITERATIONS=3, WARMUP_STEPS=1, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0, COMPILE=0,
               BIGRAM_VOCAB_SIZE=64, BIGRAM_DIM=16, OUT_DIR=out_dir, EVAL_STRIDE=32, LOOP_REPEATS=0, TTT_EPOCHS=0, TTT_LORA_RANK=0)
    cfg.update(overrides)
    return cfg


def run_script(cwd: Path, timeout: int = 120, **settings) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd, env=clean_env(**settings), capture_output=True,
                          text=True, timeout=timeout)


def train_losses(log_text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(3) for m in TRAIN_LOSS.finditer(log_text)}


# -----------------------------------------------------------------------------
# accumulate_gradients


def tiny_model() -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                   bigram_vocab_size=16, bigram_dim=8, max_seq_len=16)
    with torch.no_grad():  # the zero-initialized bigram projection would give its table a zero gradient
        model.bigram.proj.weight.normal_(std=0.05)
    return model.float()


def test_accumulate_gradients_equals_one_backward_of_the_mean_loss_over_the_whole_batch():
    g = torch.Generator().manual_seed(0)
    micro = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
             for _ in range(5)]
    model = tiny_model()
    reference = copy.deepcopy(model)
    batches = iter(micro)

    loss = tg.accumulate_gradients(model, batches, micro_steps=4, device=torch.device("cpu"))

    x = torch.cat([b[0] for b in micro[:4]])
    y = torch.cat([b[1] for b in micro[:4]])
    full = reference(x, y).mean()
    full.backward()

    assert loss.ndim == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, full.detach(), atol=1e-5, rtol=1e-5)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert grads[name].grad.abs().max() > 0, name  # a real check, not zeros against zeros
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    # Exactly micro_steps batches were consumed.
    assert next(batches)[0] is micro[4][0]


def test_accumulate_gradients_accumulates_across_calls_without_zero_grad():
    """Two calls without zero_grad in between accumulate, like backward does: the sum of both means."""
    g = torch.Generator().manual_seed(1)
    micro = [(torch.randint(0, 64, (1, 16), generator=g), torch.randint(0, 64, (1, 16), generator=g))
             for _ in range(4)]
    model, reference = tiny_model(), tiny_model()
    batches = iter(micro)
    tg.accumulate_gradients(model, batches, 2, torch.device("cpu"))
    tg.accumulate_gradients(model, batches, 2, torch.device("cpu"))
    for pair in (micro[:2], micro[2:]):
        reference(torch.cat([b[0] for b in pair]), torch.cat([b[1] for b in pair])).mean().backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("micro_steps", [1, 8])
def test_one_or_eight_micro_steps_over_the_same_sequences_give_the_same_gradient(micro_steps):
    """GRAD_ACCUM_STEPS only changes how a step's sequences are cut: 8 sequences in one micro-step or in
    8 micro-steps of one give one gradient (the proxy runs 1, the competition 8 / WORLD_SIZE)."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)
    model = tiny_model()
    batches = iter(zip(x.chunk(micro_steps), y.chunk(micro_steps)))
    tg.accumulate_gradients(model, batches, micro_steps, torch.device("cpu"))
    reference = tiny_model()
    reference(x, y).mean().backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert ref[name].grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_grad_accum_steps_sets_the_micro_batch(tiny_corpus, tmp_path):
    """TRAIN_BATCH_TOKENS stays the whole step: 2 micro-steps of 512 tokens take 4 sequences of 64 each."""
    out = tmp_path / "out"
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, GRAD_ACCUM_STEPS=2, ITERATIONS=1, WARMUP_STEPS=0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=1 grad_accum=2 micro_batch=4x64" in (out / "train.log").read_text()


# -----------------------------------------------------------------------------
# The smoke run of run.sh


def test_run_sh_smoke_run_writes_a_consistent_submission(tmp_path):
    out = tmp_path / "out"
    empty, steps = tmp_path / "no_shards", 12  # no shards here: run.sh must take its CPU smoke branch
    empty.mkdir()
    proc = subprocess.run(["bash", "run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=480,
                          env=clean_env(ITERATIONS=steps, MAX_WALLCLOCK_SECONDS=0, OUT_DIR=out, DATA_PATH=empty))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    match = re.match(FINAL_SCORE.pattern.replace("eval:sliding", r"eval:docs\+lora\+ttt"), lines[-1])  # TTT on by default
    assert match, lines[-1]
    val_loss, val_bpb = float(match.group(1)), float(match.group(2))
    assert 0 < val_bpb < 10 and 0 < val_loss < 10

    assert sorted(p.name for p in out.iterdir()) == ["final_model.ptz", "submission.json", "train.log"]  # no .partial
    log = (out / "train.log").read_text()
    assert log.strip().splitlines()[-1] == lines[-1]  # the log ends with the same score line

    sub = json.loads((out / "submission.json").read_text())
    assert set(sub) >= {"name", "author", "github_id", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code", "blurb"}
    assert sub["val_bpb"] == pytest.approx(val_bpb, abs=1e-9)
    assert sub["val_loss"] == pytest.approx(val_loss, abs=1e-9)
    assert sub["bytes_code"] == SCRIPT.stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + (out / "final_model.ptz").stat().st_size
    assert f"bytes_total:{sub['bytes_total']}" in lines[-1]

    losses = train_losses(log)
    assert 1 in losses and steps in losses, sorted(losses)
    assert float(losses[steps]) < float(losses[1])


# -----------------------------------------------------------------------------
# Setup errors: one line on stderr, exit code 2, no traceback


def assert_setup_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_fresh_machine_without_shards_exits_2_naming_the_missing_shards(tiny_corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, tmp_path / "out", DATA_PATH=empty))
    assert_setup_error(proc, "no shards match", str(empty), "fineweb_")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        pytest.param(dict(TOKENIZER_PATH="{tmp}/nope/tokenizer.model"), ("TOKENIZER_PATH=", "not found"),
                     id="missing_tokenizer"),
        pytest.param(dict(VOCAB_SIZE=1024), ("VOCAB_SIZE=1024", "512"), id="vocab_size_disagrees_with_tokenizer"),
        pytest.param(dict(TRAIN_BATCH_TOKENS=1000), ("TRAIN_BATCH_TOKENS=1000", "TRAIN_SEQ_LEN=64", "512"),
                     id="batch_not_divisible_by_8_seq_len"),
        pytest.param(dict(GRAD_ACCUM_STEPS=16), ("TRAIN_BATCH_TOKENS=512", "1 x 16", "1024"),
                     id="batch_not_whole_sequences_per_micro_step"),
        pytest.param(dict(WORLD_SIZE=3), ("WORLD_SIZE=3",), id="world_size_3"),
        pytest.param(dict(COMPRESSOR="gzip"), ("COMPRESSOR='gzip'", "one of auto, zstd, lzma"), id="unknown_compressor"),
    ],
)
def test_bad_setting_exits_2_with_one_error_line_naming_it(tiny_corpus, tmp_path, overrides, fragments):
    overrides = {k: str(v).replace("{tmp}", str(tmp_path)) for k, v in overrides.items()}
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, tmp_path / "out", **overrides))
    assert_setup_error(proc, *fragments)
    assert not (tmp_path / "out" / "final_model.ptz").exists()


# -----------------------------------------------------------------------------
# Short runs on the tiny corpus


def test_misspelt_setting_logs_a_warning_suggesting_the_right_name(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, NUM_LAYER=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    warnings = [line for line in log.splitlines() if line.startswith("WARNING:")]
    assert any("NUM_LAYER=" in w and "did you mean NUM_LAYERS" in w for w in warnings), warnings
    assert "setting NUM_LAYERS=2" in log  # the misspelt one is ignored
    assert "WARNING:" in proc.stdout


def test_compile_warmup_leaves_training_unchanged(tiny_corpus, tmp_path):
    """The warm-up takes real optimizer steps, then restores weights, optimizer state and the data
    stream: the logged losses of steps 1..3 must be identical to a run without warm-up."""
    logs = {}
    for warmup in (0, 2):
        out = tmp_path / f"warmup{warmup}"
        proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, WARMUP_STEPS=warmup, SEED=7, ITERATIONS=3,
                                                  MUON_MOMENTUM_WARMUP_STEPS=2, LR_WARMUP_STEPS=0))
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[warmup] = (out / "train.log").read_text()
    assert "warm-up: 2 steps" in logs[2] and "warm-up:" not in logs[0]
    without, with_warmup = train_losses(logs[0]), train_losses(logs[2])
    assert sorted(without) == [1, 2, 3]
    assert with_warmup == without
    assert len(set(without.values())) > 1  # the loss moves, so a stale state would show


def test_two_processes_train_like_one(tiny_corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes 4 of the 8 micro-batches, DDP averages the
    gradients, Muon splits its matrices between the ranks, evaluation splits the windows. The logged
    losses (the whole batch's, all-reduced) and the final score must match one process."""
    logs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        settings = tiny_config(tiny_corpus, out, ITERATIONS=8, WARMUP_STEPS=0, LR_WARMUP_STEPS=0, WARMDOWN_ITERS=4,
                               TRAIN_BATCH_TOKENS=1024, TRAIN_LOG_EVERY=1, SWA_EVERY=2, SWA_START_FRAC=0.6)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                               str(SCRIPT)], cwd=tmp_path, env=clean_env(OMP_NUM_THREADS=1, **settings),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[world] = (out / "train.log").read_text()
    assert "world_size=2 grad_accum=4" in logs[2]
    one, two = train_losses(logs[1]), train_losses(logs[2])
    assert sorted(one) == list(range(1, 9)) and sorted(two) == sorted(one)
    assert float(one[8]) < float(one[1]) - 0.5  # it trains, so a wrong gradient would show
    for step in one:
        assert abs(float(one[step]) - float(two[step])) < 2e-3, (step, one[step], two[step])
    score = [float(FINAL_SCORE.search(log.strip().splitlines()[-1]).group(2)) for log in (logs[1], logs[2])]
    assert abs(score[0] - score[1]) < 1e-3


@pytest.mark.parametrize("settings,mode,detail", [
    (dict(TTT_EPOCHS=1, TTT_PHASES=0, TTT_CHUNK_TOKENS=2048, TTT_BATCH_SEQS=8), "sliding+ttt",
     "seq_len 64 stride 32, chunks of 2048 tokens"),
    (dict(TTT_LORA_RANK=2, TTT_LORA_CHUNK=16), "docs+lora", "seq_len 64, LoRA rank 2 on 16-token document chunks"),
    (dict(TTT_EPOCHS=1, TTT_PHASES=2, TTT_BATCH_SEQS=8, TTT_LORA_RANK=2, TTT_LORA_CHUNK=16), "docs+lora+ttt",
     r"seq_len 64, 2 phases of \d+ tokens, LoRA rank 2 on 16-token document chunks"),
])
def test_ttt_run_replaces_the_sliding_score_and_logs_its_time_split(tiny_corpus, tmp_path, settings, mode, detail):
    out = tmp_path / "out"
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    last = log.strip().splitlines()[-1]
    match = re.match(rf"^final_score val_loss:(\S+) val_bpb:(\S+) eval:{re.escape(mode)} seq_len:64 stride:32 bytes_total:", last)
    assert match, last
    assert 0 < float(match.group(2)) < 10
    assert "(sliding, seq_len" not in log  # no separate sliding pass
    assert re.search(rf"^round trip: .* \({re.escape(mode)}, {detail}\)$", log, re.M), log
    times = re.search(r"^ttt time on 1 rank\(s\): scoring \d+\.\ds \+ adaptation \d+\.\ds; on 8 GPUs about .*$", log, re.M)
    assert times and ("LoRA: more, a rank waits for its longest documents" in times[0]) == ("lora" in mode)
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(float(match.group(2)), abs=1e-8)
    assert f"{mode} eval" in sub["blurb"]


def test_wallclock_cap_stops_training_at_the_cap_fully_annealed(tiny_corpus, tmp_path):
    """The loop decides to stop one step ahead: after the first step k whose predicted end (the end of
    step k-1 plus that step's duration) reaches the cap. The logged end times must show that rule
    (which holds however long the steps take on a busy machine), and the LR must be at the end of its
    warmdown. The cap is MAX_WALLCLOCK_SECONDS less GPTQ_RESERVE_SECONDS (GPTQ is on by default)."""
    out = tmp_path / "out"
    cap_ms, warmdown = 6000, 20  # the cap training gets: 8 s less the 2 s reserved for GPTQ's calibration
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=8,
                                              GPTQ_RESERVE_SECONDS=2, WARMUP_STEPS=1, LR_WARMUP_STEPS=0,
                                              WARMDOWN_ITERS=warmdown, WARMDOWN_FRAC=0, TRAIN_LOG_EVERY=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "training cap: 6s (2s of the 8s reserved for GPTQ calibration)" in log
    steps = re.findall(r"^step:(\d+)/\d+ train_loss:\S+ lr_mul:(\S+) train_time:(\d+)ms", log, re.M)
    assert [int(s) for s, _, _ in steps] == list(range(1, len(steps) + 1))  # every step logged once, in order
    end = [0.0] + [float(ms) for _, _, ms in steps]  # end[k]: end of step k, logged to the nearest ms
    last = len(steps)
    assert 4 <= last < 100_000

    def predicted(k: int) -> float:
        return 2 * end[k - 1] - end[k - 2]

    assert predicted(last) >= cap_ms - 2, (predicted(last), cap_ms)  # the rule stopped here
    assert predicted(last - 1) < cap_ms + 2, (predicted(last - 1), cap_ms)  # and not a step earlier
    # The LR of each step comes from the predicted end of the step before it, so the last one is within
    # about a step of the end of the warmdown.
    args = SimpleNamespace(lr_warmup_steps=0, iterations=100_000, warmdown_iters=warmdown, max_wallclock_seconds=cap_ms / 1000,
                           warmdown_frac=0.0, lr_floor=0.0)
    for k in (last - 1, last):
        # predicted() is off by up to 1.5 ms from the logged rounding; the LR falls as the time grows
        low, high = (tg.lr_multiplier(k - 1, predicted(k - 1) + d, args) for d in (1.5, -1.5))
        assert low - 5e-4 <= float(steps[k - 1][1]) <= high + 5e-4, (k, steps[k - 1][1], low, high)
    assert re.search(rf"^training: {last} steps in ", log, re.M)


def test_validation_mid_training_keeps_every_step_logged_once_in_order(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    proc = run_script(tmp_path, **tiny_config(tiny_corpus, out, ITERATIONS=6, VAL_LOSS_EVERY=2, TRAIN_LOG_EVERY=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "train.log").read_text().splitlines()
    order = [(int(m.group(1)), "train" if m.group(2) == "/" else "val")
             for m in (re.match(r"^step:(\d+)(/| val_loss)", line) for line in lines) if m]
    # the last step is scored by the final evaluation, not by a mid-training one
    assert order == [(1, "train"), (2, "train"), (2, "val"), (3, "train"), (4, "train"), (4, "val"), (5, "train"), (6, "train")]
    times = [int(t) for t in re.findall(r"^step:\d+/\d+ .*train_time:(\d+)ms", "\n".join(lines), re.M)]
    assert times == sorted(times)
