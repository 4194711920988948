"""The training loop of one run, top to bottom.

Per step: forward (optionally under autocast), loss, backward, the method's step (plain
``optimizer.step()`` or ``optimizer.step(closure)`` for SAM-like methods), the LR schedule.
Every ``log_every`` batches of an epoch (and at its end) a train record; at every epoch end
an evaluation record (test loss and accuracy, plus the tracked diagnostics); checkpoints
through the ``save`` callback every ``checkpoint_every`` steps and at every epoch end. A
non-finite training loss stops the run with status ``"diverged"`` and a status record saying
where and why.

Records (one dict per JSON line of ``metrics.jsonl``):

- ``{"kind": "train", "step", "epoch", "train_loss", "train_acc", "lr", "wall_s"}``: means over
  the steps since the previous train record; ``epoch`` is fractional (steps / steps per epoch).
- ``{"kind": "eval", "step", "epoch", "test_loss", "test_acc", "wall_s", ...tracked}``
  (plus ``val_loss``, ``val_acc`` when the run holds out a validation split):
  ``epoch`` counts completed epochs.
- ``{"kind": "status", "status", "step", "epoch", "message"}``: why a run stopped early.

``wall_s`` is cumulative training time in seconds, excluding evaluation, diagnostics and
checkpoint writing (the device is synchronised before the clock is read).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsbp.experiments.build import Method, RunData
from dsbp.experiments.config import RunConfig

try:  # tqdm is an optional extra ("progress"); without it runs are silent.
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - exercised only without the extra
    tqdm = None


@dataclass
class TrainState:
    """Where a run is; everything a checkpoint holds besides model/optimizer/schedule tensors.

    Attributes:
        epoch: the epoch in progress (0-based); ``epochs`` once finished.
        batch: the next batch index within ``epoch``.
        step: optimizer steps taken.
        wall_s: training seconds so far (excluding evaluation and checkpoints).
        window_loss, window_correct, window_n, window_steps: sums since the last train record.
        records: metric records so far (become ``metrics.jsonl``).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    wall_s: float = 0.0
    window_loss: float = 0.0
    window_correct: int = 0
    window_n: int = 0
    window_steps: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    def scalars(self) -> dict[str, Any]:
        """Everything except ``records`` (for the checkpoint; records go to metrics.jsonl)."""
        return {k: v for k, v in self.__dict__.items() if k != "records"}


@dataclass
class Outcome:
    """How a run ended: ``status`` is ``"ok"`` or ``"diverged"``; ``message`` says why."""

    status: str
    message: str = ""


class Diverged(RuntimeError):
    """Raised inside the loop when the training loss is NaN or infinite."""


