#!/usr/bin/env python3
"""Is a set of runs a significant improvement on a baseline, as the challenge's rule asks?

The rule: a new record must beat the baseline's val_loss by more than a margin (0.005 nats) at p < 0.01,
one-sided. Scores are taken from the LAST `final_score` line of each run's train.log.

  python3 tools/significance.py runs/seed*/train.log --baseline 2.0123
      one-sample t-test, H0: mean >= baseline - margin  vs  H1: mean < baseline - margin  (df = n-1)
  python3 tools/significance.py new/*/train.log --baseline-logs old/*/train.log
      Welch two-sample t-test, H0: mean_new >= mean_base - margin  (Welch-Satterthwaite df)
  options: --margin 0.005  --alpha 0.01  --metric val_loss|val_bpb  (the margin is in the metric's units)

Prints the runs' count, mean and sample std of val_loss and val_bpb, then t, df, p and a one-line verdict;
exits 0 whether or not the result is significant, 2 with one `error: ...` line when it cannot decide.
The Student t CDF is computed here (regularized incomplete beta by continued fraction), no scipy needed.
"""
import argparse
import math
import re
import sys

METRICS = ("val_loss", "val_bpb")


class UsageError(Exception):
    """A problem with the inputs, reported as one `error:` line and exit code 2."""


def final_scores(path: str) -> dict:
    """The key:value fields of the last `final_score` line of a log (numbers as floats)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line[line.index("final_score "):] for line in f if "final_score " in line]
    if not lines:
        raise UsageError(f"{path}: no final_score line (did the run finish?)")
    fields = dict(re.findall(r"(\w+):(\S+)", lines[-1]))
    for key, value in fields.items():
        try:
            fields[key] = float(value)
        except ValueError:
            pass
    for key in METRICS:
        if not isinstance(fields.get(key), float) or not math.isfinite(fields[key]):
            raise UsageError(f"{path}: final_score line has no finite {key}")
    return fields


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    clamp = lambda v: v if abs(v) > tiny else tiny  # noqa: E731  keep denominators away from zero
    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, 100_000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coef in (even, odd):
            d = 1.0 / clamp(1.0 + coef * d)
            c = clamp(1.0 + coef / c)
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; otherwise use the symmetry
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (df > 0, need not be an integer)."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def one_sample_test(values: list[float], baseline: float, margin: float) -> tuple[float, float, float]:
    """(t, df, p) of H0: mean >= baseline - margin against H1: mean < baseline - margin."""
    m, s = mean_std(values)
    if s == 0.0:
        raise UsageError(f"all {len(values)} runs have the identical score {m!r}: the t-test is undefined")
    t = (m - (baseline - margin)) / (s / math.sqrt(len(values)))
    return t, len(values) - 1.0, t_cdf(t, len(values) - 1.0)


def welch_test(new: list[float], base: list[float], margin: float) -> tuple[float, float, float]:
    """(t, df, p) of Welch's H0: mean_new >= mean_base - margin against H1: mean_new < mean_base - margin."""
    (m_new, s_new), (m_base, s_base) = mean_std(new), mean_std(base)
    v_new, v_base = s_new ** 2 / len(new), s_base ** 2 / len(base)
    if v_new + v_base == 0.0:
        raise UsageError("all runs in both groups are identical within their group: the t-test is undefined")
    t = (m_new - (m_base - margin)) / math.sqrt(v_new + v_base)
    df = (v_new + v_base) ** 2 / (v_new ** 2 / (len(new) - 1) + v_base ** 2 / (len(base) - 1))
    return t, df, t_cdf(t, df)


def summary(label: str, paths: list[str]) -> dict:
    """Each metric's list of values over the runs, after printing their count, mean and std."""
    if len(paths) < 2:
        raise UsageError(f"{label}: {len(paths)} run(s); a t-test needs at least 2")
    scores = [final_scores(p) for p in paths]
    values = {k: [s[k] for s in scores] for k in METRICS}
    stats = "  ".join(f"{k} mean {mean_std(v)[0]:.8f} std {mean_std(v)[1]:.8f}" for k, v in values.items())
    print(f"{label}: n={len(paths)}  {stats}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="train.log files of the new runs")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--baseline", type=float, help="the baseline's known score")
    group.add_argument("--baseline-logs", nargs="+", metavar="LOG", help="train.log files of baseline runs")
    ap.add_argument("--margin", type=float, default=0.005)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--metric", choices=METRICS, default="val_loss")
    a = ap.parse_args(argv)
    try:
        new = summary("new runs", a.logs)[a.metric]
        if a.baseline_logs:
            base = summary("baseline runs", a.baseline_logs)[a.metric]
            target = mean_std(base)[0] - a.margin
            t, df, p = welch_test(new, base, a.margin)
            print(f"Welch one-sided t-test, H0: mean_new >= mean_base - {a.margin:g} ({a.metric})")
        else:
            target = a.baseline - a.margin
            t, df, p = one_sample_test(new, a.baseline, a.margin)
            print(f"one-sample one-sided t-test, H0: mean >= {a.baseline:.8f} - {a.margin:g} ({a.metric})")
    except (UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"t = {t:.4f}  df = {df:.2f}  p = {p:.3g}")
    mean = mean_std(new)[0]
    claim = f"mean {a.metric} {mean:.6f} vs baseline - margin = {target:.6f}, p = {p:.3g}"
    print(f"significant: {claim} < alpha {a.alpha:g}" if p < a.alpha else f"not significant: {claim} >= alpha {a.alpha:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
