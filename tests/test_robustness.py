"""Robustness curves and areas on tiny real runs, missing modalities, and modality dropout in training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from fuselab.cli import main
from fuselab.data.corruptions import corrupt, drop_elements, drop_modalities, dropout_rates, gaussian_noise
from fuselab.experiments.robustness import (
    RobustnessSettings,
    effective_robustness,
    logits_omitting,
    relative_robustness,
    robustness_areas,
    run_robustness,
    supports_missing,
)
from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.train.config import ConfigError, make_config

from conftest import tiny_spec

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
TINY = tiny_spec("rob", epochs=6, lr=5.0e-3, threads=1)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Concat and sum trained on two mfeat views, then evaluated under every corruption."""
    store = Store(tmp_path_factory.mktemp("rob") / "store")
    plan = prepare(parse_spec(json.loads(json.dumps(TINY))), store)
    execute_plan(plan, store, jobs=1)
    result = run_robustness(store.root, "rob", RobustnessSettings(levels=LEVELS))
    return store, result


def test_level_zero_reproduces_the_clean_test_accuracy_exactly(evaluated):
    store, result = evaluated
    assert not result.errors and result.evaluated == 2
    for run in store.experiment_runs("rob"):
        curves = pd.read_csv(store.run_dir(run["run_id"]) / "robustness.csv")
        clean = curves[curves["level"] == 0]["accuracy"]
        assert len(clean) == 3 * 2  # every corruption of every modality starts at the clean split
        assert (clean == run["metrics"]["test_accuracy"]).all()  # exact, not approximate
        meta = json.loads((store.run_dir(run["run_id"]) / "robustness.json").read_text())
        assert meta["reproduced"] is True


def test_the_curve_of_a_trained_concat_model_falls_on_average(evaluated):
    curves = evaluated[1].curves
    concat = curves[curves["method"] == "concat"]
    for corruption in ("noise", "drop", "missing"):
        mean = concat[concat["corruption"] == corruption].groupby("level")["accuracy"].mean()
        steps = np.diff(mean.to_numpy())
        assert steps.mean() < 0, (corruption, mean.tolist())  # non-increasing on average, and really falling
        assert np.polyfit(mean.index.to_numpy(), mean.to_numpy(), 1)[0] < 0


def test_missing_mode_follows_the_merge_and_areas_are_paired_with_the_baseline(evaluated):
    store, result = evaluated
    modes = result.curves[result.curves["corruption"] == "missing"].groupby("method")["mode"].first()
    assert modes["concat"] == "zeros" and modes["sum"] == "omit"
    table = result.table.set_index("method")
    assert table.loc["concat", "noise_er_mean"] == 0  # the baseline against itself
    assert set(result.areas["rr"].between(0, 1)) == {True}
    text = result.files["markdown"].read_text()
    assert "noise RR (%)" in text and "concat (baseline)" in text and "### drop" in text


def test_rerun_reads_curves_back_and_report_shows_them(evaluated, capsys):
    store, _ = evaluated
    again = run_robustness(store.root, "rob", RobustnessSettings(levels=LEVELS))
    assert again.cached == 2 and again.evaluated == 0
    from fuselab.report.experiment import build_report

    built = build_report(store.root, "rob", html=True, flops=False, pdf=False, figure=False)
    assert built.files["robustness_markdown"].is_file()
    page = built.files["html"].read_text()
    assert '<table id="robustness">' in page and "missing ER (pp)" in page
    table = page[page.index('<table id="robustness">'):]
    assert table[: table.index("</table>")].count("<tr><td>") == 2  # one row per method of the experiment
    assert 'id="plot-robustness-modalities"' in page and "data:image/png;base64," in page
    report = (store.root / "rob" / "report" / "report.md").read_text()
    assert "## Robustness" in report and "missing ER (pp)" in report
    assert (store.root / "rob" / "report" / "plots" / "robustness.png").is_file()
    assert (store.root / "rob" / "report" / "plots" / "robustness_modalities.png").is_file()


def test_cli_rejects_bad_levels_in_one_line(evaluated, capsys):
    store, _ = evaluated
    with pytest.raises(SystemExit) as exc:
        main(["robustness", "rob", "--store", str(store.root), "--levels", "0.5,1"])
    assert exc.value.code == 2 and "levels must rise from 0" in capsys.readouterr().err


# -- operators and models with a modality left out --------------------------------------------------------