def autocast_context(
    amp: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for ``amp`` in {none, bf16, fp16} on ``device``."""
    if amp == "none":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, autocast: Callable[[], Any]) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy (fraction) of ``model`` on ``loader``.

    Returns:
        ``(test_loss, test_acc)``; the model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct, n = 0, 0
    for x, y in loader.iter_epoch(0):
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double().cpu()
        correct += int((logits.argmax(1) == y).sum())
        n += y.numel()
    model.train(was_training)
    return float(loss_sum) / max(n, 1), correct / max(n, 1)


def step_stats(first: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[float, int, int]:
    """Loss, correct predictions and examples of one step, over the global batch.

    Under ``torch.distributed`` with more than one rank (``dsbp bench --nproc N``, every rank
    holding an equal slice of the global batch) the three are all-reduced: the loss is the
    mean of the ranks' mean losses, which is the global batch's mean; correct and examples are
    summed. Every rank then sees the same loss, so all of them stop together on a non-finite
    one. With one process this is just the local values.

    Args:
        first: the closure's first-pass ``{"loss": scalar, "logits": (B, classes)}``.
        y: the (local) labels (B,).

    Returns:
        ``(loss, correct, n)``.
    """
    correct = (first["logits"].argmax(1) == y).sum()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(first["loss"]), int(correct), y.numel()
    t = torch.stack([first["loss"].double(), correct.double(),
                     torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    loss, c, n = t.tolist()
    return loss / dist.get_world_size(), int(c), int(n)


Tracker = Callable[..., dict[str, float]]


def train(
    cfg: RunConfig,
    *,
    method: Method,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: RunData,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    state: TrainState,
    device: torch.device,
    save: Callable[[TrainState], None],
    trackers: dict[str, Tracker] | None = None,
    callbacks: Iterable[Callable[[TrainState], None]] = (),
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    desc: str = "",
) -> Outcome:
    """Train ``method.model`` from ``state`` to the end of ``cfg.epochs``.

    Args:
        cfg: the run's config (epochs, log/checkpoint intervals, amp).
        method: model + optimizer (see :class:`~dsbp.experiments.build.Method`).
        scheduler: per-step LR schedule on ``method.optimizer``.
        data: train and test loaders.
        loss_fn: training loss ``loss_fn(logits, y)``.
        state: where to start (fresh, or restored from a checkpoint); updated in place.
        device: the device the loaders yield to (for clock synchronisation).
        save: called with ``state`` at each checkpoint (writes metrics and checkpoint).
        trackers: diagnostics run after every evaluation, ``name -> fn(model=, method=,
            data=, loss_fn=, state=)`` returning scalars merged into the eval record.
        callbacks: called with ``state`` after every optimizer step (tests use one to
            interrupt a run).
        scaler: a GradScaler for ``amp="fp16"`` (plain-step methods only).
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        ``Outcome("ok")``, or ``Outcome("diverged", message)`` after a non-finite loss.
    """
    # Any: SAM's step takes a closure and a scaler, Dom/Bulk-SGD's a batch.
    model, optimizer = method.model, cast(Any, method.optimizer)
    autocast = autocast_context(cfg.amp, device)
    steps_per_epoch = len(data.train)
    bar = None
    if progress and tqdm is not None:
        bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=state.step, desc=desc,
                   leave=False, dynamic_ncols=True)
    clock = time.perf_counter()  # start of the current timed stretch

    def lap() -> None:
        """Add the time since ``clock`` to ``state.wall_s`` (device synchronised)."""
        nonlocal clock
        _sync(device)
        now = time.perf_counter()
        state.wall_s += now - clock
        clock = now

    def restart_clock() -> None:
        nonlocal clock
        _sync(device)
        clock = time.perf_counter()

    def log_train() -> None:
        lap()
        w = max(state.window_steps, 1)
        state.records.append({
            "kind": "train", "step": state.step, "epoch": state.step / steps_per_epoch,
            "train_loss": state.window_loss / w,
            "train_acc": state.window_correct / max(state.window_n, 1),
            "lr": optimizer.param_groups[0]["lr"], "wall_s": state.wall_s,
        })
        state.window_loss, state.window_correct, state.window_n, state.window_steps = 0.0, 0, 0, 0

    try:
        model.train()
        for epoch in range(state.epoch, cfg.epochs):
            for x, y in data.train.iter_epoch(epoch, start_batch=state.batch):
                # x: (B, C, H, W) float, normalised; y: (B,) int64.
                optimizer.zero_grad(set_to_none=True)
                first: dict[str, torch.Tensor] = {}

                # Bound as defaults: the closure belongs to this step (SAM may call it twice).
                def closure(x=x, y=y, first=first) -> torch.Tensor:
                    with autocast():
                        logits = model(x)
                    loss = loss_fn(logits.float(), y)
                    if "loss" not in first:  # SAM calls this twice; report the first pass
                        first["loss"], first["logits"] = loss.detach(), logits.detach()
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    return loss

                if method.closure_step:
                    if scaler is not None:  # SAM unscales before its ascent and base step
                        optimizer.step(closure, scaler=scaler)
                        scaler.update()
                    else:
                        optimizer.step(closure)
                    loss_value, correct, n_seen = step_stats(first, y)
                else:
                    closure()
                    # global over ranks before the finite check: every rank takes one branch
                    loss_value, correct, n_seen = step_stats(first, y)
                    batch_kw = {"batch": (x, y)} if method.wants_batch else {}
                    if math.isfinite(loss_value):  # never step on a non-finite gradient
                        if scaler is not None:
                            scaler.unscale_(optimizer)  # DSBP projects unscaled gradients
                            scaler.step(optimizer, **batch_kw)
                            scaler.update()
                        else:
                            optimizer.step(**batch_kw)
                if not math.isfinite(loss_value):
                    raise Diverged(
                        f"training loss is {loss_value} at step {state.step + 1} "
                        f"(epoch {epoch}, batch {state.batch}); stopping this run"
                    )
                scheduler.step()

                state.step += 1
                state.batch += 1
                state.window_loss += loss_value
                state.window_correct += correct
                state.window_n += n_seen
                state.window_steps += 1
                # Windows restart at each epoch (the last one of an epoch may be shorter), so
                # no record mixes two epochs or covers a single stray step.
                if state.batch % cfg.log_every == 0:
                    log_train()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                for cb in callbacks:
                    cb(state)
                mid_epoch = state.batch < steps_per_epoch
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and mid_epoch:
                    lap()
                    save(state)
                    restart_clock()

            # ---- end of epoch: flush the train window, evaluate, track, checkpoint
            if state.window_steps:
                log_train()
            lap()
            state.epoch, state.batch = epoch + 1, 0
            test_loss, test_acc = evaluate(model, data.test, autocast)
            record = {"kind": "eval", "step": state.step, "epoch": state.epoch,
                      "test_loss": test_loss, "test_acc": test_acc, "wall_s": state.wall_s}
            if getattr(data, "val", None) is not None:  # RunConfig.val_split
                record["val_loss"], record["val_acc"] = evaluate(model, data.val, autocast)
            for name, tracker in (trackers or {}).items():
                values = tracker(model=model, method=method, data=data, loss_fn=loss_fn,
                                 state=state)
                record.update({f"{name}/{k}": v for k, v in values.items()})
            state.records.append(record)
            if bar is not None:
                bar.set_postfix(test_acc=f"{test_acc:.3f}", refresh=True)
            save(state)
            model.train()
            restart_clock()
    except Diverged as err:
        lap()
        state.records.append({"kind": "status", "status": "diverged", "step": state.step,
                              "epoch": state.step / steps_per_epoch, "message": str(err)})
        return Outcome("diverged", str(err))
    finally:
        if bar is not None:
            bar.close()
    return Outcome("ok")
