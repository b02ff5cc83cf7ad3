"""The training loop knows nothing of fusion: modality dropout and per-epoch operator statistics are hooks the
model provides (``modality_dropout``, ``training_stats``), with a generic fallback for any other model."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fuselab import create_fusion
from fuselab.data.core import DataBundle, ModalTensors
from fuselab.data.corruptions import apply_modality_dropout, drop_modalities, keep_masks
from fuselab.losses import WeightedLoss
from fuselab.models.mlp import mlp_streams
from fuselab.models.multistream import MultiStream, PerModality
from fuselab.models.output import ModelOutput
from fuselab.train.config import TrainConfig
from fuselab.train.loop import fit, make_fabric

LOOP = Path(__file__).resolve().parents[1] / "src" / "fuselab" / "train" / "loop.py"


def test_the_loop_imports_nothing_from_the_models():
    imported = []
    for node in ast.walk(ast.parse(LOOP.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
    assert "fuselab.train.config" in imported  # the walk sees the module's imports
    assert not [m for m in imported if m.startswith(("fuselab.models", "fuselab.fusion"))], imported


def _batch(n: int = 6) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(n, 5, generator=g) + 3, "b": torch.randn(n, 4, generator=g) + 3}


def test_a_multistream_keeps_its_inputs_and_takes_keep_masks_from_the_same_numbers():
    model = mlp_streams(dims={"a": 5, "b": 4}, num_classes=2, fusion={"name": "concat"}, hidden=8)
    x, rates = _batch(), {"a": 0.5, "b": 0.0}
    inputs, extra = apply_modality_dropout(model, x, rates, torch.Generator().manual_seed(7))
    assert inputs is x  # nothing zeroed at the input: the stream is zeroed at the encoder's output
    assert list(extra) == ["keep"] and list(extra["keep"]) == ["a"]  # rate 0 draws no mask
    expected = keep_masks(6, rates, torch.Generator().manual_seed(7))
    assert torch.equal(extra["keep"]["a"], expected["a"])
    assert 0 < extra["keep"]["a"].sum() < 6  # seed 7 keeps some samples and drops others
    # the masks are those of the input dropout of any other model: the same samples lose the modality
    zeroed = drop_modalities(x, rates, torch.Generator().manual_seed(7))
    assert torch.equal((zeroed["a"].abs().sum(1) > 0).float(), extra["keep"]["a"])


class Plain(nn.Module):
    """A model without hooks: it concatenates its inputs and records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(9, 2)
        self.seen: list[dict[str, Tensor]] = []

    def forward(self, x: dict[str, Tensor]) -> ModelOutput:
        self.seen.append({m: v.detach().clone() for m, v in x.items()})
        return ModelOutput(logits=self.fc(torch.cat([x["a"], x["b"]], 1)))


def test_a_model_without_the_hook_gets_zeroed_inputs():
    x, rates = _batch(), {"a": 0.5, "b": 0.5}
    inputs, extra = apply_modality_dropout(Plain(), x, rates, torch.Generator().manual_seed(7))
    assert extra == {}
    expected = drop_modalities(x, rates, torch.Generator().manual_seed(7))
    assert all(torch.equal(inputs[m], expected[m]) for m in x)
    assert (inputs["a"].abs().sum(1) == 0).any() and (inputs["a"].abs().sum(1) > 0).any()


def _bundle(n: int = 16) -> DataBundle:
    g = torch.Generator().manual_seed(0)

    def split() -> ModalTensors:
        y = torch.arange(n) % 2
        return ModalTensors({"a": torch.randn(n, 5, generator=g) + 2, "b": torch.randn(n, 4, generator=g) + 2}, y)

    return DataBundle(train=split(), val=split(), test=split(), dims={"a": 5, "b": 4}, num_classes=2,
                      forms={"a": "vector", "b": "vector"})


def _fit(model: nn.Module, dropout: object, epochs: int = 2):
    cfg = dataclasses.replace(TrainConfig(), epochs=epochs, batch_size=8, accelerator="cpu", checkpoint=False,
                              modality_dropout=dropout)
    return fit(model, _bundle(), WeightedLoss([{"name": "ce"}]), cfg, seed=3, fabric=make_fabric(cfg), evaluate_test=False)


class OwnDropout(Plain):
    """A plugin model with its own modality dropout (it adds 100 to a dropped input) and its own statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, float]] = []
        self.kwargs: list[dict[str, object]] = []

    def modality_dropout(self, inputs, rates, generator):
        self.calls.append(dict(rates))
        return {m: v + 100 for m, v in inputs.items()}, {"flag": len(self.calls)}

    def forward(self, x: dict[str, Tensor], **kwargs: object) -> ModelOutput:
        self.kwargs.append(kwargs)
        return super().forward(x)

    def training_stats(self) -> dict[str, float]:
        return {"my.stat": float(len(self.calls))}


def test_fit_calls_the_models_own_dropout_and_statistics_hooks():
    model = OwnDropout()
    result = _fit(model, {"b": 0.25})
    assert model.calls == [{"a": 0.0, "b": 0.25}] * 4  # 2 epochs x 2 batches, rates per modality
    train_calls = [k for k in model.kwargs if k]
    assert [k["flag"] for k in train_calls] == [1, 2, 3, 4]  # its extra arguments reach its forward
    assert all(float(s["a"].min()) > 50 for s, k in zip(model.seen, model.kwargs) if k)  # its own inputs
    assert [row["my.stat"] for row in result.history] == [2.0, 4.0]  # read once per epoch, after its steps


def test_fit_without_dropout_never_calls_the_hook():
    model = OwnDropout()
    result = _fit(model, 0.0, epochs=1)
    assert model.calls == [] and all(k == {} for k in model.kwargs)
    assert result.history[0]["my.stat"] == 0.0


def test_fit_zeroes_the_inputs_of_a_model_without_hooks():
    model = Plain()
    result = _fit(model, {"a": 1.0}, epochs=1)
    train_seen = model.seen[:2]  # the two training batches come first, then validation
    assert all(float(s["a"].abs().sum()) == 0.0 for s in train_seen)
    assert all(float(s["b"].abs().sum()) > 0.0 for s in train_seen)
    assert float(model.seen[-1]["a"].abs().sum()) > 0  # validation is never dropped
    assert set(result.history[0]) == {"epoch", "train_loss", "train_ce", "val_accuracy", "val_macro_f1", "val_loss", "lr"}


def test_multistream_training_stats_name_every_exchange_by_its_path():
    exchange = nn.Sequential(create_fusion("channel-exchange", dims={"a": 4, "b": 4}), PerModality({"a": nn.Identity(), "b": nn.Identity()}))
    model = MultiStream(encoders={"a": nn.Identity(), "b": nn.Identity()}, exchange=exchange,
                        merge=create_fusion("concat", dims={"a": 4, "b": 4}), head=nn.Linear(8, 2))
    with torch.no_grad():
        exchange[0].norms["a"].weight.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))  # two scales below the threshold
    stats = model.training_stats()
    own = exchange[0].epoch_stats()
    assert stats == {f"exchange.0.{k}": v for k, v in own.items()}
    assert stats["exchange.0.exchanged/a"] == pytest.approx(2 / 4)
    assert stats["exchange.0.exchanged/b"] == 0.0
    plain = mlp_streams(dims={"a": 5, "b": 4}, num_classes=2, fusion={"name": "concat"}, hidden=8)
    assert plain.training_stats() == {}  # no operator with epoch statistics