def _model(fusion: str, views=("fou", "kar", "zer")):
    from fuselab.train.run import build_data, build_model

    cfg = make_config({"data": {"name": "mfeat", "views": list(views)}, "model": {"name": "mlp-streams", "hidden": 16},
                       "fusion": {"name": fusion}})
    torch.manual_seed(0)
    data = build_data(cfg)
    return build_model(cfg, data).eval(), data


def test_sum_without_a_modality_is_exactly_the_sum_of_the_others():
    import fuselab

    op = fuselab.create_fusion("sum", dims={"a": 4, "b": 4, "c": 4})
    xs = {m: torch.randn(3, 4) for m in "abc"}
    assert torch.equal(op({"a": xs["a"], "b": xs["b"]}), xs["a"] + xs["b"])
    assert fuselab.fusion_info("sum").supports_missing and not fuselab.fusion_info("concat").supports_missing

    model, data = _model("sum")
    assert supports_missing(model)
    test = data.test
    with torch.no_grad():
        z = {m: model.encoders[m](test.x[m]) for m in ("fou", "kar")}  # zer left out
        expected = model.head(model.trunk(model.merge.proj["fou"](z["fou"]) + model.merge.proj["kar"](z["kar"])))
        mask = torch.zeros(len(test), dtype=torch.bool)
        mask[::2] = True  # every other sample loses 'zer'
        got = logits_omitting(model, test, "zer", mask, batch_size=1024)
        full = model(test.x).logits
    assert torch.allclose(got[mask], expected[mask], atol=1e-6)
    assert torch.allclose(got[~mask], full[~mask], atol=1e-6)
    assert not torch.allclose(got[mask], full[mask], atol=1e-3)  # leaving it out does change the result


def test_late_fusion_without_a_modality_averages_the_others_logits():
    model, data = _model("late")
    x = {m: v[:5] for m, v in data.test.x.items()}
    with torch.no_grad():
        z = {m: model.encoders[m](x[m]) for m in ("fou", "kar")}
        expected = (model.merge.heads["fou"](z["fou"]) + model.merge.heads["kar"](z["kar"])) / 2
        got = model({m: x[m] for m in ("fou", "kar")}).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_missing_features_zeroes_the_stream_as_modality_dropout_does():
    from fuselab.experiments.robustness import logits_dropping_features

    model, data = _model("concat")
    test = data.test
    mask = torch.zeros(len(test), dtype=torch.bool)
    mask[1::3] = True
    with torch.no_grad():
        z = {m: model.encoders[m](test.x[m]) for m in ("fou", "kar", "zer")}
        z["kar"] = torch.where(mask.unsqueeze(1), torch.zeros_like(z["kar"]), z["kar"])  # the stream, not the input
        expected = model.head(model.trunk(model.merge(z)))
        got = logits_dropping_features(model, test, "kar", mask, batch_size=100)  # masks follow the batches
        zero_input = model({**test.x, "kar": torch.zeros_like(test.x["kar"])}).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got[~mask], model(test.x).logits[~mask].detach(), atol=1e-5)
    assert not torch.allclose(got[mask], zero_input[mask], atol=1e-3)  # not the same as a zero input
    with pytest.raises(ConfigError, match="missing mode must be auto, zeros or features"):
        RobustnessSettings(missing="nan")


# -- corruptions -------------------------------------------------------------------------------------------


def test_corruptions_keep_level_zero_and_work_on_every_form():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for shape in ((8, 5), (8, 4, 6), (8, 3, 4, 4)):
        x = torch.randn(shape)
        for c in ("noise", "drop", "missing"):
            assert corrupt(x, c, 0.0, generator=g()) is x
            assert corrupt(x, c, 0.5, generator=g()).shape == x.shape
        assert torch.equal(corrupt(x, "missing", 1.0), torch.zeros_like(x))
        assert torch.equal(drop_elements(x, 1.0, generator=g()), torch.zeros_like(x))
    tokens = drop_elements(torch.ones(64, 10, 3), 0.5, generator=g())
    assert set(tokens.sum(-1).unique().tolist()) <= {0.0, 3.0}  # whole tokens are dropped
    noisy = gaussian_noise(torch.zeros(20000), 0.5, sigma=2.0, scale=3.0, generator=g())
    assert noisy.std().item() == pytest.approx(3.0, rel=0.03)  # level x scale x sigma


