"""Training entry point: ``python -m reid_core.train --preset smoke --set a.b=1``.

Works as a single process or under ``torchrun --nproc_per_node N`` (DDP). The process exits with
one of :class:`reid_core.engine.exit_codes.ExitCode`; ``SIGTERM`` makes it checkpoint and exit 75.
Outputs in ``runtime.output_dir``: ``config.yaml`` (resolved), ``train.log``, ``progress.json``,
``metrics.jsonl``, ``checkpoints/`` and, on success, ``model_final.pt`` (:mod:`reid_core.run_dir`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from reid_core import distributed as dist_utils
from reid_core.clustering.labeller import PseudoLabeller
from reid_core.config import ConfigError, ExperimentConfig, dump_config, load_config
from reid_core.data import (
    DatasetError,
    EpochShuffleSampler,
    ImageRecord,
    ReIDSplits,
    build_eval_loader,
    build_splits,
    build_train_loader,
    scan_images,
)
from reid_core.data.colour import stripe_colour_histograms
from reid_core.engine.checkpoint import Checkpointer, CheckpointError
from reid_core.engine.exit_codes import ExitCode, exit_process
from reid_core.engine.hooks import (
    CameraNormHook,
    CheckpointHook,
    EvaluationHook,
    Evaluator,
    FinalModelHook,
    LabelFreeHook,
    LRSchedulerHook,
    MemoryInitHook,
    NeighbourPriorHook,
    ProgressHook,
    PseudoLabelHook,
    StopSignalHook,
)
from reid_core.engine.trainer import HookBase, Precision, Trainer, TrainingDivergedError
from reid_core.evaluation import evaluate_features, extract_features
from reid_core.models import PretrainedWeightsNotFoundError, ReIDModel
from reid_core.objective.dual_branch import DualBranchObjective
from reid_core.presets import preset_names, preset_path
from reid_core.run_dir import RunDir

__all__ = ["build_model", "build_optimizer", "build_scheduler", "load_splits", "main", "run"]

log = logging.getLogger("reid_core.train")


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------


def select_device(cfg: ExperimentConfig, local_rank: int) -> torch.device:
    wanted = cfg.runtime.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is visible")
    if wanted in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def load_splits(cfg: ExperimentConfig) -> tuple[list[ImageRecord], ReIDSplits | None]:
    """Training records (scanned for unreadable files) and the evaluation splits, if any."""
    splits = build_splits(cfg.data)
    if not splits.train:
        raise DatasetError(
            f"dataset {cfg.data.dataset!r} at {cfg.data.root} has no training images"
        )
    train, _ = scan_images(splits.train, cfg.data.max_bad_fraction, log, split="train")
    if not cfg.eval.enabled:
        return train, None
    if not splits.has_eval:
        log.warning("dataset %r has no query/gallery: evaluation is skipped", splits.name)
        return train, None
    return train, splits


def build_model(cfg: ExperimentConfig, train_records: Sequence[ImageRecord] = ()) -> ReIDModel:
    """The network; with ``model.camera_norm``, normalised per camera of ``train_records``."""
    model = ReIDModel(cfg.model, with_patch_branch=cfg.loss.patch_branch)
    if cfg.model.camera_norm:
        unknown = [r.path for r in train_records if r.camid < 0]
        if unknown or not train_records:
            raise DatasetError(
                f"model.camera_norm=true needs the camera of every training image, but "
                f"{len(unknown)} of {len(train_records)} have none (first: {unknown[:1]}); "
                "name files with their camera or set model.camera_norm=false"
            )
        model.use_camera_norm(
            [r.camid for r in train_records], in_training=cfg.model.camera_norm_train
        )
    return model


def build_camera_calibration(
    cfg: ExperimentConfig, train_records: Sequence[ImageRecord], device: torch.device
) -> Callable[[torch.nn.Module], dict[int, int]]:
    """``calibrate(model)`` for ``model.camera_norm``: the per-camera statistics from up to
    ``model.camera_norm_images`` training images of each camera (the same ones every time, a
    choice seeded by ``runtime.seed``), through the test transform, a camera at a time."""
    generator = torch.Generator().manual_seed(cfg.runtime.seed)
    chosen: list[ImageRecord] = []
    for camera in sorted({r.camid for r in train_records}):
        records = [r for r in train_records if r.camid == camera]
        keep = torch.randperm(len(records), generator=generator)[: cfg.model.camera_norm_images]
        chosen += [records[i] for i in sorted(keep.tolist())]
    loader = build_eval_loader(chosen, cfg.data, cfg.eval.batch_size)
    cameras = torch.tensor([r.camid for r in chosen])

    def calibrate(model: torch.nn.Module) -> dict[int, int]:
        assert isinstance(model, ReIDModel)
        batches = ((images.to(device), cameras[idx]) for images, idx in loader)
        return model.calibrate_camera_norm(batches)

    return calibrate


def build_optimizer(cfg: ExperimentConfig, model: ReIDModel) -> torch.optim.Optimizer:
    """Two groups: the trunk at ``optim.backbone_lr``, new layers at ``optim.lr``."""
    o = cfg.optim
    trunk = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [
        {"params": trunk, "lr": o.backbone_lr, "name": "backbone"},
        {"params": model.new_layers(), "lr": o.lr, "name": "new_layers"},
    ]
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
        )
    return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(
    cfg: ExperimentConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """lr(e) = base * min(1, (e + 1) / warmup) * gamma ** #{milestones <= e}, stepped per epoch."""
    s = cfg.schedule

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / s.warmup_epochs) if s.warmup_epochs else 1.0
        return warm * s.gamma ** sum(1 for m in s.milestones if epoch >= m)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_evaluator(cfg: ExperimentConfig, splits: ReIDSplits, device: torch.device) -> Evaluator:
    """``evaluator(model) -> {"mAP", "mINP", "r1", "r5", "r10", ...}`` in percent, on the
    query/gallery split."""
    q_loader = build_eval_loader(splits.query, cfg.data, cfg.eval.batch_size)
    g_loader = build_eval_loader(splits.gallery, cfg.data, cfg.eval.batch_size)
    q_pids = np.array([r.pid for r in splits.query])
    g_pids = np.array([r.pid for r in splits.gallery])
    q_cams = np.array([r.camid for r in splits.query])
    g_cams = np.array([r.camid for r in splits.gallery])
    e = cfg.eval

    def evaluator(model: torch.nn.Module) -> dict[str, float]:
        qf = extract_features(
            model, q_loader, device, feature=e.feature, flip=e.flip, cameras=q_cams
        )
        gf = extract_features(
            model, g_loader, device, feature=e.feature, flip=e.flip, cameras=g_cams
        )
        result = evaluate_features(
            qf,
            gf,
            q_pids,
            g_pids,
            q_cams,
            g_cams,
            metric=e.distance,
            camera_centred=e.camera_centred,
            rerank=e.rerank,
            k1=e.rerank_k1,
            k2=e.rerank_k2,
            lam=e.rerank_lambda,
            max_rerank_memory_bytes=int(e.rerank_max_memory_gb * 2**30),
        )
        return {k: float(v) for k, v in result.as_dict(percent=True).items()}

    return evaluator


