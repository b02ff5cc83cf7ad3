"""Fusion diagnostics and the check that a configuration can fuse at all (``fuselab.models.diagnostics``,
the config's ``fusion_problem``, the report's fusion-check column)."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from html import unescape
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
import fuselab
from fuselab.cli import main
from fuselab.data.core import DataBundle
from fuselab.experiments.spec import PlannedRun, Spec, load_spec, shipped_specs
from fuselab.fusion.bottleneck import Bottleneck
from fuselab.layers.transformer import transformer_blocks
from fuselab.models.diagnostics import dependence_problem, operator_stats, scene_tiles
from fuselab.models.output import ModelOutput
from fuselab.train.config import ConfigError, make_config

TOKENS = {"data": {"name": "mfeat", "views": ["fou", "kar"]},
          "model": {"name": "mbt", "width": 16, "heads": 2, "layers": 2, "fusion_layer": 0, "features_per_token": 16},
          "fusion": {"name": "late"}, "train": {"epochs": 1, "batch_size": 128}}


class OnlyA(nn.Module):
    """Logits from modality ``a`` alone: class 0 when a > 0, class 1 otherwise, with certainty."""

    def forward(self, x):
        a = x["a"][:, :1] * 1000.0
        return ModelOutput(logits=torch.cat([a, -a], dim=1), modality_logits=None, features=None, aux_losses={})


def test_dependence_is_total_for_a_decisive_modality_and_zero_for_an_ignored_one():
    # two samples of opposite sign: any permutation without fixed points swaps them, so both predictions flip
    x = {"a": torch.tensor([[1.0], [-1.0]]), "b": torch.tensor([[5.0], [-7.0]])}
    dependence = fuselab.modality_dependence(OnlyA(), x)
    assert dependence["a"] == pytest.approx(1.0, abs=1e-6)
    assert dependence["b"] == 0.0
    assert dependence_problem(dependence) == ("no cross-modal dependence: only 'a' changes the prediction "
                                              "(dependence >= 0.01)")
    assert dependence_problem({"a": 0.3, "b": 0.02}) is None
    assert dependence_problem({"a": 0.3, "b": 0.005, "c": 0.001}) is not None


def test_dependence_of_a_balanced_pair_counts_the_flipped_share():
    # eight samples, predictions from the sign of a; half positive: a permutation flips exactly the samples
    # whose partner has the other sign, so the dependence is the share of such pairs
    a = torch.tensor([[1.0], [-1.0], [2.0], [-2.0], [3.0], [-3.0], [4.0], [-4.0]])
    x = {"a": a, "b": torch.zeros(8, 1)}
    dependence = fuselab.modality_dependence(OnlyA(), x, seed=3)
    cycle = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    partner = torch.empty_like(cycle)
    partner[cycle] = cycle.roll(-1)
    flipped = ((a[:, 0] > 0) != (a[partner, 0] > 0)).float().mean()
    assert (partner != torch.arange(8)).all()
    assert dependence["a"] == pytest.approx(float(flipped), abs=1e-6)


class DenseOnlyA(nn.Module):
    """Per-pixel logits from modality ``a`` alone: class 0 where a > 0, class 1 elsewhere, with certainty."""

    def forward(self, x):
        a = x["a"][:, :1] * 1000.0
        return ModelOutput(logits=torch.cat([a, -a], dim=1), modality_logits=None, features=None, aux_losses={})


def test_one_scene_is_cut_into_tiles_that_take_the_place_of_samples():
    scene = torch.arange(2 * 64 * 96, dtype=torch.float).reshape(1, 2, 64, 96)
    tiles = scene_tiles({"a": scene, "b": scene[:, :1]})
    assert tiles["a"].shape == (6, 2, 32, 32) and tiles["b"].shape == (6, 1, 32, 32)  # 64 // 4 < 32: side 32
    for t, (r, q) in enumerate((r, q) for r in range(2) for q in range(3)):  # row by row
        torch.testing.assert_close(tiles["a"][t], scene[0, :, 32 * r:32 * (r + 1), 32 * q:32 * (q + 1)])
    assert scene_tiles({"a": torch.zeros(1, 6, 400, 400)})["a"].shape == (16, 6, 96, 96)  # 96 = 32 x (100 // 32)
    for bad in ({"a": torch.zeros(1, 1, 40, 40)}, {"a": torch.zeros(2, 1, 64, 64)}, {"a": torch.zeros(1, 10)},
                {"a": torch.zeros(1, 1, 64, 64), "b": torch.zeros(1, 1, 64, 32)}):
        assert scene_tiles(bad) is None  # one tile only, several samples, a vector, sizes that differ
    # the dependence of a dense prediction on one scene: the share of tiles whose partner tile has the other sign
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])  # per tile, row by row
    a = signs.view(2, 3).repeat_interleave(32, 0).repeat_interleave(32, 1).view(1, 1, 64, 96)
    dependence = fuselab.modality_dependence(DenseOnlyA(), {"a": a, "b": torch.randn(1, 1, 64, 96)}, seed=5)
    cycle = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    partner = torch.empty_like(cycle)
    partner[cycle] = cycle.roll(-1)
    flipped = float((signs != signs[partner]).float().mean())
    assert flipped > 0 and dependence["a"] == pytest.approx(flipped, abs=1e-6) and dependence["b"] == 0.0
    with pytest.raises(ValueError, match=r"needs at least 2 samples \(or one map large enough for 2 tiles"):
        fuselab.modality_dependence(DenseOnlyA(), {"a": torch.zeros(1, 1, 40, 40), "b": torch.zeros(1, 1, 40, 40)})


def _bottleneck(depth: int, modalities=("a", "b", "c")) -> Bottleneck:
    torch.manual_seed(0)
    layers = {m: transformer_blocks(depth=depth, dim=8, heads=2) for m in modalities}
    return Bottleneck(layers, n_bottlenecks=2).eval()


def _tokens(modalities=("a", "b", "c"), batch=3):
    torch.manual_seed(1)
    return {m: torch.randn(batch, 3 + i, 8) for i, m in enumerate(modalities)}


def test_a_bottleneck_spanning_one_block_reports_no_cross_modal_attention():
    x = _tokens()
    one = _bottleneck(1).fusion_stats(x)
    two = _bottleneck(2).fusion_stats(x)
    assert one["cross_attention"] == 0.0 and one["initial_attention"] > 0.0
    assert 0.0 < two["cross_attention"] < 1.0
    stats, problems = operator_stats(nn.ModuleDict({"exchange": _bottleneck(1)})["exchange"], x)
    assert stats["/cross_attention"] == 0.0
    assert problems == ["Bottleneck: cross_attention is 0 (Bottleneck carried nothing between modalities)"]


def test_a_dropped_modality_leaves_the_bottleneck_mean_as_a_missing_one_does():
    op, x = _bottleneck(3), _tokens()
    keep = {"c": torch.tensor([1.0, 0.0, 0.0])}  # sample 0 keeps c, samples 1 and 2 drop it
    with torch.no_grad():
        dropped = op(x, keep=keep)
        missing = op({m: x[m] for m in ("a", "b")})
        full = op(x)
    for m in ("a", "b"):
        torch.testing.assert_close(dropped[m][1:], missing[m][1:])
        torch.testing.assert_close(dropped[m][:1], full[m][:1])
        assert not torch.allclose(full[m][1:], missing[m][1:])  # c did reach a and b when present


def test_modality_dropout_in_mbt_reaches_the_bottleneck_masks():
    cfg = make_config(TOKENS, ["exchange.name=bottleneck"])
    from fuselab.train.run import build_data, build_model

    data = build_data(cfg)
    model = build_model(cfg, data).eval()
    x, _ = data.test.take(torch.arange(4))
    with torch.no_grad():
        dropped = model(x, keep={"kar": torch.zeros(4)}).modality_logits["fou"]
        alone = model({"fou": x["fou"]}).modality_logits["fou"]
    torch.testing.assert_close(dropped, alone)


def _cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def test_a_bottleneck_that_cannot_fuse_is_one_line_before_anything_trains(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^model.fusion_layer=1 with model.layers=2: the bottleneck then spans "
                                          r"only the last block.*set control=true to run it as a labelled control\)$"):
        make_config(TOKENS, ["exchange.name=bottleneck", "model.fusion_layer=1"])
    assert make_config(TOKENS, ["exchange.name=bottleneck", "model.fusion_layer=1", "control=true"]).control is True
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""
        name: last-block
        base:
          data: {name: mfeat, views: [fou, kar]}
          model: {name: mbt, width: 16, heads: 2, layers: 3, fusion_layer: 2}
          exchange: {name: bottleneck}
          fusion: {name: late}
        seeds: [0]
    """))
    store = tmp_path / "store"
    for args in (["--dry-run"], []):
        code, output = _cli(capsys, "compare", str(spec), "--store", str(store), *args)
        assert code == 2
        lines = output.strip().splitlines()
        assert len(lines) == 1 and "model.fusion_layer=2 with model.layers=3" in lines[0], output
    assert not store.exists()


