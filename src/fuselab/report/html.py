"""The HTML report: one self-contained file (no network, no scripts) with the comparison table, the plots,
the network figure, the configs and the environment the runs ran on.

Images are embedded: PNG plots as base64 ``data:`` URIs, the network figure as inline SVG.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fuselab.report.fusion_check import fusion_note
from fuselab.report import tables
from fuselab.report.i18n import column_heading, text
from fuselab.report.tables import DOWN_MARK, ONE_SEED, UP_MARK, table_header

__all__ = ["render_html", "summary_table_html"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;
     margin:2em auto;max-width:1100px;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em;border-bottom:2px solid #2F6DA3;padding-bottom:.2em}
h2{font-size:1.2em;margin-top:1.6em;color:#2F6DA3}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}
th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{border-bottom:2px solid #444;background:#f6f8fa}
td:first-child,th:first-child{text-align:left}
tr.baseline td{background:#f3f7fb}
td.best{font-weight:bold}
td.second{text-decoration:underline}
.up{color:#1E8A55}.down{color:#C0392B}.warn{color:#C0392B;font-weight:bold}
caption{caption-side:top;text-align:left;font-weight:bold;padding-bottom:.4em}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figure svg{width:100%;max-width:900px;height:auto}
figcaption{font-size:.88em;color:#555}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;font-size:.82em}
.note{font-size:.85em;color:#555}
table.kv td{text-align:left}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.2f}"


def summary_table_html(summary: pd.DataFrame, *, caption: str, lang: str = "en",
                       flops: Mapping[str, float] | None = None, missing: Sequence[str] = ()) -> str:
    """The comparison table with the Markdown table's columns (:func:`fuselab.report.tables.table_header`):
    mean ± std (%) per metric and its ±CI, parameters, the cost columns (FLOPs, latency with its spread,
    memory), Δ, the marks against the baseline and the fusion check; best bold, second underlined, a method
    with one seed ``mean (n = 1)``. ``flops`` fills FLOPs the summary lacks; ``missing`` lines (what the
    table leaves out) come first, in a warning paragraph above the table."""
    if flops:
        summary = summary.copy()
        counted = summary["method"].map(lambda m: flops.get(m, math.nan)).astype(float)
        summary["flops"] = summary["flops"].fillna(counted) if "flops" in summary else counted
    metrics = list(summary.attrs.get("metrics") or ["accuracy"])
    baseline = summary.attrs.get("baseline", summary["method"].iloc[0])
    head = [column_heading(h, lang) for h in table_header(summary, metrics=metrics)]
    costs = tables._cost_columns(summary)
    check = tables._has_fusion_check(summary)
    columns = tables._value_columns(summary, metrics)  # the metrics, then the transfer columns
    ranks = {m: tables._ranks(summary[f"{m}_mean"].to_numpy(dtype=float) * 100, 2) for m in columns}
    rows = []
    for i, r in enumerate(summary.to_dict("records")):
        is_base = r["method"] == baseline
        cells = [f"<td>{_esc(r['method'])}</td>", f"<td>{int(r['n_seeds'])}</td>"]
        for m in columns:
            cls = {1: ' class="best"', 2: ' class="second"'}.get(int(ranks[m][i]), "")
            spread = f"({ONE_SEED})" if tables._cell_seeds(r, m) == 1 else f"± {_pct(r[f'{m}_std'])}"
            value = _pct(r[f"{m}_mean"])
            mark = tables._transfer_mark(r, m)
            mark = {UP_MARK: f' <span class="up">{UP_MARK}</span>',
                    DOWN_MARK: f' <span class="down">{DOWN_MARK}</span>'}.get(mark, "")
            cells.append(f"<td{cls}>{value} {spread}{mark}</td>" if value != "–" else "<td>–</td>")
            ci = r[f"{m}_ci"]
            cells.append(f"<td>{'–' if ci is None or math.isnan(ci) else f'±{ci * 100:.2f}'}</td>")
        cells.append(f"<td>{_esc(tables._fmt_params(r.get('params', math.nan)))}</td>")
        cells += [f"<td>{_esc(tables._fmt_cost_cell(r, col, kind))}</td>" for col, _, kind in costs]
        delta = "–" if is_base else f"{r['delta'] * 100:+.2f}"
        cells.append(f"<td>{delta}</td>")
        if is_base:
            mark = _esc(text("baseline_mark", lang))
        elif r["better"]:
            mark = f'<span class="up">{UP_MARK}</span>'
        elif r["worse"]:
            mark = f'<span class="down">{DOWN_MARK}</span>'
        else:
            mark = ""
        cells.append(f"<td>{mark}</td>")
        if check:
            warn = ' class="warn"' if r.get("fusion_problems") else ""
            cells.append(f"<td{warn}>{_esc(r.get('fusion_check') or '–')}</td>")
        rows.append(f'<tr{" class=baseline" if is_base else ""}>{"".join(cells)}</tr>')
    n = int((summary["method"] != baseline).sum())
    notes = [text("md_values", lang, baseline=baseline), text("md_marks", lang, alpha=f"{summary.attrs.get('alpha', 0.05):g}", n=n)]
    if tables._transfers(summary):
        notes.append(tables._transfer_note(summary, f"{summary.attrs.get('alpha', 0.05):g}"))
    if tables._has_one_seed(summary):
        notes.append(text("one_seed_note", lang))
    in_sample = tables.in_sample_methods(summary)
    if in_sample:
        notes.append(text("in_sample_note", lang, methods=", ".join(in_sample)))
    if tables._has_latency_spread(summary, costs):
        notes.append(text("latency_note", lang))
        unsteady = tables.unsteady_latencies(summary)
        if unsteady:
            notes.append(text("unsteady_note", lang, limit=f"{tables.LATENCY_SPREAD_LIMIT * 100:.0f}",
                              methods=", ".join(unsteady)))
    if check:
        notes.append(fusion_note(summary))
    warning = "".join(f'<p class="warn incomplete">{_esc(line)}</p>' for line in missing)
    return (
        warning + f'<table id="results"><caption>{_esc(caption)}</caption>\n<thead><tr>'
        + "".join(f"<th>{_esc(h)}</th>" for h in head)
        + "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
        + "".join(f'<p class="note">{_esc(n_)}</p>' for n_ in notes)
    )


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _inline_svg(path: Path) -> str:
    svg = Path(path).read_text()
    start = svg.find("<svg")  # drop the XML prolog and doctype: inline SVG takes the element only
    return svg[start:] if start >= 0 else svg


def _kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in pairs) + "</table>"


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return [(prefix, value)]


def render_html(*, title: str, lang: str, table_html: str, plots: Mapping[str, Mapping[str, Any]],
                figure: Path | None, figure_caption: str, base_config: Mapping[str, Any], seed: int,
                overrides: Mapping[str, Mapping[str, Any]], spec_yaml: str,
                environments: Sequence[Mapping[str, Any]], failed: Sequence[Mapping[str, Any]],
                generated: str, robustness: tuple[str, Path | None] | None = None) -> str:
    """The whole report page as a string (write it with ``Path.write_text(..., encoding="utf-8")``)."""
    import yaml

    parts = [f"<h1>{_esc(title)}</h1>", f"<h2>{_esc(text('results', lang))}</h2>", table_html]
    if failed:
        parts.append(f"<h2>{_esc(text('failed_runs', lang))}</h2><ul>")
        parts += [f"<li>{_esc(f['method'])} (seed {f['seed']}): {_esc(f['error'])}</li>" for f in failed]
        parts.append("</ul>")
    if plots:
        parts.append(f"<h2>{_esc(text('plots', lang))}</h2>")
        from fuselab.report.style import plot_lang

        if plot_lang(lang) != lang:  # no font for the report's language: the images keep English text
            parts.append(f'<p id="plots-english">{_esc(text("plots_english", lang))}</p>')
        for name, plot in plots.items():
            png = next((p for p in plot["files"] if str(p).endswith(".png")), None)
            if png is not None:
                parts.append(f'<figure id="plot-{_esc(name)}">{_img(png, name)}<figcaption>{_esc(plot["caption"])}</figcaption></figure>')
    if robustness is not None:  # ``fuselab robustness`` has evaluated the runs: its table and curves
        table, curves = robustness
        parts.append(f"<h2>{_esc(text('robustness', lang))}</h2>")
        parts.append(table)
        if curves is not None:
            parts.append(f'<figure id="plot-robustness-modalities">{_img(Path(curves), "robustness per modality")}'
                         f'<figcaption>{_esc(text("cap_robustness_modalities", lang))}</figcaption></figure>')
    if figure is not None:
        parts.append(f"<h2>{_esc(text('network', lang))}</h2>")
        parts.append(f'<figure id="network">{_inline_svg(figure)}<figcaption>{_esc(figure_caption)}</figcaption></figure>')
    parts.append(f"<h2>{_esc(text('configs', lang))}</h2>")
    parts.append(f"<h3>{_esc(text('methods_overrides', lang))}</h3>")
    parts.append(_kv_table([(m, ", ".join(f"{k}={v}" for k, v in o.items()) or "–") for m, o in overrides.items()]))
    parts.append(f"<h3>{_esc(text('base_config', lang, seed=seed))}</h3>")
    parts.append(f"<pre>{_esc(yaml.safe_dump(dict(base_config), sort_keys=False, allow_unicode=True))}</pre>")
    parts.append(f"<h3>{_esc(text('spec', lang))}</h3><pre>{_esc(spec_yaml)}</pre>")
    parts.append(f"<h2>{_esc(text('environment', lang))}</h2>")
    for env in environments:
        runs = env.get("_runs")
        if runs is not None and len(environments) > 1:
            parts.append(f'<p class="note">{runs} runs:</p>')
        parts.append(_kv_table([(k, v) for k, v in _flatten("", {k: v for k, v in env.items() if k != "_runs"})]))
    parts.append(f'<p class="note">{_esc(generated)}</p>')
    lang_attr = "zh-CN" if lang == "zh" else "en"
    return (
        f'<!DOCTYPE html>\n<html lang="{lang_attr}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n'
        + "\n".join(parts) + "\n</body></html>\n"
    )
