"""The training loop: Lightning Fabric for devices and precision, our own loop for everything else.

Nothing here knows about fusion: it trains any module that maps a modality dict to a ``ModelOutput``.
Per step the loop does forward, the weighted loss, backward, optional clipping, the optimiser and the
schedule; loss values stay on the device and are read once per epoch (no per-step sync).
"""

from __future__ import annotations

import contextlib
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

from fuselab.data.core import DataBundle, ModalTensors
from fuselab.data.corruptions import apply_modality_dropout, dropout_rates
from fuselab.losses import WeightedLoss
from fuselab.metrics import classification_metrics, predictions, task_metrics
from fuselab.errors import ConfigError
from fuselab.train.config import TrainConfig
from fuselab.train.optim import freeze_batch_norms, make_optimizer, proximal_modules, proximal_steps


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per epoch: train loss terms, validation metrics, lr
    best_epoch: int
    val: dict[str, float]  # validation metrics of the best checkpoint
    test: dict[str, float]  # test metrics of the best checkpoint
    test_pred: Tensor  # (N,) predicted class per test sample (per labelled test pixel for dense tasks)
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
def predict(model: nn.Module, split: ModalTensors, batch_size: int, *, precision: str | None = None) -> Tensor:
    """Logits of a whole split, in order, as float32. With a mixed ``precision`` (``bf16-mixed``,
    ``16-mixed``) the forward passes run under its autocast (a Fabric-wrapped model applies its own)."""
    model.eval()
    with autocast(precision, split.y.device):
        return torch.cat([model(x).logits.float() for x, _ in split.batches(batch_size)])


