"""tools/bench.py proxy: the protocol's settings and the summary it reads from a log."""
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench


def test_proxy_env_scales_step_schedules_by_t_over_600_and_keeps_off_ones_off(monkeypatch):
    monkeypatch.setenv("SEED", "5")
    args = SimpleNamespace(warmdown_iters=3000, muon_momentum_warmup_steps=1500, swa_every=0, ema_decay=0.997)
    env = bench.proxy_env(args, 180.0, Path("/d"), Path("/t.model"), Path("/o"))
    assert (env["WARMDOWN_ITERS"], env["MUON_MOMENTUM_WARMUP_STEPS"], env["SWA_EVERY"]) == ("900", "450", "0")
    assert env["TRAIN_BATCH_TOKENS"] == "98304" and env["GRAD_ACCUM_STEPS"] == "1"
    assert float(env["EMA_DECAY"]) == pytest.approx(0.99)  # a horizon of 333 steps becomes 100
    assert env["MAX_WALLCLOCK_SECONDS"] == "180.0" and env["SEED"] == "5"  # the rest passes through


def test_proxy_summary_reads_the_scores_steps_and_bytes_of_a_log():
    log = "\n".join([
        "run ab on host: world_size=1 grad_accum=1 micro_batch=48x2048 device=cuda:0 (NVIDIA H100 80GB HBM3)",
        "training: 2682 steps in 180.0s (67.11ms/step), peak memory 9.00 GiB",
        "pre-quantization (averaged weights): val_loss:2.3 val_bpb:1.3408 (plain)",
        "round trip: val_loss:2.3 val_bpb:1.3477 (plain, seq_len 2048) quantization cost +0.0069 bpb",
        "artifact: 14,801,480 bytes = 70,000 code + 14,731,480 model (cap 16,000,000, 1 to spare)",
        "evaluation took 30.5s",
        "final_score val_loss:2.25 val_bpb:1.33520000 eval:sliding seq_len:2048 stride:64 bytes_total:14801480",
    ])
    assert bench.proxy_summary(log) == dict(final="1.33520000", mode="sliding", pre="1.3408", cost="+0.0069", steps="2682", ms="67.11",
                                            bytes="14,801,480", gpu="NVIDIA H100 80GB HBM3", eval_s="30.5")


def test_ttt_variants_override_only_the_named_settings_with_their_types():
    class Args:
        ttt_lr, ttt_chunk_tokens, ttt_epochs, ttt_batch_seqs = 0.002, 32768, 3, 32
        ttt_momentum, ttt_freeze_blocks, ttt_grad_clip = 0.9, 0, 1.0
        ttt_lora_rank, ttt_lora_lr, ttt_lora_chunk = 0, 0.001, 32
    variants = bench.ttt_variants("lr=0.01; chunk=8192,epochs=2; rank=8,lora_lr=3e-4", Args())
    assert variants == [{"ttt_lr": 0.01}, {"ttt_chunk_tokens": 8192, "ttt_epochs": 2},
                        {"ttt_lora_rank": 8, "ttt_lora_lr": 3e-4}]
    assert type(variants[1]["ttt_chunk_tokens"]) is int
    with pytest.raises(SystemExit, match="error: --ttt item 'rate=1'"):
        bench.ttt_variants("rate=1", Args())
