"""tools/significance.py: the Student t CDF, the two t-tests, log parsing and the command line."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

import significance as sig

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "significance.py"


def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def mean_var(xs):
    m = sum(xs) / len(xs)
    return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def write_log(path, val_loss, val_bpb=None, earlier=()):
    """A train.log ending in a final_score line; `earlier` final_score losses come before it."""
    lines = ["step:100/200 train_loss:2.5000", "round trip: val_loss:2.0000 val_bpb:1.2000 (sliding)"]
    lines += [f"final_score val_loss:{v:.8f} val_bpb:{v * 0.59:.8f} eval:sliding seq_len:2048 stride:64 "
              f"bytes_total:15800000" for v in earlier]
    bpb = val_loss * 0.592 if val_bpb is None else val_bpb
    lines.append(f"final_score val_loss:{val_loss:.8f} val_bpb:{bpb:.8f} eval:sliding seq_len:2048 stride:64 "
                 f"bytes_total:15800000")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_logs(tmp_path, name, losses):
    (tmp_path / name).mkdir()
    return [write_log(tmp_path / name / f"{i}.log", v) for i, v in enumerate(losses)]


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


# --- t_cdf -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("df", [1, 2, 3.5, 9, 30, 1000])
def test_t_cdf_is_one_half_at_zero(df):
    assert sig.t_cdf(0.0, df) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("t", [-30.0, -3.0, -1.0, -0.2, 0.5, 1.0, 2.0, 10.0])
def test_t_cdf_with_one_df_is_cauchy(t):
    assert sig.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)


def test_t_cdf_with_two_df_closed_form():
    for t in (-4.0, -1.0, 0.3, 2.5):
        assert sig.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)


@pytest.mark.parametrize("t", [-3.0, -1.645, -0.5, 0.7, 1.96, 2.5])
def test_t_cdf_approaches_normal_for_large_df(t):
    assert sig.t_cdf(t, 1e6) == pytest.approx(normal_cdf(t), abs=1e-5)
    assert abs(sig.t_cdf(t, 1e4) - normal_cdf(t)) < abs(sig.t_cdf(t, 10) - normal_cdf(t)) + 1e-12


def test_t_cdf_table_values():
    assert round(sig.t_cdf(-2.262157, 9), 3) == 0.025
    assert round(sig.t_cdf(2.763, 28), 3) == 0.995
    assert sig.t_cdf(-2.262157, 9) == pytest.approx(0.025, abs=1e-6)
    assert sig.t_cdf(-2.764, 10) == pytest.approx(0.01, abs=1e-4)


@pytest.mark.parametrize("df", [1, 2.7, 5, 40])
@pytest.mark.parametrize("t", [0.1, 1.3, 4.0, 8.0])
def test_t_cdf_symmetry_and_monotonicity(t, df):
    assert sig.t_cdf(-t, df) == pytest.approx(1.0 - sig.t_cdf(t, df), abs=1e-12)
    assert 0.0 < sig.t_cdf(-t, df) < 0.5 < sig.t_cdf(t, df) < 1.0
    assert sig.t_cdf(t, df) < sig.t_cdf(t * 1.1, df)


# --- the tests ---------------------------------------------------------------------------------------

def test_one_sample_test_by_formula():
    values, baseline, margin = [2.001, 2.004, 1.998, 2.003, 2.000], 2.02, 0.005
    m, var = mean_var(values)
    t_expected = (m - (baseline - margin)) / math.sqrt(var / len(values))
    t, df, p = sig.one_sample_test(values, baseline, margin)
    assert t == pytest.approx(t_expected, rel=1e-12)
    assert df == len(values) - 1
    assert p == pytest.approx(sig.t_cdf(t_expected, 4), rel=1e-12)
    assert t < 0 and p < 0.01


def test_welch_test_by_formula():
    new, base, margin = [2.00, 2.01, 1.99, 2.005], [2.03, 2.05, 2.02, 2.04, 2.06, 2.035], 0.005
    (mn, vn), (mb, vb) = mean_var(new), mean_var(base)
    se2 = vn / len(new) + vb / len(base)
    t_expected = (mn - (mb - margin)) / math.sqrt(se2)
    df_expected = se2 ** 2 / ((vn / len(new)) ** 2 / (len(new) - 1) + (vb / len(base)) ** 2 / (len(base) - 1))
    t, df, p = sig.welch_test(new, base, margin)
    assert t == pytest.approx(t_expected, rel=1e-12)
    assert df == pytest.approx(df_expected, rel=1e-12)
    assert min(len(new), len(base)) - 1 <= df <= len(new) + len(base) - 2
    assert p == pytest.approx(sig.t_cdf(t_expected, df_expected), rel=1e-12)


def test_welch_with_equal_sizes_and_variances_has_pooled_df():
    new, base = [1.0, 2.0, 3.0], [11.0, 12.0, 13.0]
    t, df, p = sig.welch_test(new, base, 0.0)
    assert df == pytest.approx(4.0)
    assert t == pytest.approx(-10.0 / math.sqrt(2 / 3))


def test_zero_variance_is_an_error():
    with pytest.raises(sig.UsageError, match="identical"):
        sig.one_sample_test([2.0, 2.0, 2.0], 2.1, 0.005)
    with pytest.raises(sig.UsageError, match="identical"):
        sig.welch_test([2.0, 2.0], [2.1, 2.1], 0.005)
    sig.welch_test([2.0, 2.0], [2.1, 2.11], 0.005)  # one constant group is fine for Welch


# --- parsing -----------------------------------------------------------------------------------------

def test_final_scores_takes_the_last_final_score_line(tmp_path):
    path = write_log(tmp_path / "train.log", 2.01234567, 1.19123456, earlier=[2.5, 2.4])
    scores = sig.final_scores(path)
    assert scores["val_loss"] == 2.01234567 and scores["val_bpb"] == 1.19123456
    assert scores["eval"] == "sliding" and scores["seq_len"] == 2048 and scores["bytes_total"] == 15800000


def test_final_scores_without_final_score_line(tmp_path):
    path = tmp_path / "train.log"
    path.write_text("step:1/10 train_loss:7.0\nround trip: val_loss:2.0 val_bpb:1.2\n")
    with pytest.raises(sig.UsageError, match="no final_score"):
        sig.final_scores(str(path))


# --- command line ------------------------------------------------------------------------------------

NEW = [2.0001, 2.0012, 1.9995, 2.0007, 1.9990]  # mean 2.0001
OLD = [2.0301, 2.0290, 2.0312, 2.0296, 2.0305]  # mean 2.03008


def test_cli_known_baseline_significant(tmp_path):
    r = run_cli(*write_logs(tmp_path, "new", NEW), "--baseline", "2.03")
    assert r.returncode == 0, r.stderr
    assert "n=5" in r.stdout and "val_bpb" in r.stdout
    verdict = r.stdout.strip().splitlines()[-1]
    assert verdict.startswith("significant:")
    p = float(r.stdout.split("p = ")[1].split()[0])
    assert p < 0.01


def test_cli_baseline_logs_significant(tmp_path):
    r = run_cli(*write_logs(tmp_path, "new", NEW), "--baseline-logs", *write_logs(tmp_path, "old", OLD))
    assert r.returncode == 0, r.stderr
    assert "baseline runs: n=5" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("significant:")
    assert float(r.stdout.split("p = ")[1].split()[0]) < 0.01


def test_cli_improvement_within_margin_is_not_significant(tmp_path):
    slightly_better = [v - 0.003 for v in OLD]  # 0.003 better: real, but less than the 0.005 margin
    new, old = write_logs(tmp_path, "new", slightly_better), write_logs(tmp_path, "old", OLD)
    r = run_cli(*new, "--baseline-logs", *old)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("not significant:")
    r = run_cli(*new, "--baseline", "2.03008")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("not significant:")
    r = run_cli(*new, "--baseline-logs", *old, "--margin", "0")  # without the margin it would pass
    assert r.stdout.strip().splitlines()[-1].startswith("significant:")


def test_cli_metric_val_bpb(tmp_path):
    r = run_cli(*write_logs(tmp_path, "new", NEW), "--baseline", "1.2", "--metric", "val_bpb")
    assert r.returncode == 0 and "(val_bpb)" in r.stdout


def check_error(r, *phrases):
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr + r.stdout
    for phrase in phrases:
        assert phrase in r.stderr


def test_cli_errors(tmp_path):
    good = write_logs(tmp_path, "new", NEW)
    broken = tmp_path / "broken.log"
    broken.write_text("step:5/200 train_loss:4.2\n")
    check_error(run_cli(*good, str(broken), "--baseline", "2.03"), str(broken), "final_score")
    check_error(run_cli(good[0], "--baseline", "2.03"), "at least 2")
    check_error(run_cli(*good, "--baseline-logs", good[0]), "baseline", "at least 2")
    same = write_logs(tmp_path, "same", [2.01, 2.01, 2.01])
    check_error(run_cli(*same, "--baseline", "2.03"), "identical")
    check_error(run_cli(*same, "--baseline-logs", *same), "identical")
    check_error(run_cli(*good, str(tmp_path / "missing.log"), "--baseline", "2.03"), "missing.log")
