"""The GPU path, checked on a CPU: mixed precision end to end, channels-last, torch.compile, pinned copies, the
device of everything a forward pass creates, and the prepared GPU benchmark's dry run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fuselab.data.core import bundle_from_arrays
from fuselab.errors import ConfigError
from fuselab.experiments.robustness import RobustnessSettings, evaluate_run
from fuselab.experiments.spec import run_id
from fuselab.losses import WeightedLoss
from fuselab.models.conv import conv_streams
from fuselab.models.diagnostics import fusion_diagnostics
from fuselab.models.mbt import mbt
from fuselab.registry import FUSIONS, MODELS
from fuselab.train.config import make_config
from fuselab.train.loop import autocast, data_to_device, fit, make_fabric, pinned_copies, split_to_device
from fuselab.train.run import execute
from fuselab.train.session import load_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.views=[fou,kar,zer]", "model.hidden=32", "train.epochs=6", "train.threads=1", "train.batch_size=128",
         "train.accelerator=cpu"]


# ----------------------------------------------------------------------------------------------
# mixed precision end to end
# ----------------------------------------------------------------------------------------------


def test_bf16_mixed_run_learns_in_bfloat16_and_its_loaded_model_predicts_alike(data_root, tmp_path):
    records: list[tuple[bool, torch.dtype]] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, nn.Linear):
            records.append((module.training, output.dtype))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        cfg = make_config(None, [*SMALL, "fusion.name=concat", "train.precision=bf16-mixed"])
        result = execute(cfg, tmp_path / "run")
        trained = list(records)
        records.clear()
        run = load_run(tmp_path / "run")
        pred = run.predict(run.data.test.x)
        loaded = list(records)
        records.clear()
        _, clean = evaluate_run(cfg, result.fit.state_dict, RobustnessSettings(levels=(0.0, 0.5)))
    finally:
        handle.remove()
    assert result.metrics["test_accuracy"] > 0.85  # 10 classes: chance is 0.1
    # training steps and the per-epoch validation both ran their linear layers in bfloat16
    assert {dtype for training, dtype in trained if training} == {torch.bfloat16}
    assert {dtype for training, dtype in trained if not training} >= {torch.bfloat16}
    # a loaded run evaluates in the precision it trained in, and predicts what its evaluation stored
    assert loaded and {dtype for _, dtype in loaded} == {torch.bfloat16}
    # so does the robustness evaluation, whose clean accuracy is the run's own, exactly
    assert records and {dtype for _, dtype in records} == {torch.bfloat16}
    assert clean == result.metrics["test_accuracy"]
    assert "diag_error" not in result.metrics  # the fusion diagnostics ran
    stored = np.load(tmp_path / "run" / "predictions.npz")["y_pred"]
    assert (pred.numpy() == stored).mean() > 0.99


def test_autocast_follows_the_fabric_precision():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("bf16-mixed", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("16-mixed", "cpu"):  # no float16 autocast on a CPU: bfloat16, as Fabric substitutes it
        assert layer(x).dtype == torch.bfloat16
    for precision in ("32-true", None, "64-true"):
        with autocast(precision, "cpu"):
            assert layer(x).dtype == torch.float32


def _mbt() -> nn.Module:
    torch.manual_seed(0)
    return mbt(dims={"a": 8, "b": 6}, num_classes=3, fusion={"name": "late"}, layers=2, width=16, heads=2,
               fusion_layer=0).eval()


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return conv_streams(dims={"a": 3, "b": 3}, num_classes=2, fusion={"name": "aff"},
                        widths=[8, 16]).eval()


@pytest.mark.parametrize("build, shapes", [(_mbt, {"a": (16, 8), "b": (16, 6)}),
                                           (_conv, {"a": (8, 3, 12, 12), "b": (8, 3, 12, 12)})])
def test_fusion_diagnostics_and_flop_counts_hold_under_autocast(build, shapes):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(1)
    x = {m: torch.randn(s) for m, s in shapes.items()}
    model = build()
    full = fusion_diagnostics(model, x, seed=0)
    with autocast("bf16-mixed", "cpu"):
        mixed = fusion_diagnostics(model, x, seed=0)
    assert set(mixed) == set(full)
    for key, value in full.items():
        if isinstance(value, float):
            assert np.isfinite(mixed[key])
            assert abs(mixed[key] - value) < 0.05 + 0.1 * abs(value), key
    counts = []
    for precision in ("32-true", "bf16-mixed"):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, autocast(precision, "cpu"):
            model(x)
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[0] == counts[1]  # autocast changes dtypes, not the operations counted


# ----------------------------------------------------------------------------------------------
# options in the config
# ----------------------------------------------------------------------------------------------


def test_gpu_options_are_off_by_default_checked_and_keep_run_ids():
    plain = make_config(None, ["fusion.name=sum"])
    assert plain.train.channels_last is False and plain.train.compile is False
    off = make_config(None, ["fusion.name=sum", "train.channels_last=false", "train.compile=false"])
    assert run_id(off) == run_id(plain)  # stores keep their finished runs
    on = make_config(None, ["fusion.name=sum", "train.channels_last=true", "train.compile=true"])
    assert run_id(on) != run_id(plain)  # both change the numbers slightly: a run with them is another run
    with pytest.raises(ConfigError, match="train.channels_last"):
        make_config(None, ["train.channels_last=maybe"])
    with pytest.raises(ConfigError, match="train.compile"):
        make_config(None, ["train.compile=fast"])
    with pytest.raises(ConfigError, match=r"config key 'train.precision' must be one of 32-true, bf16-mixed, 16-mixed"):
        make_config(None, ["train.precision=bf17-mixed"])


def test_device_options_fabric_cannot_start_with_are_one_line_config_errors():
    from fuselab.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"config key 'train.accelerator' must be one of auto, cpu, cuda"):
        make_config(None, ["train.accelerator=gpu3"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^Lightning Fabric cannot start with train.accelerator=cuda, .*not available"):
            make_fabric(TrainConfig(accelerator="cuda"))
    with pytest.raises(ConfigError, match=r"train.devices=64"):
        make_fabric(TrainConfig(accelerator="cpu", devices=64, strategy="not-a-strategy"))


def test_precision_typo_is_one_line_with_exit_code_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "fuselab.cli", "run", "train.precision=fp16", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.precision" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def _maps(seed: int = 0, n: int = 96):
    """Two 3-channel 8 x 8 maps whose class is the sign of a's mean minus b's."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 3, 8, 8)), rng.normal(size=(n, 3, 8, 8))
    y = (a.mean((1, 2, 3)) > b.mean((1, 2, 3))).astype(np.int64)
    return bundle_from_arrays({"a": a, "b": b}, y, seed=seed, test_fraction=0.25, val_fraction=0.25)