def build_label_free(
    cfg: ExperimentConfig,
    train_records: Sequence[ImageRecord],
    device: torch.device,
    labeller: PseudoLabeller | None,
    calibrate: Callable[[], object] | None,
) -> LabelFreeHook:
    """The label-free signals' hook (``eval.label_free``). Its features of the training images
    are the clustering's where there is one (``labeller``: the extraction at an evaluation is
    kept for the clustering of the next epoch's start), else the evaluation's (``eval.feature``,
    ``eval.flip``, each camera's BatchNorm statistics with ``model.camera_norm``, made current
    first by ``calibrate()``)."""
    cameras = np.array([r.camid for r in train_records], dtype=np.int64)
    e = cfg.eval
    features: Callable[[torch.nn.Module, int], torch.Tensor]
    if labeller is not None:
        features = labeller.features
    else:
        loader = build_eval_loader(train_records, cfg.data, e.batch_size)

        def features(model: torch.nn.Module, step: int) -> torch.Tensor:
            if calibrate is not None:
                calibrate()
            return extract_features(
                model,
                loader,
                device,
                feature=e.feature,
                flip=e.flip,
                cameras=cameras if cfg.model.camera_norm else None,
            )

    return LabelFreeHook(features, cameras, e.label_free_k, e.every_n_epochs, e.at_start)


