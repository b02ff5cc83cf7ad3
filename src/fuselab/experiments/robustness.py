"""Robustness of the stored models to a noisy, thinned or missing modality: curves and their areas.

``fuselab robustness EXPERIMENT`` evaluates the best checkpoint of every finished run of an experiment on its
test split with **one modality corrupted at a time**, at increasing levels in [0, 1]
(``fuselab.data.corruptions``):

- ``noise``: Gaussian noise of standard deviation ``level * noise_scale * sigma_m`` (``sigma_m``: the
  modality's standard deviation on its training split; vectors, tokens and maps alike, spectrograms included);
- ``drop``: each token (vector feature, map position) of the modality set to zero with probability ``level``;
- ``missing``: a share ``level`` of the test samples lose the modality entirely: it is left out of the input
  (mode ``omit``) when the model's merge declares ``supports_missing`` (``fusion_info``), else set to zero
  (mode ``zeros``; ``missing="zeros"`` uses zeros for every model; ``missing="features"`` zeroes the
  modality's stream at the encoder's output, exactly as ``train.modality_dropout`` drops it in training).

Level 0 is the clean test split: it reproduces the run's stored test accuracy exactly (same weights, split and
evaluation batch size, on the same kind of device). A corruption's random draws depend on the seed, the
corruption, the modality and the level only, so every method of a seed sees the same corrupted test set.

From each curve, as MultiBench defines them (Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal
Representation Learning", NeurIPS 2021 Datasets and Benchmarks; ``eval_scripts/robustness.py`` of
github.com/pliang279/MultiBench):

- **relative robustness** ``RR(f)``: the area under the accuracy-vs-level curve, levels normalised to [0, 1]
  (trapezoid rule; MultiBench's ``relative_robustness_helper`` with its 11 levels 0, 0.1, ..., 1);
- **effective robustness** ``ER(f)``: the accuracy above what the baseline's curve predicts once shifted to the
  method's clean accuracy: ``f(l) - [b(l) + f(0) - b(0)]`` (MultiBench's ``effective_robustness_helper``, with
  the late-fusion baseline there and the experiment's baseline here), integrated over the same [0, 1] axis,
  i.e. ``ER = RR(f) - RR(b) - (f(0) - b(0))``. MultiBench sums the differences over its 11 levels instead of
  integrating them (the same up to the endpoints' weights and a factor of about 10) and then min-max
  normalises both measures across the methods of a task; fuselab reports them unnormalised, in accuracy
  units (a table in % and percentage points), so that they mean the same in every comparison.

``ER`` pairs each run with the baseline's run of the same seed (the same split and the same corrupted test
set); both measures are computed per run and then averaged over seeds.

What is written: ``runs/<id>/robustness.csv`` (columns ``corruption``, ``modality``, ``mode``, ``level``,
``accuracy``: the curves, which ``fuselab.report`` draws) and ``runs/<id>/robustness.json`` (the settings,
and the stored and re-evaluated clean accuracy), and ``<store>/<experiment>/report/robustness.{md,csv}``
(the tables). ``fuselab report`` then adds the table and the curves to the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from fuselab.data.core import DataBundle, ModalTensors
from fuselab.data.corruptions import CORRUPTIONS, corrupt, missing_mask, modality_sigma
from fuselab.experiments.store import Store
from fuselab.models.multistream import MultiStream
from fuselab.errors import ConfigError

DEFAULT_LEVELS = tuple(round(i / 10, 1) for i in range(11))  # MultiBench's 0, 0.1, ..., 1


@dataclasses.dataclass(frozen=True)
class RobustnessSettings:
    """What ``evaluate_run`` does; stored beside the curves so that a re-run can skip what is up to date."""

    levels: tuple[float, ...] = DEFAULT_LEVELS
    corruptions: tuple[str, ...] = CORRUPTIONS
    missing: str = "auto"  # auto: omit where the merge supports a missing modality, zeros elsewhere | zeros | features
    noise_scale: float = 1.0  # noise standard deviation at level 1, in units of the modality's deviation
    device: str = "cpu"

    def __post_init__(self) -> None:
        levels = [float(v) for v in self.levels]
        if len(levels) < 2 or levels[0] != 0 or any(b <= a for a, b in zip(levels, levels[1:])) or levels[-1] > 1:
            raise ConfigError(f"robustness levels must rise from 0 to at most 1 (at least two), got {levels}")
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown or not self.corruptions:
            raise ConfigError(f"unknown corruption '{unknown[0] if unknown else ''}'; corruptions are {', '.join(CORRUPTIONS)}")
        if self.missing not in ("auto", "zeros", "features"):
            raise ConfigError(f"missing mode must be auto, zeros or features, got {self.missing!r}")
        if not self.noise_scale > 0:
            raise ConfigError(f"noise scale must be positive, got {self.noise_scale}")
        object.__setattr__(self, "levels", tuple(levels))
        object.__setattr__(self, "corruptions", tuple(self.corruptions))

    def key(self) -> dict[str, Any]:
        """The settings that determine the curves (the device does not, up to rounding)."""
        return {"levels": list(self.levels), "corruptions": list(self.corruptions), "missing": self.missing,
                "noise_scale": self.noise_scale}


# -- evaluation -------------------------------------------------------------------------------------------


def supports_missing(model: nn.Module) -> bool:
    """Can the model run with a modality left out? Its merge must declare ``supports_missing``, and so must
    its exchange, if it has one (an exchange between the streams needs all of them)."""
    merge = getattr(model, "merge", None)
    exchange = getattr(model, "exchange", None)
    return bool(getattr(merge, "supports_missing", False)) and (
        exchange is None or bool(getattr(exchange, "supports_missing", False)))


def _generator(seed: int, *keys: Any) -> torch.Generator:
    text = "|".join(str(k) for k in (seed, *keys))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


@torch.no_grad()
def _logits(model: nn.Module, x: dict[str, Tensor], y: Tensor, batch_size: int) -> Tensor:
    from fuselab.train.loop import predict

    return predict(model, ModalTensors(x, y), batch_size)


@torch.no_grad()
def logits_omitting(model: nn.Module, split: ModalTensors, modality: str, mask: Tensor, batch_size: int) -> Tensor:
    """Logits of a split in which the samples where ``mask`` is true have ``modality`` left out of the input."""
    mask = mask.to(split.y.device)
    parts = {}
    for drop, index in ((False, torch.nonzero(~mask).flatten()), (True, torch.nonzero(mask).flatten())):
        if len(index):
            x = {m: v[index] for m, v in split.x.items() if not (drop and m == modality)}
            parts[drop] = (index, _logits(model, x, split.y[index], batch_size))
    first = next(iter(parts.values()))[1]
    out = first.new_empty((len(split), *first.shape[1:]))
    for index, logits in parts.values():
        out[index] = logits
    return out


@torch.no_grad()
def logits_dropping_features(model: nn.Module, split: ModalTensors, modality: str, mask: Tensor, batch_size: int) -> Tensor:
    """Logits of a split in which the samples where ``mask`` is true lose ``modality`` the way modality dropout
    drops it in training: its stream zeroed at the encoder's output (``MultiStream``'s ``keep`` masks)."""
    model.eval()
    keep = (~mask).float().to(split.y.device)
    out, start = [], 0
    for x, _ in split.batches(batch_size):
        n = len(next(iter(x.values())))
        out.append(model(x, keep={modality: keep[start : start + n]}).logits.float())
        start += n
    return torch.cat(out)


def evaluate_model(model: nn.Module, data: DataBundle, settings: RobustnessSettings, *, seed: int,
                   batch_size: int) -> tuple[pd.DataFrame, tuple[Tensor, Tensor]]:
    """The curves of one trained model on ``data.test``: rows (corruption, modality, mode, level, logits) are
    reduced to predicted and true classes (``fuselab.metrics.predictions``). Returns the rows with ``pred``
    and ``true`` tensors per row (``accuracy`` is computed by the caller, after pooling folds) and the clean
    (level 0) predictions."""
    from fuselab.metrics import predictions

    model.eval()
    test = data.test
    clean = predictions(data.task, _logits(model, test.x, test.y, batch_size), test.y)
    omit = settings.missing == "auto" and supports_missing(model)
    features = settings.missing == "features"
    if features and not isinstance(model, MultiStream):
        raise ConfigError("--missing features needs a fuselab MultiStream model (it zeroes the stream, not the input)")
    rows = []
    for corruption in settings.corruptions:
        for modality in data.modalities:
            mode = ("features" if features else "omit" if omit else "zeros") if corruption == "missing" else ""
            sigma = modality_sigma(data.train.x[modality]) if corruption == "noise" else 1.0
            for li, level in enumerate(settings.levels):
                if level == 0:
                    pred, true = clean
                else:
                    gen = _generator(seed, corruption, modality, li)
                    if corruption == "missing" and (omit or features):
                        mask = missing_mask(len(test), level, generator=gen)
                        drop = logits_dropping_features if features else logits_omitting
                        logits = drop(model, test, modality, mask, batch_size)
                    else:
                        x = dict(test.x)
                        x[modality] = corrupt(x[modality], corruption, level, sigma=sigma,
                                              scale=settings.noise_scale, generator=gen)
                        logits = _logits(model, x, test.y, batch_size)
                    pred, true = predictions(data.task, logits, test.y)
                rows.append({"corruption": corruption, "modality": modality, "mode": mode, "level": level,
                             "pred": pred.cpu(), "true": true.cpu()})
    return pd.DataFrame(rows), (clean[0].cpu(), clean[1].cpu())


def _accuracy(task: str, pred: Tensor, true: Tensor, num_classes: int) -> float:
    from fuselab.metrics import prediction_metrics

    return float(prediction_metrics(task, pred, true, num_classes)["accuracy"])


def evaluate_run(cfg: Any, state: dict[str, Tensor], settings: RobustnessSettings) -> tuple[pd.DataFrame, float]:
    """The robustness curves of one run from its resolved config and best weights: a frame with columns
    ``corruption``, ``modality``, ``mode``, ``level``, ``accuracy``, and the clean test accuracy. A
    cross-validated run is evaluated fold by fold and its predictions pooled, as training pooled them."""
    from fuselab.train.loop import autocast
    from fuselab.train.session import build_checked_model, build_data, fold_state, setup_process

    setup_process()  # as in training: the clean accuracy must be reproduced bit for bit
    device = torch.device(settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(int(cfg.seed))
    data = build_data(cfg)
    parts = data.folds or [data]
    batch_size = int(cfg.train.eval_batch_size)
    frames, cleans = [], []
    for i, part in enumerate(parts):
        model = build_checked_model(cfg, part)
        model.load_state_dict(fold_state(state, i, len(parts)))
        model.to(device)
        with autocast(str(cfg.train.get("precision", "32-true")), device):  # the run's mixed precision, as it evaluated
            frame, clean = evaluate_model(model, part.to(device), settings, seed=int(cfg.seed) + 1000 * i, batch_size=batch_size)
        frames.append(frame)
        cleans.append(clean)
    keys = ["corruption", "modality", "mode", "level"]
    rows = []
    for j in range(len(frames[0])):
        pred = torch.cat([f["pred"].iloc[j] for f in frames])
        true = torch.cat([f["true"].iloc[j] for f in frames])
        row = {k: frames[0][k].iloc[j] for k in keys}
        row["accuracy"] = _accuracy(data.task, pred, true, data.num_classes)
        rows.append(row)
    clean_acc = _accuracy(data.task, torch.cat([c[0] for c in cleans]), torch.cat([c[1] for c in cleans]), data.num_classes)
    return pd.DataFrame(rows, columns=[*keys, "accuracy"]), clean_acc


# -- areas ---------------------------------------------------------------------------------------------------


def relative_robustness(levels: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under the accuracy-vs-level curve over levels normalised to [0, 1] (trapezoid rule)."""
    x = np.asarray(levels, dtype=float)
    y = np.asarray(accuracy, dtype=float)
    span = x[-1] - x[0]
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / span)