def _fit_maps(options: dict, data, *, conv_inputs: list | None = None):
    cfg = OmegaConf.to_object(make_config(None, [f"train.{k}={v}" for k, v in {"epochs": 3, "batch_size": 16, "threads": 1,
                                                                               "accelerator": "cpu", **options}.items()]).train)
    fabric = make_fabric(cfg)
    fabric.seed_everything(0, verbose=False)
    model = conv_streams(dims=data.dims, num_classes=2, fusion={"name": "concat"}, widths=[8, 16])
    if conv_inputs is not None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.register_forward_hook(lambda mod, args, out: conv_inputs.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    return fit(model, data, WeightedLoss([{"name": "ce"}]), cfg, seed=0, fabric=fabric)


def test_channels_last_trains_conv_streams_to_the_same_weights_on_cpu():
    data = _maps()
    layouts: list[bool] = []
    plain = _fit_maps({}, data)
    last = _fit_maps({"channels_last": "true"}, data, conv_inputs=layouts)
    assert layouts and all(layouts)  # the convolutions really saw channels-last maps
    again = _fit_maps({}, data)
    for key, value in plain.state_dict.items():  # off: bit-identical; on: equal up to float rounding
        assert torch.equal(value, again.state_dict[key]), key
        torch.testing.assert_close(last.state_dict[key].contiguous(), value, rtol=1e-4, atol=1e-5)
    assert [r["train_loss"] for r in last.history] == pytest.approx([r["train_loss"] for r in plain.history], rel=1e-5)
    assert torch.equal(last.test_pred, plain.test_pred)


def _vectors(seed: int = 0, n: int = 120):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 6)), rng.normal(size=(n, 4))
    y = (a[:, 0] + b[:, 0] > 0).astype(np.int64)
    return bundle_from_arrays({"a": a, "b": b}, y, seed=seed, test_fraction=0.25, val_fraction=0.25)