def build_trainer(
    cfg: ExperimentConfig, local_rank: int = 0, extra_hooks: Sequence[HookBase] = ()
) -> Trainer:
    """Everything a run needs, wired together; the checkpoint (if any) is already restored.

    ``extra_hooks`` (experiment tracking, say) run after the built-in ones: at the end of an
    epoch the checkpoint is written, at the end of training ``model_final.pt`` is.
    """
    device = select_device(cfg, local_rank)
    out = cfg.runtime.output_dir
    train_records, eval_splits = load_splits(cfg)
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()

    model = Precision.for_device(cfg.runtime, device).prepare(
        build_model(cfg, train_records).to(device)
    )
    objective = DualBranchObjective(
        cfg, len(train_records), model, cameras=[r.camid for r in train_records]
    ).to(device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)

    if cfg.loss.camera.enabled:
        unknown = [r.path for r in train_records if r.camid < 0]
        if unknown:
            raise DatasetError(
                f"loss.camera.enabled=true needs the camera of every training image, but "
                f"{len(unknown)} of {len(train_records)} images of dataset {cfg.data.dataset!r} "
                f"have none (first: {unknown[0]}); name files with their camera or set "
                "loss.camera.enabled=false"
            )
    train_loader = build_train_loader(
        train_records,
        cfg.data,
        cfg.runtime.seed,
        rank=rank,
        world_size=world,
        clusters=cfg.cluster if cfg.loss.clusters else None,
    )
    assert isinstance(train_loader.sampler, EpochShuffleSampler)
    # memory initialisation: every rank embeds its share, the memories gather all of them
    init_loader = build_eval_loader(train_records, cfg.data, cfg.eval.batch_size)
    if world > 1:
        init_loader = DataLoader(
            Subset(init_loader.dataset, range(rank, len(train_records), world)),
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers,
        )

    train_model: torch.nn.Module = model
    if world > 1:
        every_param_used = (
            cfg.loss.global_branch and cfg.loss.pedal.enabled and cfg.loss.ipfl.enabled
        )
        train_model = DistributedDataParallel(
            model,
            device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=not every_param_used,
        )

    trainer = Trainer(
        cfg,
        train_model,
        objective,
        optimizer,
        scheduler,
        train_loader,
        train_loader.sampler,
        device,
        model_without_ddp=model,
        cameras=[r.camid for r in train_records] if cfg.model.camera_norm_train else None,
    )
    checkpoint_hook = CheckpointHook(
        Checkpointer(RunDir(out).checkpoints, keep_last=cfg.checkpoint.keep_last),
        every_n_epochs=cfg.checkpoint.every_n_epochs,
        resume=cfg.checkpoint.resume,
    )
    hooks: list[HookBase] = [StopSignalHook(), MemoryInitHook(init_loader)]
    if cfg.loss.prior.kind == "colour":
        paths, stripes = [r.path for r in train_records], cfg.model.num_patches
        hooks.append(
            NeighbourPriorHook(
                lambda: stripe_colour_histograms(paths, stripes).view(len(paths), stripes, -1)
            )
        )
    evaluation = None
    if eval_splits is not None:
        evaluation = EvaluationHook(
            build_evaluator(cfg, eval_splits, device),
            every_n_epochs=cfg.eval.every_n_epochs,
            at_start=cfg.eval.at_start,
        )
    camera_norm = None
    if cfg.model.camera_norm:
        calibrate = build_camera_calibration(cfg, train_records, device)
        camera_norm = CameraNormHook(calibrate, evaluation)
    # the clustering's and the label-free signals' features need the statistics too; calibrated
    # once per weights, so an evaluation at an epoch's end and the clustering at the next one's
    # start share it
    ensure = None if camera_norm is None else camera_norm.ensure_calibrated
    labeller = None
    if cfg.loss.clusters:
        labeller = PseudoLabeller(cfg, train_records, device, ensure)
        hooks.append(PseudoLabelHook(labeller, cfg.cluster.every_n_epochs))
    if camera_norm is not None:  # before the evaluation and the final model, which use them
        hooks.append(camera_norm)
    if evaluation is not None:
        hooks.append(evaluation)
    if cfg.eval.enabled and cfg.eval.label_free:  # after the evaluation: it adds to its metrics
        hooks.append(build_label_free(cfg, train_records, device, labeller, ensure))
    hooks += [
        ProgressHook(out, cfg.runtime.log_every_n_steps, cfg.runtime.progress_bar),
        LRSchedulerHook(),
        checkpoint_hook,  # a saved epoch holds the evaluation, history and next LR
        FinalModelHook(out),
        *extra_hooks,
    ]
    trainer.register_hooks(hooks)
    checkpoint_hook.load()
    return trainer


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------


