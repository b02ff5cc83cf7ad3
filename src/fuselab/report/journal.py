"""The weekly journal: what was tried in a period and how it went, from the store, in English or Chinese.

Per experiment with runs that finished (or failed) in the period: the variants tried, each against its
baseline (mean ± std, delta, significant or not by the paired t-test and McNemar's test, Holm-corrected, as
in the report table), the best method so far and the failed runs. Markdown in the manner of a weekly
report's "工作进展" (progress) section, followed by next steps the store implies (retry, finish, write up).
Numbers are formatted the same in both languages.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

import pandas as pd

from fuselab.experiments.store import Store
from fuselab.report.commands import command, spec_argument, store_args
from fuselab.report.i18n import check_lang, text
from fuselab.errors import ConfigError

__all__ = ["build_journal", "parse_since"]

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(since: str, now: float) -> float:
    """Start of the period as a timestamp: ``7d``, ``36h``, ``2w``, ``90m`` before ``now``, or a date ``2026-11-20``."""
    value = str(since).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([mhdw])", value)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ConfigError(f"--since '{since}' is neither a duration (7d, 36h, 2w) nor a date (2026-11-20)") from None


def _pct(mean: float, std: float) -> str:
    return f"{mean * 100:.2f} ± {std * 100:.2f} %" if not math.isnan(std) else f"{mean * 100:.2f} %"


def _delta(value: float) -> str:
    return f"{value * 100:+.2f} pp"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


def _runs_in_store(st: Store) -> pd.DataFrame:
    with st.connect() as conn:
        rows = conn.execute(
            "SELECT e.experiment, e.run_id, e.method, e.seed, r.status, r.error, r.finished, e.position "
            "FROM experiment_runs e JOIN runs r ON r.id = e.run_id ORDER BY e.experiment, e.position"
        ).fetchall()
    return pd.DataFrame(rows, columns=["experiment", "run_id", "method", "seed", "status", "error", "finished", "position"])


def _experiment_summary(store: Path, name: str, baseline: str, metric: str) -> pd.DataFrame | None:
    from fuselab.experiments.results import comparison_frame
    from fuselab.report.tables import summarize

    frame = comparison_frame(store, name)
    if frame.empty or baseline not in set(frame["method"]):
        return None
    return summarize(frame, baseline=baseline, metrics=("accuracy", "macro_f1"), primary=metric)


def build_journal(store: str | Path, *, since: str = "7d", lang: str = "en", now: float | None = None) -> str:
    """The journal of the period ``since`` (a duration before ``now`` or a date) as Markdown."""
    check_lang(lang)
    st = Store(store)
    if not st.exists():
        raise ConfigError(f"no store at '{store}'; run `fuselab compare` first or pass --store")
    now = dt.datetime.now().timestamp() if now is None else now
    start = parse_since(since, now)
    day = lambda t: dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d")  # noqa: E731
    lines = [f"# {text('journal_title', lang, start=day(start), end=day(now))}", "", f"## {text('progress', lang)}", ""]
    runs = _runs_in_store(st)
    plan: list[str] = []
    item = 0
    for name, exp_runs in runs.groupby("experiment", sort=False):
        finished = exp_runs["finished"].fillna(-math.inf)
        recent = exp_runs[(finished >= start) & (finished <= now) & exp_runs["status"].isin(["done", "failed"])]
        if recent.empty:
            continue
        info = st.experiment(str(name))
        baseline, metric = info["baseline"], info["metric"]
        item += 1
        tried = [m for m in dict.fromkeys(recent["method"]) if m != baseline]
        if tried:
            head = text("exp_line", lang, experiment=name, n=len(tried), runs=len(recent), baseline=baseline)
        else:
            head = text("exp_only_baseline", lang, experiment=name, baseline=baseline, runs=len(recent))
        lines.append(f"- {item}: {head}")
        summary = _experiment_summary(st.root, str(name), baseline, metric)
        if summary is None:
            lines.append(f"  - {text('no_baseline', lang, baseline=baseline)}")
        else:
            by = summary.set_index("method")
            base = by.loc[baseline]
            lines.append(f"  - {text('baseline_line', lang, method=baseline, value=_pct(base[f'{metric}_mean'], base[f'{metric}_std']))}")
            shown = [m for m in tried if m in by.index]
            shown.sort(key=lambda m: -by.loc[m, "delta"])
            counts = {"better": 0, "worse": 0, "same": 0}
            for m in shown:
                r = by.loc[m]
                if math.isnan(r["p_ttest"]) and math.isnan(r["p_mcnemar"]):
                    verdict = text("no_pair", lang)
                else:
                    key = "sig_better" if r["better"] else "sig_worse" if r["worse"] else "not_sig"
                    counts["better" if r["better"] else "worse" if r["worse"] else "same"] += 1
                    verdict = text(key, lang) + text("tests", lang, t=_p(r["p_ttest_holm"]), mc=_p(r["p_mcnemar_holm"]))
                lines.append("  - " + text("variant_line", lang, method=m, value=_pct(r[f"{metric}_mean"], r[f"{metric}_std"]),
                                           delta=_delta(r["delta"]), verdict=verdict))
            if shown:
                lines.append(f"  - {text('summary_line', lang, **counts)}")
            best = summary.loc[summary[f"{metric}_mean"].idxmax()]
            value = _pct(best[f"{metric}_mean"], best[f"{metric}_std"])
            if best["method"] == baseline:
                lines.append(f"  - {text('best_is_baseline', lang, method=baseline, value=value)}")
            else:
                lines.append(f"  - {text('best_line', lang, method=best['method'], value=value, delta=_delta(best['delta']))}")
        failed = recent[recent["status"] == "failed"]
        # commands as they run: the spec by name or path, the store when it is not the default
        compare = lambda: command("compare", spec_argument(store, str(name)), *store_args(store))  # noqa: E731
        if not failed.empty:
            lines.append(f"  - {text('failed_line', lang, n=len(failed))}")
            for r in failed.head(5).itertuples(index=False):
                error = (r.error or "").splitlines()[0] if r.error else "?"
                lines.append(f"    - {text('failed_item', lang, method=r.method, seed=r.seed, error=error)}")
            plan.append(text("plan_retry", lang, experiment=name, command=compare()))
        open_runs = int(exp_runs["status"].isin(["pending", "running"]).sum())
        if open_runs:
            lines.append(f"  - {text('pending_line', lang, n=open_runs)}")
            if failed.empty:
                plan.append(text("plan_finish", lang, experiment=name, command=compare()))
        if summary is not None and failed.empty and not open_runs:
            plan.append(text("plan_report", lang, experiment=name,
                             command=command("report", str(name), *store_args(store), *(["--lang", lang] if lang != "en" else []))))
    if item == 0:
        lines.append(text("nothing", lang))
    if plan:
        lines += ["", f"## {text('plan', lang)}", ""]
        lines += [f"{i}. {p}" for i, p in enumerate(plan, 1)]
    return "\n".join(lines) + "\n"
