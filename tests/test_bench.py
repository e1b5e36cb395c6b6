"""tools/bench.py: the proxy protocol's settings, the summary it reads from a log, and `score` of an artifact."""
import re
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


def test_proxy_variants_parse_into_one_run_each():
    assert bench.proxy_variants("") == [{}]
    assert bench.proxy_variants("XSA_LAST_N=0; ROPE_DIMS=0,LN_SCALE=0;") == [{"XSA_LAST_N": "0"},
                                                                          {"ROPE_DIMS": "0", "LN_SCALE": "0"}]
    with pytest.raises(SystemExit, match="error: --variants item 'XSA_LAST_N'"):
        bench.proxy_variants("XSA_LAST_N")


def test_variant_plan_logs_every_setting_given_and_scales_the_schedules_it_passes_on(tmp_path):
    """A schedule given by hand (SWA_EVERY=50) is in the row's settings at the value given and reaches the run
    scaled by T/600; what the protocol sets itself is not a change."""
    import train_gpt as tg
    a = SimpleNamespace(tokenizers=str(tmp_path), data="", t=180.0)
    plan = bench.variant_plan(tg, a, {"EMA_DECAY": "0", "SWA_EVERY": "50", "OUT_DIR": "/x"}, tmp_path / "v0")
    assert plan["changed"] == {"EMA_DECAY": "0", "SWA_EVERY": "50"}
    assert (plan["env"]["SWA_EVERY"], plan["env"]["EMA_DECAY"], plan["env"]["OUT_DIR"]) == ("15", "0", str(tmp_path / "v0"))
    assert plan["tokenizer"] == tmp_path / "fineweb_8192_bpe.model" and plan["data"] == Path("/tmp/proxy_sp8192")


# Stands in for train_gpt.py: its Hyperparameters for the settings, and a run that writes the log lines the
# summary reads, its val_bpb made from XSA_LAST_N and its GPU from CUDA_VISIBLE_DEVICES; XSA_LAST_N=5 fails.
STUB_SCRIPT = '''
import os, sys, time
sys.path.insert(0, {root!r})
from train_gpt import Hyperparameters, _SETTINGS
if __name__ == "__main__":
    xsa = int(os.environ.get("XSA_LAST_N", "11"))
    if xsa == 5:
        sys.exit(3)
    start = time.time()
    time.sleep(0.5)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
    with open(os.path.join(os.environ["OUT_DIR"], "train.log"), "w") as f:
        f.write(f"run x on vm: world_size=1 device=cuda:0 (GPU {{gpu}} {{os.environ['OUT_DIR']}} {{start}} {{time.time()}})\\n"
                f"training: 10 steps in 1.0s (100.00ms/step), peak memory 1 GiB\\n"
                f"final_score val_loss:3 val_bpb:{{1 + xsa / 100:.8f}} eval:sliding seq_len:2048 stride:64 bytes_total:5\\n")
'''


