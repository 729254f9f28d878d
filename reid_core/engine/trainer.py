"""The training loop, kept small: every concern beyond forward/backward is a hook.

    before_train
    for epoch:                      before_epoch
        for step:                   before_step, run_step, after_step
                                    after_epoch        (LR schedule, evaluation, checkpoint, ...)
    after_train

A stop request (SIGTERM/SIGINT, or :meth:`Trainer.request_stop`) ends the loop after the current
step; hooks then get ``on_interrupt`` (the checkpoint hook saves) and :meth:`Trainer.train` returns
``ExitCode.INTERRUPTED``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from reid_core.config import ExperimentConfig, RuntimeConfig
from reid_core.data.samplers import EpochShuffleSampler
from reid_core.engine.exit_codes import ExitCode
from reid_core.objective.dual_branch import DualBranchObjective, split_views

__all__ = ["HookBase", "Precision", "TrainState", "Trainer", "TrainingDivergedError"]

log = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 (torch.cpu's probes; absent in some builds, then False)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@dataclass(frozen=True)
class Precision:
    """How training steps run on a device: the autocast dtype (None: float32 throughout) and
    whether images and weights use the channels_last memory format.

    CUDA: float16 autocast with a gradient scaler (``runtime.amp``) and ``runtime.channels_last``.
    CPU: float32, or with ``runtime.cpu_bf16`` (true, or 'auto' on a CPU with native bfloat16)
    bfloat16 autocast and channels_last (no scaler: bfloat16 has float32's range). Weights,
    optimiser state, memories and losses stay float32; evaluation runs in float32.
    """

    autocast_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def for_device(cls, runtime: RuntimeConfig, device: torch.device) -> Precision:
        if device.type == "cuda":
            return cls(torch.float16 if runtime.amp else None, runtime.channels_last)
        bf16 = runtime.cpu_bf16
        if bf16 is True or (bf16 == "auto" and _cpu_has_native_bf16()):
            return cls(torch.bfloat16, True)
        return cls(None, False)

    @property
    def scales_gradients(self) -> bool:
        return self.autocast_dtype == torch.float16

    def prepare(self, model: ModuleT) -> ModuleT:
        """``model`` in the memory format the steps feed it."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """Where the run is. ``step_in_epoch == steps_per_epoch`` means the epoch is complete."""

    max_epochs: int
    steps_per_epoch: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    losses: dict[str, float] = field(default_factory=dict)  # last step
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)
    # last evaluation (metric -> value) and its label-free signals (label_free/<name>), `epoch`
    metrics: dict[str, float] = field(default_factory=dict)
    clustering: dict[str, float] = field(default_factory=dict)  # last clustering's signals
    # each training image's nearest images at the last label-free evaluation (rank 0), which the
    # next one's neighbour_stability compares with
    neighbours: np.ndarray | None = None
    # metrics.jsonl's lines: the evaluation before training (epoch 0) if any, each finished epoch
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.max_epochs * self.steps_per_epoch

    @property
    def fraction_done(self) -> float:
        done = self.epoch * self.steps_per_epoch + self.step_in_epoch
        return min(1.0, done / max(1, self.total_steps))

    def epoch_means(self) -> dict[str, float]:
        n = max(1, self.step_in_epoch)
        return {k: v / n for k, v in self.epoch_loss_sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_loss_sums": dict(self.epoch_loss_sums),
            "metrics": dict(self.metrics),
            "clustering": dict(self.clustering),
            "neighbours": self.neighbours,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.epoch_loss_sums = dict(state["epoch_loss_sums"])
        self.metrics = dict(state["metrics"])
        self.clustering = dict(state.get("clustering", {}))
        self.neighbours = state.get("neighbours")
        self.history = list(state["history"])
        if self.step_in_epoch >= self.steps_per_epoch:  # saved at an epoch's end
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_loss_sums = {}


class HookBase:
    """Override any of these; ``self.trainer`` is set when the hook is registered."""

    trainer: Trainer

    def before_train(self) -> None: ...
    def after_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def after_epoch(self) -> None: ...
    def before_step(self) -> None: ...
    def after_step(self) -> None: ...
    def on_interrupt(self) -> None: ...


class Trainer:
    """Runs the unsupervised objective over the training loader.

    ``model`` may be wrapped in DistributedDataParallel; ``model_without_ddp`` is what hooks
    evaluate and save. ``cameras`` (the camera of each training image, in memory-slot order),
    when given, goes with every batch into the model (``model.camera_norm_train``).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: nn.Module,
        objective: DualBranchObjective,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: DataLoader[Any],
        sampler: EpochShuffleSampler,
        device: torch.device,
        model_without_ddp: nn.Module | None = None,
        cameras: Sequence[int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.cameras = None if cameras is None else torch.as_tensor(list(cameras), device=device)
        self.model = model
        self.model_without_ddp = model_without_ddp if model_without_ddp is not None else model
        self.objective = objective
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.sampler = sampler
        self.device = device
        self.precision = Precision.for_device(cfg.runtime, device)
        cpu_bf16 = device.type == "cpu" and self.precision.autocast_dtype is not None
        if cpu_bf16 and not _cpu_has_native_bf16():
            log.warning(
                "runtime.cpu_bf16=true on a CPU without AMX or AVX512-BF16: bfloat16 is "
                "emulated there and may be slower than float32"
            )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.scales_gradients)
        steps = sampler.batches_per_epoch
        if cfg.schedule.max_steps_per_epoch is not None:
            steps = min(steps, cfg.schedule.max_steps_per_epoch)
        self.state = TrainState(max_epochs=cfg.schedule.epochs, steps_per_epoch=steps)
        self.hooks: list[HookBase] = []
        self.stop_requested = False
        self.resumed = False

    # -- hooks -----------------------------------------------------------------------------

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()

    def request_stop(self) -> None:
        self.stop_requested = True

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a checkpoint holds (and what a resume restores)."""
        return {
            "model": self.model_without_ddp,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "trainer": self.state,
        }

    # -- loop ------------------------------------------------------------------------------

    def train(self) -> ExitCode:
        self._call("before_train")
        state = self.state
        while state.epoch < state.max_epochs:
            self.sampler.set_epoch(state.epoch, start_batch=state.step_in_epoch)
            self._call("before_epoch")
            self.model.train()
            batches = iter(self.train_loader)
            while state.step_in_epoch < state.steps_per_epoch:
                batch = next(batches)
                self._call("before_step")
                self.run_step(batch)
                state.step_in_epoch += 1
                state.global_step += 1
                self._call("after_step")
                # a stop on the epoch's last step waits for the epoch's hooks (below)
                if self.stop_requested and state.step_in_epoch < state.steps_per_epoch:
                    log.warning(
                        "stop requested: saving at epoch %d step %d",
                        state.epoch,
                        state.step_in_epoch,
                    )
                    self._call("on_interrupt")
                    return ExitCode.INTERRUPTED
            del batches
            self._call("after_epoch")
            state.epoch += 1
            state.step_in_epoch = 0
            state.epoch_loss_sums = {}
            if self.stop_requested:
                self._call("on_interrupt")
                return ExitCode.INTERRUPTED
        self._call("after_train")
        return ExitCode.OK

    def run_step(self, batch: Sequence[torch.Tensor]) -> None:
        view0, view1, indices = batch
        images = torch.cat([view0, view1]).to(self.device, non_blocking=True)
        if self.precision.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        indices = indices.to(self.device, non_blocking=True)
        dtype = self.precision.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if self.cameras is None:
                outputs = self.model(images)
            else:  # the two views' cameras, in the order of ``images``
                outputs = self.model(images, self.cameras[torch.cat([indices, indices])])
        out0, out1 = split_views(outputs)
        losses = self.objective(out0, out1, indices, self.state.epoch)
        total = losses["total"]
        # one device sync for every term's value
        values = dict(
            zip(losses, torch.stack(list(losses.values())).detach().tolist(), strict=True)
        )
        if not math.isfinite(values["total"]):
            raise TrainingDivergedError(
                f"loss is {values['total']} at epoch {self.state.epoch} step "
                f"{self.state.step_in_epoch} (terms: {values}); lower optim.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.objective.after_step(out0, out1, indices, self.state.epoch)
        self.state.losses = values
        for k, v in self.state.losses.items():
            self.state.epoch_loss_sums[k] = self.state.epoch_loss_sums.get(k, 0.0) + v
