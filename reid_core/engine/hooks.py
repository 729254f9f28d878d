"""The trainer's hooks: each one concern, each small. Order matters where noted in ``default_hooks``."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid_core import distributed as dist_utils
from reid_core.engine.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from reid_core.engine.trainer import HookBase, Trainer, TrainState
from reid_core.evaluation.label_free import cameras_fall_back, label_free_signals
from reid_core.model_io import save_model
from reid_core.run_dir import EpochMetrics, Progress, RunDir, RunStatus

__all__ = [
    "CameraNormHook",
    "CheckpointHook",
    "EvaluationHook",
    "EvaluationSchedule",
    "FinalModelHook",
    "LRSchedulerHook",
    "LabelFreeHook",
    "MemoryInitHook",
    "NeighbourPriorHook",
    "ProgressHook",
    "PseudoLabelHook",
    "StopSignalHook",
]

log = logging.getLogger(__name__)

Evaluator = Callable[[torch.nn.Module], dict[str, float]]
T = TypeVar("T")


class StopSignalHook(HookBase):
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit with ``INTERRUPTED``.

    Under torch.distributed every rank must stop after the same step, so ranks agree on the flag
    after each step (one tiny all-reduce).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.trainer.request_stop()

    def before_train(self) -> None:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def after_step(self) -> None:
        if dist_utils.is_distributed():
            flag = torch.tensor([float(self.trainer.stop_requested)], device=self.trainer.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.trainer.stop_requested = bool(flag.item())

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def after_train(self) -> None:
        self._restore()

    def on_interrupt(self) -> None:
        self._restore()


class MemoryInitHook(HookBase):
    """Fill the memories from a forward pass before the first epoch (not on resume)."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader

    def before_train(self) -> None:
        if self.trainer.resumed:
            return
        model = self.trainer.model_without_ddp
        self.trainer.objective.initialise(model, self.loader, self.trainer.device)  # type: ignore[arg-type]


class NeighbourPriorHook(HookBase):
    """Gives the objective the prior's neighbours (``loss.prior``) before training, when the run
    (or the epoch it resumes at) still has prior epochs ahead.

    ``descriptors()`` returns the training images' hand-crafted descriptors (N, P, D) in
    memory-slot order; every rank computes them itself (a deterministic function of the images).
    """

    def __init__(self, descriptors: Callable[[], torch.Tensor]) -> None:
        self.descriptors = descriptors

    def before_train(self) -> None:
        if not self.trainer.cfg.loss.uses_prior(self.trainer.state.epoch):
            return
        self.trainer.objective.set_neighbour_prior(self.descriptors())