def effective_robustness(levels: Sequence[float], accuracy: Sequence[float], baseline: Sequence[float]) -> float:
    """Area of ``f(l) - [b(l) + f(0) - b(0)]``: robustness beyond the baseline's, at equal clean accuracy."""
    f = np.asarray(accuracy, dtype=float)
    b = np.asarray(baseline, dtype=float)
    return relative_robustness(levels, (f - b) - (f[0] - b[0]))  # exactly 0 for the baseline itself


def robustness_areas(curves: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per method, seed, corruption and modality: clean accuracy, relative and effective robustness.

    ``curves`` has columns method, seed, corruption, modality, level, accuracy. ``ER`` is NaN where the
    baseline has no curve for that seed (or the levels differ)."""
    rows = []
    base = {(s, c, m): g.sort_values("level") for (meth, s, c, m), g in curves.groupby(["method", "seed", "corruption", "modality"])
            if meth == baseline}
    for (method, seed, corruption, modality), g in curves.groupby(["method", "seed", "corruption", "modality"], sort=False):
        g = g.sort_values("level")
        levels, acc = g["level"].to_numpy(), g["accuracy"].to_numpy()
        b = base.get((seed, corruption, modality))
        er = math.nan
        if b is not None and np.array_equal(b["level"].to_numpy(), levels):
            er = effective_robustness(levels, acc, b["accuracy"].to_numpy())
        rows.append({"method": method, "seed": seed, "corruption": corruption, "modality": modality,
                     "clean": float(acc[0]), "rr": relative_robustness(levels, acc), "er": er,
                     "worst": float(acc[-1])})
    return pd.DataFrame(rows)


def robustness_table(areas: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per method: clean accuracy and, per corruption, RR and ER averaged over modalities, then mean and std
    over seeds (fractions; the Markdown writer shows % and percentage points)."""
    per_seed = areas.groupby(["method", "seed", "corruption"], sort=False)[["clean", "rr", "er"]].mean().reset_index()
    methods = list(order) if order else list(dict.fromkeys(areas["method"]))
    methods = [m for m in methods if m in set(areas["method"])]
    corruptions = list(dict.fromkeys(areas["corruption"]))
    rows = []
    for method in methods:
        part = per_seed[per_seed["method"] == method]
        clean = part.groupby("seed")["clean"].first()
        row: dict[str, Any] = {"method": method, "seeds": int(clean.size),
                               "clean_mean": clean.mean(), "clean_std": clean.std(ddof=1) if clean.size > 1 else math.nan}
        for c in corruptions:
            pc = part[part["corruption"] == c]
            for k in ("rr", "er"):
                row[f"{c}_{k}_mean"] = pc[k].mean()
                row[f"{c}_{k}_std"] = pc[k].std(ddof=1) if len(pc) > 1 else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["corruptions"] = corruptions
    return table


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(mean * scale)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std * scale:.{digits}f}"
    return text


