"""A run stopped part-way (SIGTERM, Ctrl-C, a crash, a full disk) leaves no final_model.ptz or
submission.json, not even an earlier run's, and a train.log whose last line says that it did not finish
and why. SIGTERM during training goes to a real subprocess, to prove the real exit path. The other
cases send the signal from inside the run, in-process, at a chosen stage: packing and the round trip
after the artifact is written are too short to hit from outside, and a fresh interpreter costs 10-40 s
on a busy 2-core machine."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

import train_gpt as tg
from test_training import SCRIPT, clean_env, tiny_config


def assert_unfinished(out, last_line: str) -> None:
    log = (out / "train.log").read_text().splitlines()
    assert log[-1] == last_line
    assert not any(line.startswith("final_score") for line in log)
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]  # no artifact, submission or .partial file


def leave_an_earlier_runs_results(out) -> None:
    out.mkdir(parents=True)
    (out / "final_model.ptz").write_bytes(b"an earlier run's artifact")
    (out / "submission.json").write_text('{"val_bpb": 1.0}\n')


def test_sigterm_during_training_ends_the_log_and_leaves_no_results(tiny_corpus, tmp_path):
    sig = signal.SIGTERM
    out = tmp_path / "out"
    leave_an_earlier_runs_results(out)
    settings = tiny_config(tiny_corpus, out, ITERATIONS=1_000_000, WARMUP_STEPS=0, TRAIN_LOG_EVERY=1)
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], cwd=tmp_path, env=clean_env(**settings),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while "\nstep:2/" not in ((out / "train.log").read_text() if (out / "train.log").exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.2)
        proc.send_signal(sig)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"stopped by {sig.name}"
    assert_unfinished(out, f"run did not finish: stopped by {sig.name}")


@pytest.mark.parametrize("stage, sig", [("accumulate_gradients", signal.SIGINT), ("pack_model", signal.SIGTERM),
                                        ("unpack_model", signal.SIGTERM)],
                         ids=["SIGINT_while_training", "SIGTERM_while_packing", "SIGTERM_after_the_artifact_is_written"])
def test_signal_at_a_stage_ends_the_log_and_leaves_no_results(run_in_process, monkeypatch, tiny_corpus, tmp_path,
                                                              stage, sig):
    out = tmp_path / "out"
    leave_an_earlier_runs_results(out)
    real, files_then = getattr(tg, stage), []

    def stopped_here(*args, **kwargs):
        files_then.append(sorted(p.name for p in out.iterdir()))
        os.kill(os.getpid(), sig)  # what Ctrl-C or `kill` does, at this moment
        return real(*args, **kwargs)

    monkeypatch.setattr(tg, stage, stopped_here)
    code, stderr = run_in_process(**tiny_config(tiny_corpus, out))
    assert (code, stderr) == (128 + sig, f"stopped by {sig.name}\n")
    # The earlier run's results went when this run started; the artifact, once written, went when it stopped.
    assert files_then == [["final_model.ptz.partial", "train.log"] if stage == "unpack_model" else ["train.log"]]
    assert_unfinished(out, f"run did not finish: stopped by {sig.name}")


def test_full_disk_while_packing_ends_the_log_and_leaves_no_results(run_in_process, monkeypatch, tiny_corpus,
                                                                    tmp_path):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tg, "pack_model", disk_full)
    out = tmp_path / "out"
    with pytest.raises(OSError):  # a crash keeps its traceback
        run_in_process(**tiny_config(tiny_corpus, out))
    assert_unfinished(out, f"run did not finish: OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}")


def test_finished_run_has_its_results_and_no_partial_file(run_in_process, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    leave_an_earlier_runs_results(out)
    code, stderr = run_in_process(**tiny_config(tiny_corpus, out))
    assert (code, stderr) == (0, "")
    assert sorted(p.name for p in out.iterdir()) == ["final_model.ptz", "submission.json", "train.log"]
    assert (out / "train.log").read_text().splitlines()[-1].startswith("final_score ")
    assert (out / "submission.json").read_text() != '{"val_bpb": 1.0}\n'
