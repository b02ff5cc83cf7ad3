"""The comparison report of one experiment: statistics and tables written to ``<store>/<experiment>/report/``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from fuselab.experiments.results import comparison_frame
from fuselab.experiments.store import Store
from fuselab.report.tables import summarize, to_csv, to_latex, to_markdown
from fuselab.train.config import ConfigError


@dataclasses.dataclass
class Report:
    summary: pd.DataFrame
    markdown: str
    files: dict[str, Path]
    failed: int


def _caption(experiment: str, spec: dict, seeds: list[int]) -> str:
    base = spec.get("base") or {}
    data = (base.get("data") or {}).get("name", "mfeat")
    epochs = (base.get("train") or {}).get("epochs")
    budget = f"equal epochs ({epochs})" if epochs else "equal epochs"
    seed_text = ", ".join(map(str, seeds))
    return (
        f"{experiment}: test accuracy and macro-F1 (%) on {data}, mean ± std over {len(seeds)} seeds "
        f"({seed_text}); budget: {budget}"
    )


def build_report(store: str | Path, experiment: str) -> Report:
    """Summarise an experiment from the store and write Markdown, LaTeX and CSV tables."""
    st = Store(store)
    info = st.experiment(experiment)
    frame = comparison_frame(store, experiment)
    runs = st.experiment_runs(experiment)
    failed = sum(r["status"] == "failed" for r in runs)
    if frame.empty:
        raise ConfigError(f"experiment '{experiment}' has no finished runs yet; run `fuselab compare {experiment}`")
    if info["baseline"] not in set(frame["method"]):
        raise ConfigError(f"the baseline '{info['baseline']}' of '{experiment}' has no finished run yet")
    summary = summarize(frame, baseline=info["baseline"], metrics=("accuracy", "macro_f1"), primary=info["metric"])
    seeds = sorted(frame["seed"].unique().tolist())
    caption = _caption(experiment, info["spec"], seeds)
    markdown = to_markdown(summary, caption=caption)
    latex = to_latex(summary, caption=caption, label=f"tab:{experiment}")
    out = st.report_dir(experiment)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "results.md", "latex": out / "results.tex", "csv": out / "results.csv"}
    files["markdown"].write_text(markdown + "\n")
    files["latex"].write_text(latex + "\n")
    to_csv(summary, files["csv"])
    return Report(summary=summary, markdown=markdown, files=files, failed=failed)