def table_html(table: pd.DataFrame, baseline: str, *, caption: str = "") -> str:
    """The summary table as an HTML table (the same cells as ``table_markdown``; best RR in bold)."""
    from html import escape

    corruptions = table.attrs.get("corruptions") or sorted({c.rsplit("_", 2)[0] for c in table.columns if c.endswith("_rr_mean")})
    head = ["Method", "Seeds", "Clean acc. (%)"]
    for c in corruptions:
        head += [f"{c} RR (%)", f"{c} ER (pp)"]
    best = {c: table[f"{c}_rr_mean"].max() for c in corruptions}
    rows = []
    for r in table.to_dict("records"):
        cells = [escape(r["method"] + (" (baseline)" if r["method"] == baseline else "")), str(r["seeds"]),
                 _pm(r["clean_mean"], r["clean_std"])]
        for c in corruptions:
            rr = _pm(r[f"{c}_rr_mean"], r[f"{c}_rr_std"])
            cells.append(f"<b>{rr}</b>" if r[f"{c}_rr_mean"] == best[c] else rr)
            cells.append("0 (ref.)" if r["method"] == baseline else _pm(r[f"{c}_er_mean"], r[f"{c}_er_std"], sign=True))
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    return (f'<table id="robustness"><caption>{escape(caption)}</caption><thead><tr>'
            + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>\n")


def table_markdown(table: pd.DataFrame, baseline: str, *, caption: str = "") -> str:
    """The summary table in Markdown: clean accuracy (%), per corruption RR (%) and ER (pp), best RR in bold."""
    corruptions = table.attrs.get("corruptions") or sorted({c.rsplit("_", 2)[0] for c in table.columns if c.endswith("_rr_mean")})
    head = ["Method", "Seeds", "Clean acc. (%)"]
    for c in corruptions:
        head += [f"{c} RR (%)", f"{c} ER (pp)"]
    lines = ([caption, ""] if caption else []) + ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    best = {c: table[f"{c}_rr_mean"].max() for c in corruptions}
    for r in table.to_dict("records"):
        cells = [r["method"] + (" (baseline)" if r["method"] == baseline else ""), str(r["seeds"]), _pm(r["clean_mean"], r["clean_std"])]
        for c in corruptions:
            rr = _pm(r[f"{c}_rr_mean"], r[f"{c}_rr_std"])
            cells.append(f"**{rr}**" if r[f"{c}_rr_mean"] == best[c] else rr)
            cells.append("0 (ref.)" if r["method"] == baseline else _pm(r[f"{c}_er_mean"], r[f"{c}_er_std"], sign=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def modality_markdown(areas: pd.DataFrame, corruption: str, *, order: Sequence[str] | None = None,
                      measure: str = "rr") -> str:
    """Methods x modalities for one corruption: ``rr`` (%) or ``er`` (pp), mean over seeds."""
    part = areas[areas["corruption"] == corruption]
    means = part.groupby(["method", "modality"])[measure].mean().unstack("modality")
    methods = [m for m in (order or means.index) if m in means.index]
    mods = list(means.columns)
    lines = ["| Method | " + " | ".join(mods) + " |", "|---|" + "|".join(["---:"] * len(mods)) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_pm(means.loc[m, c], None, sign=measure == "er") for c in mods) + " |")
    return "\n".join(lines)


def legend(settings_key: dict[str, Any] | None, baseline: str) -> str:
    """The note under the tables: what RR and ER are and how the corruptions were made."""
    scale = (settings_key or {}).get("noise_scale", 1.0)
    how = {"zeros": "its input set to zero", "features": "its stream zeroed at the encoder's output, as modality dropout"}.get(
        (settings_key or {}).get("missing", "auto"), "left out where the merge supports it, else its input set to zero")
    return (f"RR: relative robustness, the area under the test-accuracy-vs-level curve over levels 0-1 (%); "
            f"ER: effective robustness, RR minus what {baseline}'s curve shifted to the method's clean accuracy "
            f"predicts (percentage points; MultiBench, Liang et al. 2021). Both averaged over modalities (one "
            f"modality corrupted at a time), then mean ± std over seeds. noise: Gaussian, std = level x {scale:g} x "
            f"the modality's std; drop: each token / feature / position zeroed with probability = level; missing: "
            f"a share = level of the test samples without the modality ({how}).")


# -- the store -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RobustnessResult:
    curves: pd.DataFrame  # method, seed, run_id, corruption, modality, mode, level, accuracy
    areas: pd.DataFrame  # method, seed, corruption, modality, clean, rr, er, worst
    table: pd.DataFrame
    markdown: str
    files: dict[str, Path]
    errors: list[dict[str, Any]]  # runs that could not be evaluated: method, seed, error
    evaluated: int
    cached: int


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_curves(run_dir: Path) -> pd.DataFrame | None:
    file = Path(run_dir) / "robustness.csv"
    if not file.is_file():
        return None
    frame = pd.read_csv(file, keep_default_na=False)
    if "modality" not in frame:
        frame["modality"] = "all"
    return frame


def run_robustness(store: str | Path, experiment: str, settings: RobustnessSettings | None = None, *,
                   force: bool = False, on_run: Callable[[dict[str, Any], str], None] | None = None) -> RobustnessResult:
    """Evaluate every finished run of ``experiment`` (runs whose curves are up to date are read back unless
    ``force``), write the curves into the run folders and the tables into the experiment's report folder."""
    settings = settings or RobustnessSettings()
    st = Store(store)
    info = st.experiment(experiment)
    done = [r for r in st.experiment_runs(experiment) if r["status"] == "done"]
    if not done:
        raise ConfigError(f"experiment '{experiment}' has no finished runs yet; run `fuselab compare {experiment}`")
    parts, errors, evaluated, cached = [], [], 0, 0
    for run in done:
        folder = st.run_dir(run["run_id"])
        meta_file = folder / "robustness.json"
        curves = read_curves(folder) if not force else None
        if curves is not None and meta_file.is_file() and json.loads(meta_file.read_text()).get("settings") == settings.key():
            cached += 1
            status = "cached"
        else:
            checkpoint = folder / "checkpoint.pt"
            if not checkpoint.is_file():
                errors.append({"method": run["method"], "seed": run["seed"], "error": "no checkpoint.pt (train.checkpoint was off)"})
                if on_run:
                    on_run(run, "failed")
                continue
            try:
                cfg = OmegaConf.load(folder / "config.yaml")
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
                curves, clean = evaluate_run(cfg, state, settings)
            except Exception as exc:  # noqa: BLE001 - one run that cannot be rebuilt must not stop the others
                errors.append({"method": run["method"], "seed": run["seed"], "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
                if on_run:
                    on_run(run, "failed")
                continue
            stored = (run["metrics"] or {}).get("test_accuracy")
            _write_atomic(folder / "robustness.csv", curves.to_csv(index=False))
            _write_atomic(folder / "robustness.json", json.dumps(
                {"settings": settings.key(), "device": settings.device, "clean_accuracy": clean,
                 "stored_test_accuracy": stored, "reproduced": stored is not None and clean == stored}, indent=2))
            evaluated += 1
            status = "done"
        parts.append(curves.assign(method=run["method"], seed=run["seed"], run_id=run["run_id"]))
        if on_run:
            on_run(run, status)
    if not parts:
        raise ConfigError(f"no run of '{experiment}' could be evaluated: {errors[0]['error']}")
    curves = pd.concat(parts, ignore_index=True)
    order = list(dict.fromkeys(r["method"] for r in done))
    areas = robustness_areas(curves, info["baseline"])
    table = robustness_table(areas, order)
    markdown, files = write_tables(st.report_dir(experiment), experiment, info["baseline"], areas, table, settings.key(), order)
    return RobustnessResult(curves=curves, areas=areas, table=table, markdown=markdown, files=files, errors=errors,
                            evaluated=evaluated, cached=cached)


def write_tables(out: Path, experiment: str, baseline: str, areas: pd.DataFrame, table: pd.DataFrame,
                 settings_key: dict[str, Any] | None, order: Sequence[str]) -> tuple[str, dict[str, Path]]:
    """``robustness.md`` (summary table, then methods x modalities per corruption) and ``robustness.csv``
    (the areas per method, seed, corruption and modality) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    caption = f"{experiment}: robustness to one corrupted modality at a time (test split)"
    markdown = table_markdown(table, baseline, caption=caption) + "\n\n" + legend(settings_key, baseline)
    sections = [markdown]
    for c in table.attrs["corruptions"]:
        sections += [f"### {c}: relative robustness (%) per corrupted modality",
                     modality_markdown(areas, c, order=order, measure="rr")]
    files = {"markdown": out / "robustness.md", "csv": out / "robustness.csv"}
    files["markdown"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    areas.to_csv(files["csv"], index=False)
    return markdown, files


def experiment_robustness(frame: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """For a report: the curves and areas of the runs in ``frame`` (columns method, seed, path) that hold
    ``robustness.csv``; None when none does."""
    parts = []
    for method, seed, path in zip(frame["method"], frame["seed"], frame["path"]):
        curves = read_curves(Path(path))
        if curves is not None:
            parts.append(curves.assign(method=method, seed=seed))
    if not parts:
        return None
    curves = pd.concat(parts, ignore_index=True)
    return curves, robustness_areas(curves, baseline)


__all__ = ["DEFAULT_LEVELS", "RobustnessResult", "RobustnessSettings", "effective_robustness", "evaluate_model",
           "evaluate_run", "experiment_robustness", "logits_omitting", "relative_robustness", "robustness_areas",
           "robustness_table", "run_robustness", "supports_missing", "table_html", "table_markdown"]