def _setup_logging(output_dir: Path) -> None:
    level = logging.INFO if dist_utils.is_main_process() else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if dist_utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(RunDir(output_dir).train_log))
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [rank{dist_utils.get_rank()}] %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def run(cfg: ExperimentConfig, extra_hooks: Sequence[HookBase] = ()) -> ExitCode:
    """Train with ``cfg``; returns the exit code (see :mod:`reid_core.engine.exit_codes`).

    ``extra_hooks``: see :func:`build_trainer`.
    """
    local_rank = dist_utils.init_from_env(cfg.distributed.backend, cfg.distributed.timeout_s)
    try:
        _setup_logging(cfg.runtime.output_dir)
        if cfg.runtime.num_threads:
            torch.set_num_threads(cfg.runtime.num_threads)
        seed_everything(cfg.runtime.seed, cfg.runtime.deterministic)
        if dist_utils.is_main_process():
            dump_config(cfg, RunDir(cfg.runtime.output_dir).config_file)
        trainer = build_trainer(cfg, local_rank, extra_hooks)
        return trainer.train()
    except ConfigError as exc:
        log.error("%s", exc)
        return ExitCode.BAD_CONFIG
    except (DatasetError, PretrainedWeightsNotFoundError) as exc:
        log.error("%s", exc)
        return ExitCode.BAD_DATA if isinstance(exc, DatasetError) else ExitCode.BAD_CONFIG
    except CheckpointError as exc:
        log.error("%s", exc)
        cause = exc.__cause__
        no_space = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        return ExitCode.NO_SPACE if no_space else ExitCode.CRASHED
    except TrainingDivergedError as exc:
        log.error("%s", exc)
        return ExitCode.DIVERGED
    except Exception:
        log.exception("training crashed")
        return ExitCode.CRASHED
    finally:
        dist_utils.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reid_core.train", description="Unsupervised re-ID training."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="a YAML config file")
    source.add_argument(
        "--preset", help=f"a shipped config (reid_core/presets/): {', '.join(preset_names())}"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable: --set loss.gsl.threshold=0.55",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = preset_path(args.preset) if args.preset else args.config
        cfg = load_config(path, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.BAD_CONFIG)
    return int(run(cfg))


if __name__ == "__main__":
    exit_process(main())