def autocast(precision: str | None, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The autocast of a mixed Fabric ``precision`` on ``device`` (``bf16-mixed``: bfloat16; ``16-mixed``:
    float16, or bfloat16 on a CPU, where Fabric makes the same substitution); a no-op for every other precision,
    so a model outside Fabric (a loaded run) evaluates as it trained."""
    device = torch.device(device)
    name = str(precision or "")
    if name in ("bf16-mixed", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if name in ("16-mixed", "16"):
        return torch.autocast(device.type, dtype=torch.float16 if device.type != "cpu" else torch.bfloat16)
    return contextlib.nullcontext()


def pinned_copies(device: torch.device | str) -> bool:
    """Whether a dataset goes to ``device`` through pinned (page-locked) host memory with
    ``non_blocking=True`` copies: only for a CUDA device (pinning needs a CUDA driver; a copy to the CPU is no
    copy, and other backends gain nothing from it)."""
    return torch.device(device).type == "cuda"


def split_to_device(split: ModalTensors, device: torch.device | str, *, channels_last: bool = False) -> ModalTensors:
    """``split`` on ``device``: pinned, non-blocking copies to a CUDA device (:func:`pinned_copies`), plain
    ``.to`` otherwise; with ``channels_last`` its maps ``(N, C, H, W)`` are laid out channels-last (batches
    indexed from them keep that layout)."""
    device = torch.device(device)
    pinned = pinned_copies(device)

    def move(t: Tensor) -> Tensor:
        if pinned and t.device.type == "cpu":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    x = {m: move(v) for m, v in split.x.items()}
    if channels_last:
        x = {m: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for m, v in x.items()}
    return dataclasses.replace(split, x=x, y=move(split.y))


def data_to_device(data: DataBundle, device: torch.device | str, *, test: bool = True,
                   channels_last: bool = False) -> DataBundle:
    """``data``'s splits on ``device`` (:func:`split_to_device`); ``test=False`` leaves the test split where
    it is (tuning never touches it)."""
    move = lambda split: split_to_device(split, device, channels_last=channels_last)  # noqa: E731
    return dataclasses.replace(data, train=move(data.train), val=move(data.val), test=move(data.test) if test else data.test)


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
    evaluate_test: bool = True,
) -> FitResult:
    """Train ``model`` on ``data.train``, pick the best epoch on ``data.val``, evaluate it on ``data.test``.

    With ``evaluate_test=False`` (tuning) the test split is never touched, not even moved to the device:
    the result's test metrics are empty and its test predictions have no rows.

    With ``resume_path``, the whole training state is saved there every ``cfg.checkpoint_every`` seconds
    (at an epoch's end), and a state found there at the start is resumed: a killed run continues where it
    was and ends with the same result as an uninterrupted one.

    The metrics are those of ``data.task`` (``fuselab.metrics``). A model with ``needs_training = False``
    (e.g. ``cva``) is only evaluated.
    """
    data = data_to_device(data, fabric.device, test=evaluate_test, channels_last=bool(getattr(cfg, "channels_last", False)))
    metric_fn = _metric_fn(data.task)
    if getattr(model, "needs_training", True) is False:
        return _evaluate_only(model.to(fabric.device), data, cfg, metric_fn, evaluate_test)
    run = _Training.start(model, data, loss, cfg, seed=seed, fabric=fabric)
    model = run.model
    state = _Selection()
    if resume_path is not None and resume_path.is_file():
        state = run.resume(resume_path)
    last_save = time.monotonic()
    for epoch in range(state.first_epoch, cfg.epochs):
        means, names = run.train_epoch(data.train, epoch)
        val = {k: float(v) for k, v in metric_fn(predict(model, data.val, cfg.eval_batch_size), data.val.y, data.num_classes).items()}
        row = run.epoch_row(epoch, means, names, val)
        state.history.append(row)
        fabric.log_dict({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        state.update(epoch, val, model, cfg)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if cfg.patience and state.stale >= cfg.patience:
            break
        if resume_path is not None and fabric.is_global_zero and time.monotonic() - last_save >= cfg.checkpoint_every:
            run.save(resume_path, state, epoch)
            last_save = time.monotonic()
    if cfg.select == "last":
        state.best_epoch, state.best_state = len(state.history) - 1, {k: v.detach().clone() for k, v in model.state_dict().items()}
    history, best_epoch, best_state = state.history, state.best_epoch, state.best_state
    assert best_state is not None
    model.load_state_dict(best_state)
    val_logits = predict(model, data.val, cfg.eval_batch_size)
    as_float = lambda d: {k: float(v) for k, v in d.items()}  # noqa: E731
    test, test_pred, test_true = _test_metrics(model, data, cfg, metric_fn) if evaluate_test else _no_test()
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        val=as_float(metric_fn(val_logits, data.val.y, data.num_classes)),
        test=test,
        test_pred=test_pred.cpu(),
        test_true=test_true.cpu(),
        state_dict={k: v.cpu() for k, v in best_state.items()},
    )


def _metric_fn(task: str) -> Callable[..., dict[str, Tensor]]:
    """The metrics of a task, called as ``metric_fn(logits, y, num_classes)``."""
    if task == "classification":
        return classification_metrics
    return lambda logits, y, k: task_metrics(task, logits, y, k)


@dataclasses.dataclass
class _Selection:
    """The best epoch so far and the history: what picks the returned weights, saved with a resumable state."""

    best_score: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = -1
    best_state: dict[str, Tensor] | None = None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    stale: int = 0  # epochs since the last improvement (for train.patience)
    first_epoch: int = 0

    def update(self, epoch: int, val: dict[str, float], model: nn.Module, cfg: TrainConfig) -> None:
        """Keep this epoch's weights if its validation score is the best so far (``cfg.monitor``; ties on a
        small validation set are common: the lower validation loss breaks them)."""
        score = (-1.0 if cfg.monitor == "loss" else 1.0) * val[cfg.monitor]
        improved = score > self.best_score or (score == self.best_score and val["loss"] < self.best_loss)
        if improved:
            self.best_score, self.best_loss = score, val["loss"]
            if cfg.select == "best":
                self.best_epoch = epoch
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.stale = 0 if improved else self.stale + 1


@dataclasses.dataclass
class _Training:
    """One training run's moving parts: the (Fabric-wrapped) model, optimiser, schedule, batch order, and the
    model's own hooks (modality dropout, operator statistics)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    forward: Callable[..., Any]
    inner: nn.Module
    proximal: list[Any]
    loss: WeightedLoss
    cfg: TrainConfig
    fabric: Fabric
    seed: int
    dropout: dict[str, float]
    training_stats: Callable[[], dict[str, float]] | None

    @classmethod
    def start(cls, model: nn.Module, data: DataBundle, loss: WeightedLoss, cfg: TrainConfig, *, seed: int,
              fabric: Fabric) -> "_Training":
        if getattr(cfg, "channels_last", False):  # conv weights channels-last, like the maps (data_to_device)
            model = model.to(memory_format=torch.channels_last)
        fused = fabric.device.type in ("cpu", "cuda")  # one fused kernel instead of a loop over tensors
        optimizer = make_optimizer(model, cfg, fused=fused)
        proximal = proximal_modules(model)  # e.g. CEN's L1 on BN scales as a soft threshold after each step
        total_steps = cfg.epochs * data.train.training_steps(cfg.batch_size, merge_lone=cfg.last_batch == "merge")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))
        model, optimizer = fabric.setup(model, optimizer)
        generator = torch.Generator().manual_seed(seed)  # batch order: the same for every method of a seed
        inner = getattr(model, "module", model)  # Fabric's wrapper keeps the original: the model's own hooks
        # modality dropout: the rates come from the config, the random numbers from a generator seeded per
        # epoch (resumable); how a modality is dropped is the model's choice (``apply_modality_dropout``)
        try:
            dropout = dropout_rates(getattr(cfg, "modality_dropout", 0.0), data.modalities)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        stats = getattr(inner, "training_stats", None)  # e.g. MultiStream: its operators' epoch statistics
        return cls(model=model, optimizer=optimizer, scheduler=scheduler, generator=generator,
                   forward=_forward_fn(model, fabric, cfg.precision, compile=bool(getattr(cfg, "compile", False))), inner=inner, proximal=proximal, loss=loss,
                   cfg=cfg, fabric=fabric, seed=seed, dropout=dropout, training_stats=stats if callable(stats) else None)

    def train_epoch(self, train: ModalTensors, epoch: int) -> tuple[list[float], list[str]]:
        """One pass over the training split; returns the epoch's mean loss terms (total first) and the terms'
        names. Loss values stay on the device: one stack and one sync per epoch, none per step."""
        cfg, fabric, model, optimizer = self.cfg, self.fabric, self.model, self.optimizer
        world, rank = fabric.world_size, fabric.global_rank
        model.train()
        if cfg.freeze_bn and epoch >= cfg.freeze_bn_epoch:  # CEN's official recipe
            freeze_batch_norms(model)
        step_values: list[tuple[Tensor, ...]] = []
        drop_gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch) if any(self.dropout.values()) else None
        for x, y in train.batches(cfg.batch_size, generator=self.generator, shuffle=True,
                                 merge_lone=cfg.last_batch == "merge"):
            if world > 1:  # data parallel: each process takes its share of the same global batch
                x, y = {m: v[rank::world] for m, v in x.items()}, y[rank::world]
            if drop_gen is not None:
                x, extra = apply_modality_dropout(self.inner, x, self.dropout, drop_gen)
                output = self.forward(x, **extra)
            else:
                output = self.forward(x)
            total, values = self.loss(output, y)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(total)
            if cfg.grad_clip > 0:
                fabric.clip_gradients(model, optimizer, max_norm=cfg.grad_clip, error_if_nonfinite=False)
            optimizer.step()
            if self.proximal:
                proximal_steps(self.proximal, optimizer.param_groups[0]["lr"])
            self.scheduler.step()
            step_values.append((total.detach(), *(v.detach() for v in values.values())))
        epoch_means = torch.stack([torch.stack(v) for v in step_values]).sum(0) / len(step_values)
        if world > 1:
            epoch_means = fabric.all_reduce(epoch_means, reduce_op="mean")
        means, names = epoch_means.tolist(), list(values)
        if not all(math.isfinite(v) for v in means):
            bad = [n for n, v in zip(["loss", *names], means) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"training loss became non-finite at epoch {epoch} ({', '.join(bad)}); "
                "lower train.lr, enable train.grad_clip, or use 32-bit precision"
            )
        return means, names

    def epoch_row(self, epoch: int, means: list[float], names: list[str], val: dict[str, float]) -> dict[str, float]:
        """The history row of an epoch: mean training loss terms, validation metrics, the learning rate and
        the model's own statistics (e.g. the share of exchanged channels of each channel exchange)."""
        row = {"epoch": epoch, "train_loss": means[0], **{f"train_{n}": v for n, v in zip(names, means[1:])}}
        row.update({f"val_{k}": v for k, v in val.items()})
        row["lr"] = self.scheduler.get_last_lr()[0]
        if self.training_stats is not None:
            row.update(self.training_stats())
        return row

    def resume(self, path: Path) -> _Selection:
        """Load a saved training state into this run; returns its selection state."""
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only: never runs code
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        set_rng_states(state, self.fabric.device)
        best_score, best_loss, best_epoch, best_state = state["best"]
        return _Selection(best_score=best_score, best_loss=best_loss, best_epoch=best_epoch, best_state=best_state,
                          history=state["history"], stale=state["stale"], first_epoch=state["epoch"] + 1)

    def save(self, path: Path, selection: _Selection, epoch: int) -> None:
        """Save the whole training state after ``epoch`` (atomically)."""
        _save_resume_state(path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
            **rng_states(self.fabric.device),
            "best": (selection.best_score, selection.best_loss, selection.best_epoch, selection.best_state),
            "history": selection.history, "stale": selection.stale, "epoch": epoch,
        })


