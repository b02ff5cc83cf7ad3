"""Metric sets per task, a thin layer over torchmetrics.

Legend: n samples (or labelled pixels), k classes, b batch, h height, w width.

Every task reports ``accuracy`` (the primary metric name comparisons and reports rely on) and its own
metrics as further keys:
- ``classification``: accuracy, macro_f1 (and the cross-entropy ``loss``);
- ``change-detection``: accuracy (overall accuracy), kappa (Cohen's), f1_change and iou_change (F1 and IoU of
  the change class, class 1), macro_f1; on labelled pixels only;
- ``segmentation``: accuracy (pixel accuracy), miou (mean IoU over the classes present in the reference or the
  prediction), macro_f1; on labelled pixels only.
Dense targets are label maps ``(B, H, W)`` in which ``IGNORE_INDEX`` marks unlabelled pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fuselab.data.core import IGNORE_INDEX, TASKS

METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "change-detection": ("accuracy", "kappa", "f1_change", "iou_change", "macro_f1"),
    "segmentation": ("accuracy", "miou", "macro_f1"),
}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    return task


def labelled(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Dense logits (B, K, H, W) and targets (B, H, W) -> per labelled pixel logits (N, K) and targets (N,)."""
    flat_logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    flat_target = target.reshape(-1)
    keep = flat_target != IGNORE_INDEX
    return flat_logits[keep], flat_target[keep]


def _classes(pred: Tensor, target: Tensor, num_classes: int) -> dict[str, Tensor]:
    """Accuracy and macro-F1 of predicted classes (torchmetrics, imported on first use: it loads matplotlib)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    return {
        "accuracy": multiclass_accuracy(pred, target, num_classes=num_classes, average="micro"),
        "macro_f1": multiclass_f1_score(pred, target, num_classes=num_classes, average="macro"),
    }


def classification_metrics(logits: Tensor, target: Tensor, num_classes: int) -> dict[str, Tensor]:
    pred = logits.argmax(1)
    return {**_classes(pred, target, num_classes), "loss": F.cross_entropy(logits, target)}


def _confusion_metrics(task: str, pred: Tensor, target: Tensor, num_classes: int) -> dict[str, Tensor]:
    """The dense tasks' metrics from one confusion matrix (rows: reference, columns: prediction)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    # counts in float64 on the CPU (a classes x classes matrix; MPS has no float64)
    cm = multiclass_confusion_matrix(pred, target, num_classes=num_classes).to("cpu", torch.float64)
    total = cm.sum().clamp_min(1)
    tp = cm.diagonal()
    ref, hat = cm.sum(1), cm.sum(0)
    accuracy = tp.sum() / total
    f1 = torch.where(ref + hat > 0, 2 * tp / (ref + hat).clamp_min(1), torch.zeros_like(tp))
    union = ref + hat - tp
    iou = tp / union.clamp_min(1)
    present = union > 0
    out = {"accuracy": accuracy, "macro_f1": f1[present].mean() if present.any() else accuracy.new_zeros(())}
    if task == "change-detection":
        expected = (ref * hat).sum() / total**2
        out["kappa"] = (accuracy - expected) / (1 - expected) if expected < 1 else accuracy.new_ones(())
        out["f1_change"], out["iou_change"] = f1[1], iou[1]
    else:
        out["miou"] = iou[present].mean() if present.any() else accuracy.new_zeros(())
    return {k: v.float() for k, v in out.items()}


def prediction_metrics(task: str, pred: Tensor, target: Tensor, num_classes: int) -> dict[str, Tensor]:
    """A task's metrics from predicted classes and references of the same shape (ignored pixels dropped)."""
    check_task(task)
    keep = target != IGNORE_INDEX
    pred, target = pred[keep], target[keep]
    if task == "classification":
        return _classes(pred, target, num_classes)
    return _confusion_metrics(task, pred, target, num_classes)


def task_metrics(task: str, logits: Tensor, target: Tensor, num_classes: int) -> dict[str, Tensor]:
    """A task's metrics and the cross-entropy ``loss`` from logits: (N, K) / (N,) for classification, (B, K, H, W)
    / (B, H, W) for the dense tasks (on labelled pixels only)."""
    if task == "classification":
        return classification_metrics(logits, target, num_classes)
    check_task(task)
    flat_logits, flat_target = labelled(logits, target)
    out = _confusion_metrics(task, flat_logits.argmax(1), flat_target, num_classes)
    out["loss"] = F.cross_entropy(flat_logits, flat_target) if len(flat_target) else flat_logits.new_zeros(())
    return out


def predictions(task: str, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted classes and references as flat vectors: per sample, or per labelled pixel for dense tasks."""
    if task == "classification":
        return logits.argmax(1), target
    flat_logits, flat_target = labelled(logits, target)
    return flat_logits.argmax(1), flat_target


__all__ = ["METRICS", "classification_metrics", "labelled", "prediction_metrics", "predictions", "task_metrics"]