def test_fuselab_run_refuses_a_last_block_bottleneck_in_one_line_before_training(tmp_path, capsys):
    out = tmp_path / "runs"
    code, output = _cli(capsys, "run", "model.name=mbt", "model.width=16", "model.heads=2", "model.layers=4",
                        "model.fusion_layer=3", "exchange.name=bottleneck", "fusion.name=late", "data.views=[fou,kar]",
                        "--out", str(out))
    assert code == 2
    assert output.strip().splitlines() == [
        "error: model.fusion_layer=3 with model.layers=4: the bottleneck then spans only the last block, whose "
        "bottleneck update no block reads, so nothing passes between modalities (late fusion plus learned tokens); "
        "use model.fusion_layer <= 2, or model.fusion_layer=4 for late fusion (or set control=true to run it as a "
        "labelled control)"]
    assert not out.exists()  # nothing trained, no run folder
    # a shipped spec turned into one by the command line's overrides is refused by compare the same way
    store = tmp_path / "store"
    for args in (["--dry-run"], []):
        code, output = _cli(capsys, "compare", "mfeat-tokens", "model.fusion_layer=1", "--store", str(store), *args)
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1, output
        assert lines[0].startswith("error: spec 'mfeat-tokens', method ")
        assert "model.fusion_layer=1 with model.layers=2" in lines[0]
    assert not store.exists()