def test_area_measures_follow_multibench():
    levels = np.linspace(0, 1, 11)
    assert relative_robustness(levels, np.full(11, 0.8)) == pytest.approx(0.8)
    assert relative_robustness(levels, 1 - levels) == pytest.approx(0.5)
    base = 0.9 - 0.4 * levels
    assert effective_robustness(levels, base, base) == pytest.approx(0.0)
    assert effective_robustness(levels, base - 0.1, base) == pytest.approx(0.0)  # lower clean accuracy alone
    assert effective_robustness(levels, 0.9 - 0.2 * levels, base) == pytest.approx(0.1)
    # MultiBench's helper on its 11 levels: trapezoids of width 0.1
    acc = np.random.default_rng(0).uniform(0.5, 1, 11)
    assert relative_robustness(levels, acc) == pytest.approx(sum((acc[i] + acc[i + 1]) * 0.1 / 2 for i in range(10)))
    curves = pd.DataFrame({"method": ["b"] * 11 + ["f"] * 11, "seed": 0, "corruption": "noise", "modality": "a",
                           "level": np.tile(levels, 2), "accuracy": np.concatenate([base, 0.9 - 0.2 * levels])})
    areas = robustness_areas(curves, "b").set_index("method")
    assert areas.loc["f", "er"] == pytest.approx(0.1) and areas.loc["b", "er"] == 0


# -- modality dropout ----------------------------------------------------------------------------------------


def test_modality_dropout_config_is_checked():
    make_config(None, ["train.modality_dropout=0.3"])
    make_config(None, ["train.modality_dropout={fou: 1.0}"])
    with pytest.raises(ConfigError, match="modality_dropout"):
        make_config(None, ["train.modality_dropout=1.5"])
    with pytest.raises(ValueError, match="names modality 'image'"):
        dropout_rates({"image": 0.5}, ["fou", "kar"])
    x = {"a": torch.ones(1000, 3), "b": torch.ones(1000, 3)}
    out = drop_modalities(x, {"a": 0.3}, torch.Generator().manual_seed(0))
    assert out["b"] is x["b"]
    assert (out["a"].sum(1) == 0).float().mean().item() == pytest.approx(0.3, abs=0.05)


def _fit_encoder_grads(dropout, model_cfg=None):
    """Train one epoch; per stream, the largest gradient that reached any of its encoder's parameters (weights
    and biases of every layer) at each step."""
    from fuselab.losses import WeightedLoss
    from fuselab.train.config import section
    from fuselab.train.loop import fit, make_fabric
    from fuselab.train.run import build_data, build_model

    cfg = make_config({"data": {"name": "mfeat", "views": ["fou", "kar"]},
                       "model": model_cfg or {"name": "mlp-streams", "hidden": 16},
                       "train": {"epochs": 1, "batch_size": 256, "modality_dropout": dropout}})
    tcfg = OmegaConf.to_object(cfg.train)
    fabric = make_fabric(tcfg)
    fabric.seed_everything(0, verbose=False)
    data = build_data(cfg)
    model = build_model(cfg, data)
    grads: dict[str, list[float]] = {"fou": [], "kar": []}
    for m in grads:
        params = list(model.encoders[m].parameters())
        assert len(params) >= 4  # several layers, biases included
        step: dict[int, float] = {}

        def hook(g, m=m, n=len(params), step=step):
            step[len(step)] = float(g.abs().max())
            if len(step) == n:  # every parameter of this encoder has its gradient for this step
                grads[m].append(max(step.values()))
                step.clear()

        for p in params:
            p.register_hook(hook)
    fit(model, data, WeightedLoss(section(cfg, "loss")["terms"]), tcfg, seed=0, fabric=fabric)
    return grads


@pytest.mark.parametrize("model_cfg", [None, {"name": "mlp-streams", "hidden": 16, "fuse_at": 0}])
def test_modality_dropout_at_one_gives_the_modality_encoder_no_gradient(model_cfg):
    dropped = _fit_encoder_grads({"fou": 1.0}, model_cfg)
    assert len(dropped["fou"]) == len(dropped["kar"]) >= 5  # a hook call per step
    assert all(g == 0.0 for g in dropped["fou"])  # not a single weight or bias of its encoder moves
    assert all(g > 0 for g in dropped["kar"])
    control = _fit_encoder_grads(0.0, model_cfg)
    assert all(g > 0 for g in control["fou"])
