"""The training loop: Lightning Fabric for devices and precision, our own loop for everything else.

Nothing here knows about fusion: it trains any module that maps a modality dict to a ``ModelOutput``.
Per step the loop does forward, the weighted loss, backward, optional clipping, the optimiser and the
schedule; loss values stay on the device and are read once per epoch (no per-step sync).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from fuselab.data.core import DataBundle, ModalTensors
from fuselab.losses import WeightedLoss
from fuselab.train.config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per epoch: train loss terms, validation metrics, lr
    best_epoch: int
    val: dict[str, float]  # validation metrics of the best checkpoint
    test: dict[str, float]  # test metrics of the best checkpoint
    test_pred: Tensor  # (N,) predicted class per test sample
    test_true: Tensor  # (N,)
    state_dict: dict[str, Tensor]  # best weights


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate: linear warm-up over a share of the steps, then cosine to 0."""
    warm = max(1, int(round(warmup * total_steps))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def predict(model: nn.Module, split: ModalTensors, batch_size: int) -> Tensor:
    """Logits of a whole split, in order."""
    model.eval()
    return torch.cat([model(x).logits.float() for x, _ in split.batches(batch_size)])


def classification_metrics(logits: Tensor, target: Tensor, num_classes: int) -> dict[str, Tensor]:
    pred = logits.argmax(1)
    return {
        "accuracy": multiclass_accuracy(pred, target, num_classes=num_classes, average="micro"),
        "macro_f1": multiclass_f1_score(pred, target, num_classes=num_classes, average="macro"),
        "loss": nn.functional.cross_entropy(logits, target),
    }


def fit(
    model: nn.Module,
    data: DataBundle,
    loss: WeightedLoss,
    cfg: TrainConfig,
    *,
    seed: int,
    fabric: Fabric,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    resume_path: Path | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train``, pick the best epoch on ``data.val``, evaluate it on ``data.test``.

    With ``resume_path``, the whole training state is saved there every ``cfg.checkpoint_every`` seconds
    (at an epoch's end), and a state found there at the start is resumed: a killed run continues where it
    was and ends with the same result as an uninterrupted one.
    """
    data = data.to(fabric.device)
    fused = fabric.device.type in ("cpu", "cuda")  # one fused kernel instead of a loop over tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))
    model, optimizer = fabric.setup(model, optimizer)
    generator = torch.Generator().manual_seed(seed)  # batch order: the same for every method of a seed

    sign = -1.0 if cfg.monitor == "loss" else 1.0
    best_score, best_loss, best_epoch, best_state = -math.inf, math.inf, -1, None
    history: list[dict[str, float]] = []
    stale, first_epoch = 0, 0
    if resume_path is not None and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best_score, best_loss, best_epoch, best_state = state["best"]
        history, stale, first_epoch = state["history"], state["stale"], state["epoch"] + 1
    last_save = time.monotonic()
    for epoch in range(first_epoch, cfg.epochs):
        model.train()
        sums: Tensor | None = None
        for x, y in data.train.batches(cfg.batch_size, generator=generator, shuffle=True):
            output = model(x)
            total, values = loss(output, y)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(total)
            if cfg.grad_clip > 0:
                fabric.clip_gradients(model, optimizer, max_norm=cfg.grad_clip, error_if_nonfinite=False)
            optimizer.step()
            scheduler.step()
            step_values = torch.stack([total.detach(), *(v.detach() for v in values.values())])
            sums = step_values if sums is None else sums + step_values
        assert sums is not None
        means = (sums / steps_per_epoch).tolist()  # the one sync of the epoch
        if not all(math.isfinite(v) for v in means):
            bad = [n for n, v in zip(["loss", *values], means) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"training loss became non-finite at epoch {epoch} ({', '.join(bad)}); "
                "lower train.lr, enable train.grad_clip, or use 32-bit precision"
            )
        val = {k: float(v) for k, v in classification_metrics(predict(model, data.val, cfg.eval_batch_size), data.val.y, data.num_classes).items()}
        row = {"epoch": epoch, "train_loss": means[0], **{f"train_{n}": v for n, v in zip(values, means[1:])}}
        row.update({f"val_{k}": v for k, v in val.items()})
        row["lr"] = scheduler.get_last_lr()[0]
        history.append(row)
        fabric.log_dict({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        score = sign * val[cfg.monitor]
        # ties on a small validation set are common: the lower validation loss breaks them
        improved = score > best_score or (score == best_score and val["loss"] < best_loss)
        if improved:
            best_score, best_loss = score, val["loss"]
            if cfg.select == "best":
                best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stale = 0 if improved else stale + 1
        if on_epoch is not None:
            on_epoch(epoch, row)
        if cfg.patience and stale >= cfg.patience:
            break
        if resume_path is not None and time.monotonic() - last_save >= cfg.checkpoint_every:
            _save_resume_state(resume_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "best": (best_score, best_loss, best_epoch, best_state),
                "history": history, "stale": stale, "epoch": epoch,
            })
            last_save = time.monotonic()
    if cfg.select == "last":
        best_epoch, best_state = len(history) - 1, {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    val_logits = predict(model, data.val, cfg.eval_batch_size)
    test_logits = predict(model, data.test, cfg.eval_batch_size)
    as_float = lambda d: {k: float(v) for k, v in d.items()}  # noqa: E731
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        val=as_float(classification_metrics(val_logits, data.val.y, data.num_classes)),
        test=as_float(classification_metrics(test_logits, data.test.y, data.num_classes)),
        test_pred=test_logits.argmax(1).cpu(),
        test_true=data.test.y.cpu(),
        state_dict={k: v.cpu() for k, v in best_state.items()},
    )


def _save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill during the write leaves the previous state intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def make_fabric(cfg: TrainConfig, loggers: list[Any] | None = None) -> Fabric:
    return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, precision=cfg.precision, loggers=loggers or [])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["FitResult", "NonFiniteLossError", "classification_metrics", "count_parameters", "fit", "make_fabric", "predict", "warmup_cosine"]