class PseudoLabelHook(HookBase):
    """Pseudo labels for ``loss.objective=cluster_contrast``: at the start of every
    ``every_n_epochs`` (and of the first epoch a run trains) rank 0 runs ``labeller(model,
    epoch, previous_labels, global_step) -> (features, clustering)``
    (:class:`reid_core.clustering.PseudoLabeller`); every rank receives the features and labels,
    rebuilds its memories from them
    (:meth:`reid_core.objective.cluster_branch.ClusterContrastBranch.relabel`) and gives the
    sampler the labels, so memories and batches are identical on every rank. The clustering's
    signals go to ``state.clustering`` (``cluster/*`` in metrics.jsonl and progress.json).

    A degenerate clustering (no cluster, or one holding more than
    ``cluster.max_cluster_fraction`` of the images) is not trained on: a warning says why and
    the previous labels stay; when there are none yet, every image is its own cluster for the
    epoch (instance discrimination). A resumed run takes its labels from the checkpoint.
    """

    def __init__(
        self,
        labeller: Callable[
            [torch.nn.Module, int, np.ndarray | None, int], tuple[torch.Tensor, Any]
        ],
        every_n_epochs: int,
    ) -> None:
        self.labeller = labeller
        self.every_n_epochs = every_n_epochs

    @property
    def _branch(self) -> Any:
        branch = self.trainer.objective.clusters
        assert branch is not None, "PseudoLabelHook needs loss.objective=cluster_contrast"
        return branch

    def _give_sampler(self, labels: np.ndarray) -> None:
        set_labels = getattr(self.trainer.sampler, "set_labels", None)
        if set_labels is not None:
            set_labels(labels, self._branch.slot_cameras.cpu().numpy())

    def before_train(self) -> None:
        if self.trainer.resumed and self._branch.has_labels:
            self._give_sampler(self._branch.labels.cpu().numpy())

    def before_epoch(self) -> None:
        state = self.trainer.state
        due = state.epoch % self.every_n_epochs == 0 and state.step_in_epoch == 0
        if not due and self._branch.has_labels:
            return
        result: Any = None
        features = None
        if dist_utils.is_main_process():
            rng = capture_rng_state()
            previous = self._branch.labels.cpu().numpy() if self._branch.has_labels else None
            model = self.trainer.model_without_ddp
            features, clustering = self.labeller(model, state.epoch, previous, state.global_step)
            restore_rng_state(rng)
            result = (clustering.labels, clustering.stats.as_metrics(), clustering.degenerate)
        received = dist_utils.broadcast_object(result)
        assert isinstance(received, tuple)
        labels: np.ndarray = received[0]
        stats: dict[str, float] = received[1]
        degenerate: str | None = received[2]
        num, dim = len(labels), self._branch.memory.dim
        if features is None:
            features = torch.empty((num, dim))
        features = dist_utils.broadcast_tensor(features.to(self.trainer.device)).cpu()
        if degenerate is not None:
            kept = self._branch.has_labels
            log.warning(
                "epoch %d: %s; %s",
                state.epoch + 1,
                degenerate,
                "training on the previous pseudo labels"
                if kept
                else "no previous labels: every image is its own cluster this epoch",
            )
            stats = {**stats, "cluster/degenerate": 1.0}
            labels = self._branch.labels.cpu().numpy() if kept else np.arange(num)
        self._branch.relabel(features, labels)
        self._give_sampler(np.asarray(labels))
        state.clustering = stats


class LRSchedulerHook(HookBase):
    """Steps the epoch-based LR schedule; records the learning rates in the epoch's history."""

    def after_epoch(self) -> None:
        self.trainer.scheduler.step()


@dataclass(frozen=True)
class EvaluationSchedule:
    """When a model is evaluated: before training with ``at_start`` (not when a run resumes),
    after every ``every_n_epochs``-th epoch and after the last one."""

    every_n_epochs: int
    at_start: bool

    def before_training(self, trainer: Trainer) -> bool:
        return self.at_start and not trainer.resumed

    def after_epoch(self, state: TrainState) -> bool:
        """Whether the model is evaluated at the end of the epoch under way."""
        done = state.epoch + 1
        return done % self.every_n_epochs == 0 or done == state.max_epochs


