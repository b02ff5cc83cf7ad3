"""Comparison reports: statistics over seeds and tests against a baseline, rendered as tables."""

from fuselab.report.stats import holm, mcnemar, mean_ci, paired_ttest
from fuselab.report.tables import latex_escape, summarize, to_csv, to_latex, to_markdown

__all__ = [
    "holm",
    "latex_escape",
    "mcnemar",
    "mean_ci",
    "paired_ttest",
    "summarize",
    "to_csv",
    "to_latex",
    "to_markdown",
]