def rng_states(device: torch.device) -> dict[str, Tensor | None]:
    """The global random states a resumed run needs: the CPU's, and the CUDA device's where the model
    draws its dropout masks on one (None elsewhere)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def set_rng_states(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_states` (a state saved without ``cuda_rng``, or on another kind of device, restores
    the CPU's only)."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _test_metrics(model: nn.Module, data: DataBundle, cfg: TrainConfig,
                  metric_fn: Callable[..., dict[str, Tensor]]) -> tuple[dict[str, float], Tensor, Tensor]:
    test_logits = predict(model, data.test, cfg.eval_batch_size)
    test_pred, test_true = predictions(data.task, test_logits, data.test.y)
    return {k: float(v) for k, v in metric_fn(test_logits, data.test.y, data.num_classes).items()}, test_pred, test_true


def _no_test() -> tuple[dict[str, float], Tensor, Tensor]:
    return {}, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


def _evaluate_only(model: nn.Module, data: DataBundle, cfg: TrainConfig, metric_fn: Callable[..., dict[str, Tensor]],
                   evaluate_test: bool = True) -> FitResult:
    """Validation and test metrics of a model that learns nothing from the training split."""
    val_logits = predict(model, data.val, cfg.eval_batch_size)
    test, test_pred, test_true = _test_metrics(model, data, cfg, metric_fn) if evaluate_test else _no_test()
    as_float = lambda d: {k: float(v) for k, v in d.items()}  # noqa: E731
    return FitResult(
        history=[], best_epoch=-1,
        val=as_float(metric_fn(val_logits, data.val.y, data.num_classes)),
        test=test,
        test_pred=test_pred.cpu(), test_true=test_true.cpu(),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
    )


def _forward_fn(model: nn.Module, fabric: Fabric, precision: str, *, compile: bool = False) -> Callable[[Any], Any]:
    """The training forward. Fabric's module wrapper converts inputs and outputs for the precision on every
    call; for full and mixed precision that conversion is the identity (mixed precision is autocast), so
    the strategy's module (the DDP wrapper when distributed) is called under ``fabric.autocast()`` directly:
    the per-step walk over input and output collections cost about 2 % of a small model's step.

    With ``compile`` that module goes through ``torch.compile`` (it shares the parameters, so the state dict,
    the optimiser and the evaluation, which stays eager, see the same weights)."""
    inner = getattr(model, "_forward_module", None)
    if inner is None or not (precision.startswith(("32", "64")) or precision.endswith("-mixed")):
        return torch.compile(model) if compile else model
    module = torch.compile(inner) if compile else inner

    def forward(x: Any, **kwargs: Any) -> Any:
        with fabric.autocast():
            return module(x, **kwargs)

    return forward


def _save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill during the write leaves the previous state intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def make_fabric(cfg: TrainConfig, loggers: list[Any] | None = None) -> Fabric:
    """Lightning Fabric for a run's device options; one it cannot start with (``train.accelerator=cuda`` on a
    machine without a CUDA device, too many devices) is a one-line ``ConfigError``."""
    try:
        return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                      precision=cfg.precision, loggers=loggers or [])
    except (RuntimeError, ValueError) as exc:
        options = f"train.accelerator={cfg.accelerator}, train.devices={cfg.devices}, train.strategy={cfg.strategy}"
        raise ConfigError(f"Lightning Fabric cannot start with {options}: {str(exc).splitlines()[0]}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["FitResult", "NonFiniteLossError", "autocast", "classification_metrics", "count_parameters", "data_to_device", "fit",
           "make_fabric", "pinned_copies", "predict", "split_to_device", "warmup_cosine"]
