"""Tests for the comparison-report statistics and tables (fuselab.report)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fuselab.report import (
    holm,
    latex_escape,
    mcnemar,
    mean_ci,
    paired_ttest,
    summarize,
    to_csv,
    to_latex,
    to_markdown,
)

# ------------------------------------------------------------------------------------------------
# stats
# ------------------------------------------------------------------------------------------------


def test_mean_ci_matches_hand_computation() -> None:
    mean, std, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt(2.5))  # sum of squares 10, ddof=1 -> 10 / 4
    # t_{0.975, 4} = 2.7764451051977987; std / sqrt(n) = sqrt(2.5 / 5) = sqrt(0.5)
    assert half == pytest.approx(2.7764451051977987 * math.sqrt(0.5), rel=1e-9)


def test_mean_ci_other_confidence_and_single_value() -> None:
    _, _, half90 = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.90)
    assert half90 == pytest.approx(2.1318467863266495 * math.sqrt(0.5), rel=1e-9)  # t_{0.95, 4}
    mean, std, half = mean_ci([0.7])
    assert (mean, std) == (0.7, 0.0)
    assert math.isnan(half)
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], confidence=1.5)


def test_paired_ttest_closed_form_df1() -> None:
    # Differences [0, 2]: mean 1, std sqrt(2), se 1 -> t = 1 with df = 1 (Cauchy): P(|T| > 1) = 1/2.
    assert paired_ttest([1.0, 3.0], [1.0, 1.0]) == pytest.approx(0.5, rel=1e-12)
    # Differences [1, 3]: t = 2 -> p = 1 - (2 / pi) * atan(2).
    assert paired_ttest([2.0, 4.0], [1.0, 1.0]) == pytest.approx(1 - 2 / math.pi * math.atan(2.0))


def test_paired_ttest_against_hand_t_statistic() -> None:
    a = [3.0, 5.0, 4.0, 6.0]
    b = [1.0, 4.0, 1.0, 3.0]
    # differences [2, 1, 3, 3]: mean 2.25, squared deviations sum to 2.75, var 2.75/3, se sqrt(var/4)
    t = 2.25 / math.sqrt((2.75 / 3) / 4)
    assert t == pytest.approx(4.7000967)
    expected = 2 * stats.t.sf(t, df=3)
    assert paired_ttest(a, b) == pytest.approx(expected, rel=1e-10)
    assert paired_ttest(b, a) == pytest.approx(expected, rel=1e-10)  # two-sided


def test_paired_ttest_edge_cases() -> None:
    assert paired_ttest([0.9, 0.8, 0.7], [0.9, 0.8, 0.7]) == 1.0
    assert math.isnan(paired_ttest([0.9], [0.8]))
    assert math.isnan(paired_ttest([], []))
    with pytest.raises(ValueError):
        paired_ttest([0.1, 0.2], [0.1, 0.2, 0.3])


def test_mcnemar_exact_binomial() -> None:
    # 9 samples only A gets right, 1 only B gets right, plus 20 concordant samples.
    a = np.array([True] * 9 + [False] * 1 + [True] * 15 + [False] * 5)
    b = np.array([False] * 9 + [True] * 1 + [True] * 15 + [False] * 5)
    expected = 2 * (math.comb(10, 0) + math.comb(10, 1)) / 2**10
    assert expected == 22 / 1024 == 0.021484375
    assert mcnemar(a, b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar(b, a) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_edge_cases() -> None:
    same = np.array([True, False, True, True])
    assert mcnemar(same, same) == 1.0
    balanced_a = np.array([True] * 5 + [False] * 5)
    assert mcnemar(balanced_a, ~balanced_a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mcnemar([True, False], [True])


def test_holm_hand_examples() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, 1*0.04 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    # m = 4: 0.04, 0.06, 0.06, 0.04 -> monotone 0.04, 0.06, 0.06, 0.06
    np.testing.assert_allclose(holm([0.04, 0.03, 0.02, 0.01]), [0.06, 0.06, 0.06, 0.04])
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.2]), [0.2])


def test_holm_ignores_nan() -> None:
    out = holm([0.02, float("nan"), 0.5])
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.04, 0.5])  # m = 2, not 3
    assert np.isnan(holm([float("nan")])).all()
    assert holm([]).shape == (0,)


def test_inputs_of_any_shape_are_flattened() -> None:
    # a (2, 2) table of per-seed values is four values, for every statistic
    grid = [[1.0, 2.0], [3.0, 4.0]]
    assert mean_ci(grid) == pytest.approx(mean_ci([1.0, 2.0, 3.0, 4.0]))
    a, b = [[3.0, 5.0], [4.0, 6.0]], [[1.0, 4.0], [1.0, 3.0]]
    assert paired_ttest(a, b) == pytest.approx(paired_ttest([3.0, 5.0, 4.0, 6.0], [1.0, 4.0, 1.0, 3.0]), rel=1e-12)
    ca = np.array([[True, True], [True, False]])
    cb = np.array([[False, False], [True, True]])
    assert mcnemar(ca, cb) == pytest.approx(mcnemar(ca.reshape(-1), cb.reshape(-1)), rel=1e-12)
    np.testing.assert_allclose(holm([[0.01, 0.04], [0.03, 0.5]]), [0.04, 0.09, 0.09, 0.5])


def test_mcnemar_and_paired_ttest_take_0_1_and_bool_sequences() -> None:
    # correctness given as 0 / 1 integers is read as booleans (bitwise logic on the integers would be wrong)
    assert mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 1, 1]) == pytest.approx(mcnemar(
        [True, True, True, False, True], [False, False, False, True, True]), rel=1e-12)
    assert mcnemar([1, 1, 1, 0], [0, 0, 0, 1]) == pytest.approx(2 * (1 + 4) / 16)  # 3 vs 1 discordant
    # and as 0.0 / 1.0 floats (a pandas column of correctness), for either argument
    fa, fb = np.array([1.0, 1.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0])
    assert mcnemar(fa, [False, False, False, True]) == mcnemar([True, True, True, False], fb) == pytest.approx(10 / 16)
    # per-seed values given as booleans (1.0 / 0.0) are numbers, not logic
    assert paired_ttest([True, True, False], [False, False, False]) == pytest.approx(
        paired_ttest([1.0, 1.0, 0.0], [0.0, 0.0, 0.0]), rel=1e-12)


def test_nearly_constant_differences_give_a_p_value_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's precision-loss RuntimeWarning must not reach the caller
        p = paired_ttest([1.0 + 1e-15, 1.0, 1.0 + 2e-15], [0.0, 0.0, 0.0])
    assert 0.0 <= p < 1e-6  # differences of ~1 with ~1e-15 spread: overwhelming evidence


def test_error_messages_name_the_problem() -> None:
    with pytest.raises(ValueError, match="^values is empty$"):
        mean_ci([])
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"^confidence must be in \(0, 1\), got "):
            mean_ci([1.0, 2.0], confidence=bad)
    with pytest.raises(ValueError, match="^paired_ttest needs paired samples, got lengths 2 and 3$"):
        paired_ttest([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="^mcnemar needs paired samples, got lengths 2 and 1$"):
        mcnemar([True, False], [True])


# ------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------

N_TEST = 200


def _variant(base: np.ndarray, fix: int, brk: int) -> np.ndarray:
    """A copy of ``base`` that also gets ``fix`` of its errors right and ``brk`` of its hits wrong."""
    out = base.copy()
    wrong, right = np.flatnonzero(~base), np.flatnonzero(base)
    out[wrong[:fix]] = True
    out[right[:brk]] = False
    return out


def _runs() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    changes = {  # seed -> (fix, break) for each non-baseline method
        "attention": {0: (11, 2), 1: (12, 2), 2: (13, 2)},  # +4.5, +5.0, +5.5 points
        "late_concat": {0: (3, 1), 1: (1, 2), 2: (2, 2)},  # +1.0, -0.5, 0.0 points
    }
    params = {"early": 1000, "attention": 1_234_567, "late_concat": 5000}
    per_seed = []
    for seed in range(3):
        base = np.zeros(N_TEST, dtype=bool)
        base[rng.permutation(N_TEST)[:180]] = True  # 90 % accuracy
        per_seed.append({"early": base})
        for method, by_seed in changes.items():
            per_seed[seed][method] = _variant(base, *by_seed[seed])
    # Row order deliberately not grouped: late_concat appears before attention.
    for seed in range(3):
        for method in ("late_concat", "early", "attention"):
            correct = per_seed[seed][method]
            acc = float(correct.mean())
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "accuracy": acc,
                    "macro_f1": acc - 0.01,
                    "params": params[method] + (300 if seed == 2 else 0),
                    "correct": correct,
                }
            )
    return pd.DataFrame(rows)


def test_summarize_statistics_and_flags() -> None:
    s = summarize(_runs(), baseline="early")
    assert s["method"].tolist() == ["early", "late_concat", "attention"]
    assert s["n_seeds"].tolist() == [3, 3, 3]
    for col in ("accuracy_mean", "accuracy_std", "accuracy_ci", "macro_f1_mean", "params", "delta",
                "p_ttest", "p_mcnemar", "p_ttest_holm", "p_mcnemar_holm", "significant", "better", "worse"):
        assert col in s.columns
    row = s.set_index("method")

    assert row.loc["early", "accuracy_mean"] == pytest.approx(0.90)
    assert row.loc["attention", "accuracy_mean"] == pytest.approx(0.95)
    assert row.loc["attention", "accuracy_std"] == pytest.approx(0.005)
    assert row.loc["attention", "macro_f1_mean"] == pytest.approx(0.94)
    assert row.loc["attention", "delta"] == pytest.approx(0.05)
    assert row.loc["late_concat", "delta"] == pytest.approx(0.005 / 3)
    assert row.loc["early", "delta"] == 0.0
    assert row.loc["attention", "params"] == 1_234_567  # median over seeds, seed 2 is +300

    # paired t-test: differences 0.045, 0.05, 0.055 -> t = 0.05 / (0.005 / sqrt(3)), df = 2
    p_t = 2 * stats.t.sf(0.05 / (0.005 / math.sqrt(3)), df=2)
    assert row.loc["attention", "p_ttest"] == pytest.approx(p_t, rel=1e-6)
    # McNemar on pooled predictions: 36 only attention right, 6 only early right
    p_mc = 2 * sum(math.comb(42, k) for k in range(7)) / 2**42
    assert row.loc["attention", "p_mcnemar"] == pytest.approx(p_mc, rel=1e-9)
    # late_concat: 6 vs 5 discordant -> p = 1
    assert row.loc["late_concat", "p_mcnemar"] == pytest.approx(1.0)
    # Holm over two methods: the smaller p doubles, the larger one is at least that
    assert row.loc["attention", "p_ttest_holm"] == pytest.approx(2 * p_t, rel=1e-6)
    assert row.loc["attention", "p_mcnemar_holm"] == pytest.approx(2 * p_mc, rel=1e-9)
    assert row.loc["late_concat", "p_ttest_holm"] >= row.loc["late_concat", "p_ttest"]

    assert row["significant"].tolist() == [False, False, True]
    assert row["better"].tolist() == [False, False, True]
    assert row["worse"].tolist() == [False, False, False]
    for col in ("p_ttest", "p_mcnemar", "p_ttest_holm", "p_mcnemar_holm"):
        assert math.isnan(row.loc["early", col])


def test_summarize_worse_flag_with_other_baseline() -> None:
    s = summarize(_runs(), baseline="attention").set_index("method")
    assert s.index.tolist() == ["attention", "late_concat", "early"]
    assert s.loc["early", "delta"] == pytest.approx(-0.05)
    assert bool(s.loc["early", "worse"]) and not bool(s.loc["early", "better"])
    assert not bool(s.loc["attention", "significant"])


def test_summarize_uses_common_seeds_for_tests() -> None:
    runs = _runs()
    extra = runs[(runs["method"] == "attention") & (runs["seed"] == 0)].copy()
    extra["seed"] = 7
    extra["accuracy"] = 0.10  # would wreck the paired test if it were paired with anything
    s = summarize(pd.concat([runs, extra], ignore_index=True), baseline="early").set_index("method")
    assert s.loc["attention", "n_seeds"] == 4
    p_t = 2 * stats.t.sf(0.05 / (0.005 / math.sqrt(3)), df=2)
    assert s.loc["attention", "p_ttest"] == pytest.approx(p_t, rel=1e-6)


def test_summarize_rejects_bad_input() -> None:
    runs = _runs()
    with pytest.raises(ValueError, match=r"baseline 'concat'.*'early'.*'attention'"):
        summarize(runs, baseline="concat")
    with pytest.raises(ValueError, match="same \\(method, seed\\)"):
        summarize(pd.concat([runs, runs.iloc[:1]], ignore_index=True), baseline="early")
    with pytest.raises(ValueError, match="missing column"):
        summarize(runs.drop(columns=["macro_f1"]), baseline="early")
    bad = runs.copy()
    bad.at[0, "correct"] = bad.at[0, "correct"][:-1]
    with pytest.raises(ValueError, match="aligned"):
        summarize(bad, baseline="early")


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def test_to_markdown() -> None:
    md = to_markdown(summarize(_runs(), baseline="early"), caption="Table 1: mfeat, 3 seeds")
    lines = md.splitlines()
    assert lines[0] == "Table 1: mfeat, 3 seeds"
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + 3  # header, alignment, three methods
    assert "Accuracy (%)" in table[0] and "Macro-F1 (%)" in table[0]
    early, late, attention = table[2:]
    assert early.startswith("| early |") and "(baseline)" in early
    assert "**95.00 ± 0.50**" in attention and "**94.00 ± 0.50**" in attention
    assert "▲" in attention and "1,234,567" in attention and "+5.00" in attention
    assert "**" not in early and "▲" not in late and "▼" not in late
    assert "90.00 ± 0.00" in early
    assert (
        "▲/▼: better/worse than the baseline, paired t-test over seeds and McNemar's test on pooled "
        "test predictions both p < 0.05 after Holm correction across 2 methods" in md
    )


def test_to_markdown_fractions() -> None:
    md = to_markdown(summarize(_runs(), baseline="early"), caption="c", percent=False, show_ci=False)
    assert "**0.9500 ± 0.0050**" in md and "±CI" not in md


def test_to_latex() -> None:
    tex = to_latex(summarize(_runs(), baseline="early"), caption="Results on mfeat_fou", label="tab:mfeat")
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{Results on mfeat\_fou}",
                  r"\label{tab:mfeat}", r"\begin{tabular}{lccr}"):
        assert token in tex
    assert r"\textbf{95.00} $\pm$ 0.50" in tex
    assert r"\underline{90.17} $\pm$" in tex  # late_concat is second best
    assert r"late\_concat &" in tex and "late_concat" not in tex
    assert r"attention$^\blacktriangle$ &" in tex
    assert r"\blacktriangledown" in tex  # explained in the note
    assert "Holm correction across 2 methods" in tex
    worse = to_latex(summarize(_runs(), baseline="attention"), caption="c")
    assert r"early$^\blacktriangledown$ &" in worse


def test_latex_escape() -> None:
    assert latex_escape("a_b & 50% #1 {x} $y ~^\\") == (
        r"a\_b \& 50\% \#1 \{x\} \$y \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def test_to_csv_roundtrip(tmp_path) -> None:
    s = summarize(_runs(), baseline="early")
    s["correct"] = [np.ones(3, dtype=bool)] * len(s)  # arrays are left out
    path = to_csv(s, tmp_path / "out" / "summary.csv")
    back = pd.read_csv(path)
    assert "correct" not in back.columns
    assert back["method"].tolist() == ["early", "late_concat", "attention"]
    assert back["accuracy_mean"].tolist() == pytest.approx(s["accuracy_mean"].tolist())
    assert back["better"].tolist() == [False, False, True]