def _on_main_process(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result broadcast to every rank. Evaluating draws no random
    numbers on purpose, but the RNG states are restored anyway, so that evaluating or not never
    changes the training trajectory."""
    result: Any = None
    if dist_utils.is_main_process():
        rng = capture_rng_state()
        result = compute()
        restore_rng_state(rng)
    return cast(T, dist_utils.broadcast_object(result))


class EvaluationHook(HookBase):
    """Evaluates on rank 0 on its :class:`EvaluationSchedule` (``every_n_epochs``, the last
    epoch, optionally ``at_start``).

    ``evaluator(model) -> {"mAP": .., "R1": ..}`` (percent). The result is broadcast so every
    rank's history is the same; it replaces ``state.metrics`` (with the ``epoch``).
    """

    def __init__(self, evaluator: Evaluator, every_n_epochs: int, at_start: bool) -> None:
        self.evaluator = evaluator
        self.schedule = EvaluationSchedule(every_n_epochs, at_start)
        self.initial_metrics: dict[str, float] | None = None

    def _evaluate(self) -> dict[str, float]:
        metrics = _on_main_process(lambda: self.evaluator(self.trainer.model_without_ddp))
        assert isinstance(metrics, dict)
        return metrics

    def evaluates_before_training(self) -> bool:
        return self.schedule.before_training(self.trainer)

    def evaluates_after_epoch(self) -> bool:
        """Whether :meth:`after_epoch` evaluates at the end of the current epoch."""
        return self.schedule.after_epoch(self.trainer.state)

    def before_train(self) -> None:
        if self.evaluates_before_training():
            self.initial_metrics = self._evaluate()
            self.trainer.state.metrics = {"epoch": 0, **self.initial_metrics}
            log.info("initial model: %s", _fmt(self.initial_metrics))

    def after_epoch(self) -> None:
        if self.evaluates_after_epoch():
            state = self.trainer.state
            done = state.epoch + 1
            state.metrics = {"epoch": done, **self._evaluate()}
            log.info("epoch %d: %s", done, _fmt(state.metrics))


class LabelFreeHook(HookBase):
    """Label-free quality signals of the model (:mod:`reid_core.evaluation.label_free`) on the
    evaluation's schedule, whether or not the data has a query/gallery split to evaluate on.

    Rank 0 takes ``features(model, global_step)``, the model's features of every training image
    (in the order of ``cameras``, their cameras), and measures the signals against the neighbour
    lists of the previous evaluation (``state.neighbours``, in the checkpoint, so a resumed run
    goes on comparing); every rank receives them. They join ``state.metrics`` as
    ``label_free/<name>``, beside the evaluation of the same epoch when there is one: register
    this hook after the :class:`EvaluationHook` (which replaces ``state.metrics``) and before the
    :class:`ProgressHook` (which writes them into the epoch's line and progress.json).
    """

    def __init__(
        self,
        features: Callable[[torch.nn.Module, int], torch.Tensor],
        cameras: np.ndarray,
        k: int,
        every_n_epochs: int,
        at_start: bool,
    ) -> None:
        self.features = features
        self.cameras = np.asarray(cameras)
        self.k = k
        self.schedule = EvaluationSchedule(every_n_epochs, at_start)

    def _measure(self) -> dict[str, float]:
        state = self.trainer.state

        def measure() -> dict[str, float]:
            start = time.perf_counter()
            features = self.features(self.trainer.model_without_ddp, state.global_step)
            signals, state.neighbours = label_free_signals(
                features, self.cameras, self.k, state.neighbours, self.trainer.device
            )
            log.info(
                "label-free signals of %d training images in %.1f s",
                len(features),
                time.perf_counter() - start,
            )
            return signals.as_metrics()

        return _on_main_process(measure)

    def _record(self, epoch: int) -> None:
        signals = self._measure()
        state = self.trainer.state
        evaluated = state.metrics if state.metrics.get("epoch") == epoch else {"epoch": epoch}
        state.metrics = {**evaluated, **signals}
        shown = " ".join(f"{k.removeprefix('label_free/')}={v:.3f}" for k, v in signals.items())
        log.info("%s, label-free: %s", f"epoch {epoch}" if epoch else "initial model", shown)

    def before_train(self) -> None:
        if dist_utils.is_main_process() and cameras_fall_back(self.cameras):
            log.warning(
                "the training images come from one camera (or none is known): the label-free "
                "signals mutual_nn_rate and similarity_margin read the nearest images of any "
                "camera, not of another camera"
            )
        if self.schedule.before_training(self.trainer):
            self._record(0)

    def after_epoch(self) -> None:
        if self.schedule.after_epoch(self.trainer.state):
            self._record(self.trainer.state.epoch + 1)


class CameraNormHook(HookBase):
    """Estimates the per-camera statistics of a model with ``model.camera_norm`` whenever its
    features are about to be used: before each evaluation of ``evaluation`` (registered after
    this hook) and, if the weights changed since, before the final model is written (a hook
    registered after this one). Every rank calibrates its own copy (a deterministic function of
    the weights and the images).

    ``calibrate(model)`` returns the number of images seen per camera id.
    """

    def __init__(
        self,
        calibrate: Callable[[torch.nn.Module], dict[int, int]],
        evaluation: EvaluationHook | None = None,
    ) -> None:
        self.calibrate = calibrate
        self.evaluation = evaluation
        self._calibrated_step: int | None = None

    def ensure_calibrated(self) -> None:
        """Calibrate unless the weights are those of the last calibration (same global step);
        other hooks that need the statistics (the clustering's features) call this too."""
        step = self.trainer.state.global_step
        if self._calibrated_step == step:
            return
        start = time.perf_counter()
        seen = self.calibrate(self.trainer.model_without_ddp)
        self._calibrated_step = step
        log.info(
            "camera statistics from %s images in %.1f s",
            ", ".join(f"camera {cam}: {n}" for cam, n in seen.items()),
            time.perf_counter() - start,
        )

    def before_train(self) -> None:
        if self.evaluation is not None and self.evaluation.evaluates_before_training():
            self.ensure_calibrated()

    def after_epoch(self) -> None:
        if self.evaluation is not None and self.evaluation.evaluates_after_epoch():
            self.ensure_calibrated()

    def after_train(self) -> None:
        self.ensure_calibrated()


class CheckpointHook(HookBase):
    """Saves every ``every_n_epochs``, at the last epoch and on interrupt; resumes before training.

    Place it after the LR and evaluation hooks, so that a saved epoch includes their results.
    """

    def __init__(self, checkpointer: Checkpointer, every_n_epochs: int, resume: str) -> None:
        self.checkpointer = checkpointer
        self.every_n_epochs = every_n_epochs
        self.resume = resume

    def resume_path(self) -> Path | None:
        if self.resume == "none":
            return None
        if self.resume == "auto":
            return self.checkpointer.last_checkpoint()
        return Path(self.resume)

    def load(self) -> bool:
        """Restore the trainer from the configured checkpoint; called by the run builder."""
        path = self.resume_path()
        if path is None:
            return False
        extra = self.checkpointer.load(path, self.trainer.checkpoint_objects())
        restore_rng_state(extra["rng"])
        self.trainer.resumed = True
        state = self.trainer.state
        log.info("resumed from %s at epoch %d step %d", path, state.epoch, state.step_in_epoch)
        return True

    def save(self, name: str) -> None:
        if dist_utils.is_main_process():
            path = self.checkpointer.save(
                name, self.trainer.checkpoint_objects(), {"rng": capture_rng_state()}
            )
            log.info("checkpoint saved: %s", path)
        dist_utils.barrier()

    def after_epoch(self) -> None:
        state = self.trainer.state
        done = state.epoch + 1
        if done % self.every_n_epochs == 0 or done == state.max_epochs:
            self.save(f"epoch_{done:04d}")

    def on_interrupt(self) -> None:
        self.save(f"step_{self.trainer.state.global_step:08d}")


class ProgressHook(HookBase):
    """Progress for people (a tqdm bar, log lines) and machines (``progress.json``, ``metrics.jsonl``:
    :class:`reid_core.run_dir.Progress` and :class:`reid_core.run_dir.EpochMetrics`).

    ``progress.json`` is rewritten atomically; a job supervisor polls it. ``metrics.jsonl`` gets
    one line per finished epoch: mean losses, evaluation metrics and label-free signals, learning
    rates, throughput; and before those, when the evaluation before training ran
    (``eval.at_start``; the evaluation hooks come first), its line, epoch 0. Each line goes to
    ``state.history`` too, so a checkpoint holds them and a resumed run does not write the
    epoch-0 line again.
    """

    def __init__(self, output_dir: Path, log_every_n_steps: int, progress_bar: bool) -> None:
        self.run_dir = RunDir(output_dir)
        self.log_every_n_steps = log_every_n_steps
        self.progress_bar = progress_bar and dist_utils.is_main_process()
        self._bar: tqdm[Any] | None = None
        self._epoch_start = 0.0
        self._epoch_step_seconds = 0.0
        self._epoch_steps = 0
        self._train_start = 0.0
        self._steps_this_run = 0

    @property
    def _main(self) -> bool:
        return dist_utils.is_main_process()

    def _images_per_second(self) -> float:
        t = self.trainer
        batch = t.cfg.data.batch_size * dist_utils.get_world_size()
        return batch * self._epoch_steps / max(1e-9, time.perf_counter() - self._epoch_start)

    def _eta_seconds(self) -> float | None:
        if self._steps_this_run == 0:
            return None
        state = self.trainer.state
        remaining = state.total_steps - (state.epoch * state.steps_per_epoch + state.step_in_epoch)
        per_step = (time.perf_counter() - self._train_start) / self._steps_this_run
        return remaining * per_step

    def write(self, status: RunStatus) -> None:
        if not self._main:
            return
        state = self.trainer.state
        progress = Progress(
            status=status,
            epoch=state.epoch,
            epochs=state.max_epochs,
            step_in_epoch=state.step_in_epoch,
            steps_per_epoch=state.steps_per_epoch,
            global_step=state.global_step,
            progress=round(state.fraction_done, 6),
            losses=state.losses,
            metrics=state.metrics,
            clustering=state.clustering,
            images_per_second=round(self._images_per_second(), 3) if self._epoch_steps else None,
            eta_seconds=self._eta_seconds(),
        )
        self.run_dir.write_progress(progress)

    def before_train(self) -> None:
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self._train_start = time.perf_counter()
        state = self.trainer.state
        if state.metrics.get("epoch") == 0 and not state.history:  # evaluated before training
            evaluation, label_free = _split_evaluation(state.metrics)
            self._record(EpochMetrics.before_training(evaluation, label_free))
        self.write("running")

    def _record(self, record: EpochMetrics) -> None:
        """One line of metrics.jsonl (the main process writes it), kept in the history."""
        self.trainer.state.history.append(record.model_dump())
        if self._main:
            self.run_dir.append_metrics(record)

    def before_epoch(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_steps = 0
        state = self.trainer.state
        if self.progress_bar:
            self._bar = tqdm(
                total=state.steps_per_epoch,
                initial=state.step_in_epoch,
                desc=f"epoch {state.epoch + 1}/{state.max_epochs}",
                dynamic_ncols=True,
            )

    def after_step(self) -> None:
        self._epoch_steps += 1
        self._steps_this_run += 1
        state = self.trainer.state
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in state.losses.items()}, refresh=False)
        if state.global_step % self.log_every_n_steps == 0:
            if not self.progress_bar and self._main:
                losses = " ".join(f"{k}={v:.4f}" for k, v in state.losses.items())
                log.info(
                    "epoch %d step %d/%d %s",
                    state.epoch + 1,
                    state.step_in_epoch,
                    state.steps_per_epoch,
                    losses,
                )
            self.write("running")

    def after_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        t = self.trainer
        state = t.state
        evaluation: dict[str, float] = {}
        label_free: dict[str, float] = {}
        if state.metrics.get("epoch") == state.epoch + 1:  # this epoch was evaluated
            evaluation, label_free = _split_evaluation(state.metrics)
        record = EpochMetrics.of_epoch(
            epoch=state.epoch + 1,
            global_step=state.global_step,
            images_per_second=self._images_per_second(),
            epoch_seconds=time.perf_counter() - self._epoch_start,
            losses=state.epoch_means(),
            learning_rates=[g["lr"] for g in t.optimizer.param_groups],
            clustering=state.clustering,  # the pseudo labels this epoch trained on
            evaluation=evaluation,
            label_free=label_free,
        )
        self._record(record)
        self.write("running")

    def after_train(self) -> None:
        self.write("finished")

    def on_interrupt(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.write("interrupted")


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in metrics.items() if k != "epoch")


def _split_evaluation(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``state.metrics`` (an evaluation, metric -> value; the label-free signals, already keyed
    ``label_free/<name>``; the ``epoch`` they ran at) as (evaluation, label-free signals)."""
    evaluation = {k: v for k, v in metrics.items() if k != "epoch" and "/" not in k}
    return evaluation, {k: v for k, v in metrics.items() if "/" in k}


class FinalModelHook(HookBase):
    """Saves ``model_final.pt`` (weights, config, last evaluation; see :mod:`reid_core.model_io`)
    when training completes, on the main process. Hooks registered after it find the file."""

    def __init__(self, output_dir: Path) -> None:
        self.path = RunDir(output_dir).final_model

    def after_train(self) -> None:
        if not dist_utils.is_main_process():
            return
        t = self.trainer
        save_model(t.model_without_ddp, t.cfg, self.path, metrics=t.state.metrics)
        log.info("final model saved: %s", self.path)