def test_a_token_exchange_that_never_exchanges_is_rejected():
    cfg = {**TOKENS, "model": {**TOKENS["model"], "features_per_token": 8}, "data": {"name": "mfeat", "views": ["fou", "kar"]}}
    with pytest.raises(ConfigError, match="exchange.threshold=0 never replaces a token"):
        make_config(cfg, ["exchange.name=token-exchange", "exchange.threshold=0"])


@pytest.mark.parametrize("overrides,message", [
    # a merge after a stage the streams do not have is refused with the config, not when the model is built
    (["model.fuse_at=7"], "model.fuse_at must be 'early', 'last' or a stage index 0..1, got 7"),
    (["model.name=conv-streams", "data.name=landsat-cd", "model.widths=[8,16]", "model.fuse_at=[0,2]"],
     "model.fuse_at"),
    # a standalone channel exchange whose threshold no |BN scale| can fall below exchanges nothing
    (["data.name=landsat-cd", "model.name=conv-streams", "exchange.name=channel-exchange", "exchange.threshold=0"],
     "exchange.threshold=0: no |BN scale| is below it, so channel-exchange exchanges no channel"),
    (["model.name=mbt", "model.layers=3", "model.fusion_layer=2", "data.views=[fou,kar]"], "model.fusion_layer=2"),
    # an exchange named for an mbt whose fusion layer is past the last block acts nowhere
    (["model.name=mbt", "model.layers=2", "model.fusion_layer=2", "data.views=[fou,kar]",
      "exchange.name=joint-attention"], "exchange.name=joint-attention with model.fusion_layer=2 = model.layers"),
])
def test_more_configurations_that_cannot_fuse_are_refused_with_the_config(overrides, message):
    try:
        make_config(None, overrides)
    except (ConfigError, ValueError) as exc:
        assert message in str(exc)
    else:
        raise AssertionError(f"accepted: {' '.join(overrides)}")


