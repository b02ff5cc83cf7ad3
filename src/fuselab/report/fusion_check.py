"""The "fusion check" cell of a comparison table: what the runs' fusion diagnostics say about a method.

A run records ``diag_dependence/<m>`` (how much its prediction changes when modality m is permuted across
the test samples), ``diag_stat/<module>/<stat>`` (its operators' own state) and ``diag_problems`` (why it
does not fuse, if it does not); see ``fuselab.models.diagnostics``. Per method the cell shows the range of
the mean dependence over the modalities and the operator state that says whether it fuses (CEN's exchanged
share, the attention paid to other modalities); a method any of whose runs does not fuse is marked, and a
deliberate control (``control: true``) is labelled as one. A run whose diagnostics raised (``diag_error``; the
run itself is kept) is said to have none, so that an empty cell never passes for a clean one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

NOT_FUSING = "⚠ not fusing"
CONTROL = "control"
NO_DIAGNOSTICS = "diagnostics failed"


def _mean(rows: pd.DataFrame, columns: list[str]) -> dict[str, float]:
    out = {}
    for col in columns:
        values = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isnan(values)):
            out[col] = float(np.nanmean(values))
    return out


def _state_text(stats: dict[str, float]) -> list[str]:
    """Short phrases for the operator statistics that say whether a method fuses."""
    parts = []
    exchanged = [v for k, v in stats.items() if k.endswith("/exchanged")]  # per exchange, all its channels
    exchanged = exchanged or [v for k, v in stats.items() if "/exchanged/" in k]  # per modality (epoch_stats)
    if exchanged:
        parts.append(f"exchanged {np.mean(exchanged) * 100:.0f} %")
    cross = [v for k, v in stats.items() if k.endswith("/cross_attention")]
    if cross:
        parts.append(f"cross-attn {np.mean(cross) * 100:.0f} %")
    weights = {k.rsplit("/", 1)[1]: v for k, v in stats.items() if "/weight/" in k}
    if weights:
        parts.append("w " + " ".join(f"{m} {w:.2f}" for m, w in sorted(weights.items())))
    return parts


def fusion_check(rows: pd.DataFrame) -> dict[str, Any]:
    """The fusion check of one method from its runs' rows.

    Returns:
        ``{"fusion_check": cell text, "fusion_problems": "; "-joined problems of any run, "fusion_errors":
        "; "-joined errors of runs whose diagnostics failed, "control": bool}``; an empty cell when the runs
        have no diagnostics (runs stored before they were recorded).
    """
    control = bool("control" in rows.columns and rows["control"].fillna(False).astype(bool).any())
    dep_cols = [c for c in rows.columns if c.startswith("diag_dependence/")]
    stat_cols = [c for c in rows.columns if c.startswith("diag_stat/")]
    problems: list[str] = []
    if "diag_problems" in rows.columns:
        for text in rows["diag_problems"].dropna():
            problems += [p for p in str(text).split("; ") if p]
    problems = list(dict.fromkeys(problems))
    errors: list[str] = []
    if "diag_error" in rows.columns:
        errors = list(dict.fromkeys(str(e) for e in rows["diag_error"].dropna() if str(e)))
    if not dep_cols and not stat_cols and not problems and not errors:
        return {"fusion_check": "", "fusion_problems": "", "fusion_errors": "", "control": control}
    parts = []
    dependence = _mean(rows, dep_cols)
    if dependence:
        lo, hi = min(dependence.values()), max(dependence.values())
        parts.append(f"dep {lo:.2f}" if len(dependence) == 1 else f"dep {lo:.2f}–{hi:.2f}")
    parts += _state_text({c[len("diag_stat/"):]: v for c, v in _mean(rows, stat_cols).items()})
    text = ", ".join(parts)
    if errors:  # some runs (or all) have no diagnostics: the cell describes the others only
        text = f"{NO_DIAGNOSTICS}; {text}" if text else NO_DIAGNOSTICS
    if problems:
        text = f"{NOT_FUSING}; {text}" if text else NOT_FUSING
    if control:
        text = f"{CONTROL}; {text}" if text else CONTROL
    return {"fusion_check": text, "fusion_problems": "; ".join(problems), "fusion_errors": "; ".join(errors),
            "control": control}


def fusion_note(summary: pd.DataFrame) -> str:
    """One sentence explaining the column, and the problems of the methods marked as not fusing."""
    if "fusion_check" not in summary.columns or not summary["fusion_check"].astype(bool).any():
        return ""
    note = ("Fusion check: dep = range over the modalities of the mean change of the predicted distribution "
            "(total variation) when that modality is permuted across test samples; operator state from the "
            "trained model (exchanged channels, attention paid to other modalities, modality weights).")
    flagged = [f"{r['method']}: {r['fusion_problems']}" for _, r in summary.iterrows() if r.get("fusion_problems")]
    if flagged:
        note += f" {NOT_FUSING}: " + "; ".join(flagged) + "."
    failed = [f"{r['method']}: {r['fusion_errors']}" for _, r in summary.iterrows() if r.get("fusion_errors")]
    if failed:
        note += f" {NO_DIAGNOSTICS[0].upper()}{NO_DIAGNOSTICS[1:]} (the runs are kept): " + "; ".join(failed) + "."
    return note


__all__ = ["CONTROL", "NOT_FUSING", "NO_DIAGNOSTICS", "fusion_check", "fusion_note"]