def test_compile_trains_the_same_tiny_run():
    data = _vectors()

    def run(compile_: bool):
        cfg = OmegaConf.to_object(make_config(None, ["train.epochs=2", "train.batch_size=30", "train.threads=1",
                                                     "train.accelerator=cpu", f"train.compile={str(compile_).lower()}"]).train)
        fabric = make_fabric(cfg)
        fabric.seed_everything(0, verbose=False)
        model = MODELS.get("mlp-streams")(dims=data.dims, num_classes=2, fusion={"name": "concat"}, hidden=16,
                                            dropout=0.0)  # inductor draws its own dropout masks
        return fit(model, data, WeightedLoss([{"name": "ce"}]), cfg, seed=0, fabric=fabric)

    eager = run(False)
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        compiled = run(True)
    except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler for inductor on this machine
        pytest.skip(f"torch.compile does not work here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    seconds = time.perf_counter() - start
    if seconds > 120:
        pytest.skip(f"torch.compile took {seconds:.0f} s for a tiny run here; too slow to check in the suite")
    for key, value in eager.state_dict.items():
        torch.testing.assert_close(compiled.state_dict[key], value, rtol=1e-4, atol=1e-5)
    assert [r["train_loss"] for r in compiled.history] == pytest.approx([r["train_loss"] for r in eager.history], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# copies to the device, and the device of what forward passes create
# ----------------------------------------------------------------------------------------------


def test_pinned_non_blocking_copies_only_to_cuda():
    assert pinned_copies("cuda") and pinned_copies("cuda:1") and pinned_copies(torch.device("cuda", 0))
    for device in ("cpu", "mps", "meta", torch.device("cpu")):
        assert not pinned_copies(device)


def test_data_to_device_moves_every_split_and_lays_maps_out_channels_last():
    data = _maps()
    moved = data_to_device(data, "meta", channels_last=True)  # the device argument reaches every tensor
    for split in (moved.train, moved.val, moved.test):
        assert split.y.device.type == "meta"
        assert all(v.device.type == "meta" and v.is_contiguous(memory_format=torch.channels_last) for v in split.x.values())
    kept = data_to_device(data, "meta", test=False)
    assert kept.test.y.device.type == "cpu" and kept.train.y.device.type == "meta"
    assert not kept.train.x["a"].is_contiguous(memory_format=torch.channels_last)
    same = split_to_device(data.train, "cpu")  # off and on the CPU: the same tensors, no copy
    assert same.x["a"].data_ptr() == data.train.x["a"].data_ptr()


def _forward_cases():
    vector, tokens = {"a": (4, 8), "b": (4, 8)}, {"a": (4, 8), "b": (4, 8)}
    maps = {"a": (4, 3, 16, 16), "b": (4, 3, 16, 16)}
    for name in FUSIONS.list():
        cls = FUSIONS.get(name)
        for form in getattr(cls, "forms", ()):
            if cls.contract == "exchange":
                if form == "tokens":
                    yield name, form, lambda n=name: mbt(dims={"a": 8, "b": 8}, num_classes=3, fusion={"name": "late"},
                                                         exchange={"name": n}, layers=2, width=16, heads=2, fusion_layer=1,
                                                         drop_path=0.1, dropout=0.1), tokens
                elif form == "map":
                    yield name, form, lambda n=name: conv_streams(dims={"a": 3, "b": 3}, num_classes=2, fusion={"name": "concat"},
                                                                  exchange={"name": n}, widths=[8, 16]), maps
            elif form == "vector":
                yield name, form, lambda n=name: MODELS.get("mlp-streams")(dims={"a": 8, "b": 8}, num_classes=3,
                                                                           fusion={"name": n}, modality_heads=True), vector
            elif form == "map":
                yield name, form, lambda n=name: conv_streams(dims={"a": 3, "b": 3}, num_classes=2, fusion={"name": n},
                                                              widths=[8, 16]), maps
            elif form == "tokens":
                yield name, form, lambda n=name: mbt(dims={"a": 8, "b": 8}, num_classes=3, fusion={"name": n}, layers=2,
                                                     width=16, heads=2, fusion_layer=1), tokens


@pytest.mark.parametrize("name, form, build, shapes", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in _forward_cases()])
def test_forward_and_loss_create_nothing_off_the_model_device(name, form, build, shapes):
    """On the meta device any tensor a forward pass, modality dropout or a loss made without ``x.device``
    (a mask, an index, a random draw) meets meta tensors and fails: the CPU-only assumption a CUDA run would hit."""
    from fuselab.data.corruptions import apply_modality_dropout

    torch.manual_seed(0)
    model = build().to("meta")
    x = {m: torch.randn(s, device="meta") for m, s in shapes.items()}
    y = torch.zeros(4, dtype=torch.long, device="meta")
    model.train()
    inputs, extra = apply_modality_dropout(model, x, {"a": 0.5, "b": 0.0}, torch.Generator().manual_seed(0))
    output = model(inputs, **extra)
    terms = [{"name": "ce"}] + ([{"name": "aux-unimodal"}] if output.modality_logits else [])
    total, _ = WeightedLoss(terms)(output, y)
    assert total.device.type == "meta" and output.logits.device.type == "meta"
    model.eval()
    assert model(x).logits.device.type == "meta"


# ----------------------------------------------------------------------------------------------
# the prepared GPU benchmark
# ----------------------------------------------------------------------------------------------


def test_gpu_benchmark_dry_run_prints_its_rows(data_root):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FUSELAB_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["row", "runs", "device", "precision", "s/step"] and "of matmul peak" in header
    rows = {r[0]: dict(zip(header, r)) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert list(rows) == ["mfeat-compare", "mbt avmnist", "landsat", "matmul peak"]
    assert rows["mfeat-compare"]["runs"] == "2" and rows["mfeat-compare"]["precision"] == "bf16-mixed"
    for name in ("mfeat-compare", "mbt avmnist", "landsat"):
        assert float(rows[name]["s/step"]) > 0 and 0 <= float(rows[name]["test accuracy"]) <= 1
        assert rows[name]["GPU util %"] == "n/a (no CUDA device)"
    assert float(rows["mfeat-compare"]["test accuracy"]) > 0.5  # even one epoch learns mfeat
    assert float(rows["mbt avmnist"]["TFLOP/s"]) > 0 and 0 < float(rows["mbt avmnist"]["of matmul peak"])
    assert rows["landsat"]["TFLOP/s"] == "-" and float(rows["matmul peak"]["TFLOP/s"]) > 0
    assert rows["matmul peak"]["precision"] == "bfloat16"
    assert "dry run" in proc.stdout


def test_gpu_benchmark_refuses_to_measure_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", [n for n in FUSIONS.list() if "map" in getattr(FUSIONS.get(n), "forms", ())])
def test_every_map_fusion_gives_the_same_logits_channels_last(name):
    """``train.channels_last`` changes only the layout: no map operator may read a channels-last map as if it
    were contiguous (a ``view`` where a ``reshape`` is needed) or lose gradients with it."""
    exchange = FUSIONS.get(name).contract == "exchange"
    torch.manual_seed(0)
    model = conv_streams(dims={"a": 3, "b": 3}, num_classes=2, widths=[16, 32], fuse_at="all", neck="fpn", dense=True,
                         fusion={"name": "concat"} if exchange else {"name": name},
                         **({"exchange": {"name": name}} if exchange else {})).eval()
    x = {m: torch.randn(2, 3, 16, 16) for m in ("a", "b")}
    plain = model(x).logits
    model = model.to(memory_format=torch.channels_last)
    last = model({m: v.contiguous(memory_format=torch.channels_last) for m, v in x.items()}).logits
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)
    last.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_resumable_state_keeps_the_cuda_random_state_where_dropout_draws_on_cuda(monkeypatch):
    from fuselab.train.loop import rng_states, set_rng_states

    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    device = torch.device("cuda", 0)
    saved = rng_states(device)
    assert torch.equal(saved["cuda_rng"], cuda_state) and torch.equal(saved["torch_rng"], torch.get_rng_state())
    torch.rand(3)  # moves the CPU state on
    set_rng_states(saved, device)
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == device
    on_cpu = rng_states(torch.device("cpu"))
    assert on_cpu["cuda_rng"] is None
    set_rng_states(on_cpu, device)  # a state saved on a CPU restores the CPU's only
    set_rng_states({"torch_rng": on_cpu["torch_rng"]}, device)  # and so does one saved before cuda_rng existed
    assert len(restored) == 1


@pytest.mark.parametrize("name, form, build, shapes", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in _forward_cases()])
def test_every_fusion_trains_a_step_under_bf16_autocast(name, form, build, shapes):
    """``train.precision=bf16-mixed`` for every registered operator: a training step's forward (with modality
    dropout), loss and backward under autocast mix bfloat16 and float32 tensors without a dtype error, and
    every parameter that the float32 step reaches gets a finite gradient."""
    from fuselab.data.corruptions import apply_modality_dropout

    torch.manual_seed(0)
    model = build().train()
    x = {m: torch.randn(s) for m, s in shapes.items()}
    y = torch.tensor([0, 1, 1, 0])
    grads = {}
    for precision in ("32-true", "bf16-mixed"):
        model.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            inputs, extra = apply_modality_dropout(model, x, {"a": 0.5, "b": 0.0}, torch.Generator().manual_seed(0))
            output = model(inputs, **extra)
            terms = [{"name": "ce"}] + ([{"name": "aux-unimodal"}] if output.modality_logits else [])
            total, _ = WeightedLoss(terms)(output, y)
        total.backward()
        assert torch.isfinite(total)
        grads[precision] = {n for n, p in model.named_parameters() if p.grad is not None and torch.isfinite(p.grad).all()}
    assert grads["bf16-mixed"] == grads["32-true"] and grads["32-true"]