def test_a_control_keeps_the_run_ids_of_configs_without_it():
    from fuselab.experiments.spec import run_id

    plain = make_config(TOKENS, [])
    assert run_id(plain) == run_id(make_config(TOKENS, ["control=false"]))
    assert run_id(plain) != run_id(make_config(TOKENS, ["control=true"]))


def test_runs_record_diagnostics_and_the_report_marks_a_row_that_does_not_fuse(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent("""
        name: diag
        base:
          data: {name: mfeat, views: [fou, kar]}
          model: {name: mbt, width: 16, heads: 2, layers: 2, fusion_layer: 0, features_per_token: 16}
          fusion: {name: late}
          train: {epochs: 2, batch_size: 128}
        variants:
          - {name: bottleneck, exchange: {name: bottleneck}}
          - {name: last-block, model: {fusion_layer: 1}, exchange: {name: bottleneck}, control: true}
        seeds: [0]
        baseline: bottleneck
    """))
    store = tmp_path / "store"
    code, output = _cli(capsys, "compare", str(spec), "--store", str(store), "--jobs", "1")
    assert code in (0, None), output
    frame = fuselab.load_results(store, "diag").set_index("method")
    good, bad = frame.loc["bottleneck"], frame.loc["last-block"]
    assert good["diag_stat/exchange/cross_attention"] > 0.01
    assert bad["diag_stat/exchange/cross_attention"] == 0.0
    assert good["diag_problems"] == ""
    assert bad["diag_problems"] == "exchange: cross_attention is 0 (Bottleneck carried nothing between modalities)"
    assert bad["control"] == True  # noqa: E712 - a stored JSON boolean
    for m in ("fou", "kar"):
        assert 0.01 < good[f"diag_dependence/{m}"] <= 1.0
    markdown = (store / "diag" / "report" / "results.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert rows["last-block"].rstrip(" |").split(" | ")[-1].startswith("control; ⚠ not fusing; dep ")
    assert "⚠ not fusing" not in rows["bottleneck"] and "cross-attn" in rows["bottleneck"]
    assert "⚠ not fusing: last-block: exchange: cross_attention is 0" in markdown
    latex = (store / "diag" / "report" / "results.tex").read_text()
    assert "Fusion check" in latex and "⚠" not in latex and "control; not fusing" in latex
    html = (store / "diag" / "report" / "report.html").read_text()
    assert '<td class="warn">control; ⚠ not fusing' in html


def _small(config: dict) -> list[str]:
    """Overrides that make a shipped spec's data and transformer widths small enough to build every model of
    it in a test (the paths between modalities do not depend on sizes)."""
    out = []
    if config["data"]["name"] == "avmnist":
        out += ["data.train_size=20", "data.val_size=10", "data.test_size=10"]
    if config["model"]["name"] == "mbt":
        out.append(f"model.width={8 * config['model'].get('heads', 4)}")
    return out


def _probe_ready(model: nn.Module) -> None:
    """CEN exchanges the channels whose BN scale has fallen below the threshold during training: put the owned
    scales at zero, as a trained model has them, so the structural path can be probed."""
    for module in model.modules():
        if hasattr(module, "exchanged") and hasattr(module, "parts"):
            with torch.no_grad():
                for m, (lo, hi) in module.parts.items():
                    module.norms[m].weight[lo:hi] = 0.0


@dataclasses.dataclass
class Shipped:
    """One method of a shipped spec: its planned run (the first seed's), its configuration made small
    (``_small``) and its data."""

    spec: Spec
    run: PlannedRun
    cfg: DictConfig
    data: DataBundle


@pytest.fixture
def one_thread():
    """torch on one thread for a test that builds many models: an in-process `fuselab compare` earlier in the
    session leaves torch at cores / jobs threads, which on a loaded 2-core machine made the shipped-spec test
    ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped(data_root) -> dict[str, tuple[Spec, list[PlannedRun], list[Shipped]]]:
    """Every shipped spec: (spec, its plan, one entry per method). Methods with the same data share it."""
    from fuselab.train.run import build_data

    out, bundles = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSELAB_DATA", str(data_root))
        for name in sorted(shipped_specs()):
            spec = load_spec(name)
            plan = spec.plan()  # plan() itself rejects a configuration that cannot fuse (unless a control)
            methods, seen = [], set()
            for run in plan:
                if run.method in seen:
                    continue
                seen.add(run.method)
                base = OmegaConf.to_container(run.config, resolve=True)
                cfg = make_config(base, _small(base))
                key = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
                if key not in bundles:
                    bundles[key] = build_data(cfg)
                methods.append(Shipped(spec, run, cfg, bundles[key]))
            out[name] = (spec, plan, methods)
    return out


def test_every_fusion_row_of_every_shipped_spec_has_a_cross_modal_path(shipped, one_thread):
    from fuselab.train.run import build_model

    checked = 0
    for name, (_, _, methods) in shipped.items():
        for entry in methods:
            run, cfg, data = entry.run, entry.cfg, entry.data
            if run.config.control:
                continue  # a labelled control (test_every_control_of_a_shipped_spec_cannot_fuse)
            if len(data.modalities) < 2:
                continue  # a unimodal baseline
            torch.manual_seed(0)
            model = build_model(cfg, data)
            if not any(p.requires_grad for p in model.parameters()):
                continue  # cva: a classical baseline, nothing learned
            _probe_ready(model)
            x, _ = data.test.take(torch.arange(min(4, len(data.test))))
            xs = {m: v.float().requires_grad_(True) for m, v in x.items()}
            model.eval()
            output = model(xs)  # CEN's ensemble mixes detached logits: its streams are read through their heads
            total = output.logits.sum() + sum(v.sum() for v in (output.modality_logits or {}).values())
            grads = torch.autograd.grad(total, list(xs.values()), allow_unused=True)
            reached = [m for m, g in zip(xs, grads) if g is not None and float(g.abs().sum()) > 0]
            assert sorted(reached) == sorted(xs), f"{name}/{run.method}: the prediction ignores {set(xs) - set(reached)}"
            if any(getattr(type(module), "contract", "") == "exchange" for module in model.modules()):
                paths = fuselab.cross_modal_gradients(model, x)
                for m in xs:
                    assert any(paths[(m, n)] > 0 for n in xs if n != m), f"{name}/{run.method}: nothing reaches {m}"
            checked += 1
    assert checked >= 40


def test_every_control_of_a_shipped_spec_cannot_fuse_and_is_refused_without_its_label(shipped):
    # control: true must not be a way around the check: a shipped control is a configuration the check
    # names (the no-exchange twin of CEN), which without the label is refused before it trains
    from fuselab.train.config import fusion_problem

    controls = []
    for name, (_, _, methods) in shipped.items():
        for entry in methods:
            if not entry.run.config.control:
                continue
            plain = OmegaConf.to_container(entry.run.config, resolve=True)
            problem = fusion_problem(plain["data"], plain["model"], plain["exchange"], plain["fusion"])
            assert problem, f"{name}/{entry.run.method} is labelled a control but its configuration can fuse"
            plain["control"] = False
            with pytest.raises(ConfigError, match=re.escape(problem)):
                make_config(plain)
            controls.append(f"{name}/{entry.run.method}")
    assert controls == ["cen-ablation/no-exchange", "cen-official/no-exchange", "cen-official/no-exchange-no-l1"]


def _table_cells(markdown: str, latex: str, html: str) -> dict[str, list[str]]:
    """The last cell of every row of the results table in each format, top to bottom."""
    md = [line.rstrip(" |").split(" | ")[-1] for line in markdown.splitlines()
          if line.startswith("| ") and not line.startswith("| Method")]
    body = latex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    tex = [line.strip().removesuffix(r"\\").split(" & ")[-1].strip() for line in body.splitlines() if " & " in line]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", html.split("<tbody>", 1)[1].split("</tbody>", 1)[0])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row)[-1] for row in rows]
    return {"markdown": md, "latex": tex, "html": [unescape(c) for c in cells]}


@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_the_report_of_every_shipped_spec_shows_each_rows_fusion_check(shipped, one_thread, tmp_path, name):
    # every method of the shipped spec is diagnosed as a run is (diagnose on its model, _metrics, the
    # store), with made-up predictions and an untrained model; the report must then show a fusion-check cell
    # for every row in Markdown, LaTeX and HTML, with the controls labelled
    from fuselab.experiments.store import Store
    from fuselab.metrics import prediction_metrics
    from fuselab.report.experiment import build_report
    from fuselab.train.run import _metrics, build_model, diagnose

    spec, plan, methods = shipped[name]
    diagnostics, multimodal = {}, {}
    for entry in methods:
        torch.manual_seed(0)
        state = SimpleNamespace(state_dict=build_model(entry.cfg, entry.data).state_dict())
        diag = diagnose(entry.cfg, [entry.data], [state], torch.device("cpu"))
        assert diag, f"{name}/{entry.run.method}: no fusion diagnostics"
        assert "diag_error" not in diag, f"{name}/{entry.run.method}: {diag['diag_error']}"
        diagnostics[entry.run.method] = diag
        multimodal[entry.run.method] = len(entry.data.modalities) >= 2
    task, classes = methods[0].data.task, methods[0].data.num_classes
    store = Store(tmp_path / name)
    store.init()
    store.register_experiment(spec.name, spec.source, spec.baseline, spec.metric,
                              [(r.run_id, r.method, r.seed, OmegaConf.to_container(r.config, resolve=True))
                               for r in plan])
    rng = np.random.default_rng(0)
    y = torch.arange(40) % classes
    for r in plan:
        token = store.claim(r.run_id)
        folder = store.start_attempt(r.run_id, token)
        pred = torch.where(torch.from_numpy(rng.random(40) < 0.8), y, (y + 1) % classes)
        np.savez_compressed(folder / "predictions.npz", y_true=y.numpy(), y_pred=pred.numpy())
        test = {k: float(v) for k, v in prediction_metrics(task, pred, y, classes).items()}
        result = SimpleNamespace(test=test, val={}, best_epoch=0, history=[])
        metrics = _metrics(r.config, result, 1000, 1, diagnostics[r.method], 1.0)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        assert store.finish(r.run_id, metrics, token, folder)
    report = build_report(store.root, spec.name, plots=False, figure=False, flops=False, pdf=False)
    files = {k: report.files[k].read_text(encoding="utf-8") for k in ("markdown", "latex", "html")}
    assert "| Fusion check |" in files["markdown"], name
    assert r"& Fusion check \\" in files["latex"] and "<th>Fusion check</th>" in files["html"], name
    summary = report.summary
    cells = _table_cells(files["markdown"], files["latex"], files["html"])
    for kind, column in cells.items():
        assert len(column) == len(summary), f"{name}, {kind}: {len(column)} rows for {len(summary)} methods"
        for method, control, cell in zip(summary["method"], summary["control"], column):
            if not multimodal[method]:
                assert cell in ("–", "--"), f"{name}/{method} ({kind}): a unimodal row has no fusion to check"
                continue
            assert "dep " in cell, f"{name}/{method} ({kind}): {cell!r}"
            assert cell.startswith("control; ") == bool(control), f"{name}/{method} ({kind}): {cell!r}"


def test_a_landsat_model_is_diagnosed_on_its_one_test_scene(shipped):
    # what a Landsat run would record once diagnose() passes it the one test scene: the dependence on each
    # date from tiles of the scene, and CEN's exchanged share (none in an untrained model: not fusing)
    from fuselab.train.run import build_model

    entry = next(e for e in shipped["cen-official"][2] if e.run.method == "cen")
    x, _ = entry.data.test.take(torch.arange(1))
    assert {m: tuple(v.shape) for m, v in x.items()} == {"t1": (1, 6, 400, 400), "t2": (1, 6, 400, 400)}
    torch.manual_seed(0)
    diag = fuselab.fusion_diagnostics(build_model(entry.cfg, entry.data), x)
    assert 0.0 < diag["diag_dependence/t1"] <= 1.0 and 0.0 < diag["diag_dependence/t2"] <= 1.0, diag
    shares = {k: v for k, v in diag.items() if k.endswith("/exchanged")}
    assert len(shares) == 3 and set(shares.values()) == {0.0}, shares  # one exchange per stage, nothing moved
    # untrained, its predicted distribution barely moves (below the 0.01 floor), and it exchanges nothing
    assert diag["diag_problems"] == ("no cross-modal dependence: no modality changes the prediction (dependence >= "
                                     "0.01); all 3 ChannelExchange modules: exchanged is 0 (ChannelExchange carried "
                                     "nothing between modalities)")


def test_attention_and_gated_merges_report_their_mean_modality_weights_by_hand():
    from fuselab.report.fusion_check import fusion_check

    torch.manual_seed(0)
    x = {"a": torch.randn(5, 3), "b": torch.randn(5, 4)}
    attention = fuselab.create_fusion("attention", dims={"a": 3, "b": 4})
    gated = fuselab.create_fusion("gated", dims={"a": 3, "b": 4})
    with torch.no_grad():  # scores independent of the inputs: softmax([log 3, 0]) = (0.75, 0.25) everywhere
        attention.score.weight.zero_()
        attention.score.bias.copy_(torch.tensor([np.log(3.0), 0.0]))
        gated.gate.weight.zero_()  # gate logits laid out (modality, feature): a's 4 features, then b's
        gated.gate.bias.copy_(torch.tensor([np.log(3.0)] * 4 + [0.0] * 4))
    for op in (attention, gated):
        stats = op.fusion_stats(x)
        assert stats == {"weight/a": pytest.approx(0.75), "weight/b": pytest.approx(0.25)}, type(op).__name__
        found, problems = operator_stats(op, x)
        assert found == {"/weight/a": pytest.approx(0.75), "/weight/b": pytest.approx(0.25)} and problems == []
        row = pd.DataFrame([{f"diag_stat/{k}": v for k, v in found.items()} | {"diag_problems": ""}])  # as stored
        assert fusion_check(row)["fusion_check"] == "w a 0.75 b 0.25"


def test_a_run_whose_diagnostics_failed_is_said_to_have_none():
    from fuselab.report.fusion_check import fusion_check, fusion_note

    rows = pd.DataFrame([{"diag_dependence/a": 0.2, "diag_dependence/b": 0.4, "diag_problems": ""},
                         {"diag_error": "RuntimeError: out of memory"}])
    cell = fusion_check(rows)
    assert cell == {"fusion_check": "diagnostics failed; dep 0.20–0.40", "fusion_problems": "",
                    "fusion_errors": "RuntimeError: out of memory", "control": False}
    alone = fusion_check(pd.DataFrame([{"diag_error": "ValueError: bad"}]))
    assert alone["fusion_check"] == "diagnostics failed"  # not an empty cell, which would read as a clean one
    summary = pd.DataFrame([{"method": "x", **cell}, {"method": "y", **fusion_check(rows.iloc[:1])}])
    assert fusion_note(summary).endswith(" Diagnostics failed (the runs are kept): x: RuntimeError: out of memory.")
    assert fusion_check(rows.iloc[:1])["fusion_errors"] == ""


def test_cen_is_marked_as_not_fusing_only_when_no_exchange_moved_a_channel():
    from fuselab.models.cen import cen

    torch.manual_seed(0)
    model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    x = {"t1": torch.randn(4, 3, 8, 8), "t2": torch.randn(4, 3, 8, 8)}
    stats, problems = operator_stats(model, x)
    assert stats["exchange.stages.0.norm/exchanged"] == 0.0
    assert problems == ["all 2 ChannelExchange modules: exchanged is 0 (ChannelExchange carried nothing between "
                        "modalities)"]
    with torch.no_grad():  # one channel of t1 in the stem below the threshold: 1 of 2 x 4 stem channels exchanged
        model.exchange.stages[0].norm.norms["t1"].weight[1] = -1e-3
    stats, problems = operator_stats(model, x)
    assert stats["exchange.stages.0.norm/exchanged"] == 1 / 8
    assert stats["exchange.stages.0.norm/exchanged/t1"] == 1 / 4
    assert stats["exchange.stages.1.0.norm1/exchanged"] == 0.0
    assert problems == []