def test_proxy_runs_each_variant_on_a_free_gpu_in_its_own_folder_and_records_each(tmp_path, capsys):
    from conftest import ROOT
    script = tmp_path / "stub.py"
    script.write_text(STUB_SCRIPT.format(root=str(ROOT)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "fineweb_val_000000.bin").touch()  # shards already built
    results = tmp_path / "results.md"
    a = SimpleNamespace(script=str(script), variants="XSA_LAST_N=0;XSA_LAST_N=3;XSA_LAST_N=5;XSA_LAST_N=7", gpus=2,
                        out=str(tmp_path / "out"), data=str(data), tokenizers=str(tmp_path), text=str(tmp_path), t=180.0,
                        results=str(results))
    with pytest.raises(SystemExit, match=r"error: 1 of 4 proxy runs failed: .*out/v2"):
        bench.run_proxy(a)
    rows = results.read_text().splitlines()
    assert sorted(r.split(" | ")[2:4] for r in rows) == [["XSA_LAST_N=0", "1.00000000"], ["XSA_LAST_N=3", "1.03000000"],
                                                         ["XSA_LAST_N=7", "1.07000000"]]
    spans = []
    for i in (0, 1, 3):
        gpu, out, start, end = (tmp_path / "out" / f"v{i}" / "train.log").read_text().split("(GPU ")[1].split(")")[0].split()
        assert gpu in ("0", "1") and out == str(tmp_path / "out" / f"v{i}")  # its own folder, a GPU of the two
        spans.append((gpu, float(start), float(end)))
    for g1, s1, e1 in spans:  # never two runs on one GPU at once
        assert all(e1 <= s2 or e2 <= s1 for g2, s2, e2 in spans if g2 == g1 and (s2, e2) != (s1, e1))
    assert "XSA_LAST_N=3: proxy val_bpb (T=180, 1xGPU" in capsys.readouterr().out


def test_score_rescores_an_artifact_as_the_run_did_on_the_same_cut_split(tiny_corpus, tmp_path, monkeypatch, capsys):
    """`score` on a run's artifact gives the run's own round-trip sliding score, VAL_TOKENS_LIMIT included."""
    import train_gpt as tg
    from test_training import SETTING_NAMES, run_script, tiny_config

    settings = tiny_config(tiny_corpus, tmp_path / "out", VAL_TOKENS_LIMIT=3000)
    proc = run_script(tmp_path, **settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_bpb = float(re.search(r"^final_score val_loss:\S+ val_bpb:(\S+) eval:sliding ",
                              (tmp_path / "out" / "train.log").read_text(), re.M).group(1))
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(tg, "_SETTINGS", {})
    capsys.readouterr()
    bench.run_score(SimpleNamespace(artifact=str(tmp_path / "out" / "final_model.ptz"), ttt="", no_baseline=False))
    out = capsys.readouterr().out
    assert "the first 3,000 validation tokens only" in out
    assert float(re.search(r"^score sliding: val_loss \S+ val_bpb (\S+) ", out, re.M).group(1)) == pytest.approx(run_bpb, abs=1e-5)


def lora_lines(out: str) -> dict:
    """{"one": (steps, padded M, seconds), "busiest": (...)} from `lora`'s output."""
    found = {}
    for key, label in (("one", "the shard on one device"), ("busiest", "the busiest of")):
        m = re.search(rf"^{label}.*: ([\d,]+) steps, ([\d.]+)M padded token-passes, ([\d.]+)s of steps$", out, re.M)
        assert m, out
        found[key] = (int(m.group(1).replace(",", "")), float(m.group(2)), float(m.group(3)))
    return found


def test_lora_times_the_busiest_rank_and_at_one_rank_of_one_copy_the_shard_itself(tiny_corpus, tmp_path, tiny_sp,
                                                                                  monkeypatch, capsys):
    """`lora` counts LoRA's steps per rank as evaluate_ttt deals the documents and times them by shape: one copy
    on one rank is the shard on one device, step for step and second for second; two copies on two ranks
    give each rank about the one device's work, not twice it."""
    import train_gpt as tg
    from test_training import SETTING_NAMES, tiny_config

    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in tiny_config(tiny_corpus, tmp_path / "out", TTT_LORA_RANK=2, TTT_LORA_CHUNK=16).items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(tg, "_SETTINGS", {})
    shard = str(Path(tiny_corpus["data_path"]) / "fineweb_val_000000.bin")
    args = dict(lengths=shard, reps=1, bos=tiny_sp.bos_id())
    capsys.readouterr()
    bench.run_lora(SimpleNamespace(copies=1, world=1, **args))
    single = lora_lines(capsys.readouterr().out)
    assert single["one"] == single["busiest"] and single["one"][0] > 10
    bench.run_lora(SimpleNamespace(copies=2, world=2, **args))
    double = lora_lines(capsys.readouterr().out)
    assert double["one"][:2] == single["one"][:2]
    assert 0.7 * single["one"][1] <= double["busiest"][1] <= 1.4 * single["one"][1]
    monkeypatch.setenv("TTT_LORA_RANK", "0")
    monkeypatch.setattr(tg, "_SETTINGS", {})
    with pytest.raises(SystemExit, match="error: .*TTT_LORA_RANK"):
        bench.run_lora(SimpleNamespace(copies=1, world=1, **args))
