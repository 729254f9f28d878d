"""Shared helpers for the integration tests: a tiny configuration, its data, one trained run.

Everything is sized to train in seconds on 2 shared CPU cores: 8 synthetic identities x 4 images,
96x48 inputs, MobileNetV3-small, a few steps per epoch, one torch thread per process (two threads
on two busy cores are much slower than one, and less predictable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import reid_core.train as train_module
from reid_core.config import ExperimentConfig, dump_config, load_config
from reid_core.data import build_dataset
from reid_core.engine.exit_codes import ExitCode
from reid_core.engine.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Identities and images per identity of the tiny synthetic data set (train and test alike).
IDENTITIES = 8
IMAGES_PER_IDENTITY = 4


def tiny_overrides(
    output_dir: Path, data_root: Path, *extra: str, epochs: int = 2, steps: int = 2
) -> list[str]:
    """Dotted overrides of a run that takes seconds; ``extra`` come last and win."""
    return [
        "name=tiny",
        "data.dataset=synthetic",
        f"data.root={data_root}",
        f"data.synthetic_identities={IDENTITIES}",
        f"data.synthetic_images_per_identity={IMAGES_PER_IDENTITY}",
        "data.height=96",
        "data.width=48",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.backbone=mobilenet_v3_small",
        "model.pretrained=none",
        "model.pgm_channels=32",
        "model.pgm_hidden=16",
        "model.patch_dim=16",
        "model.ipfl_dim=8",
        "loss.pedal.neighbours=3",
        "loss.gsl.warmup_epochs=1",
        f"schedule.epochs={epochs}",
        f"schedule.max_steps_per_epoch={steps}",
        # the LR drops after the first epoch: a resume that loses the scheduler state shows
        "schedule.milestones=[1]",
        "eval.every_n_epochs=1",
        "eval.batch_size=32",
        f"runtime.output_dir={output_dir}",
        "runtime.device=cpu",
        "runtime.num_threads=1",
        "runtime.progress_bar=false",
        "runtime.deterministic=true",
        "runtime.log_every_n_steps=1",
        "distributed.timeout_s=120",
        *extra,
    ]


def tiny_config(
    output_dir: Path, data_root: Path, *extra: str, epochs: int = 2, steps: int = 2
) -> ExperimentConfig:
    return load_config(
        None, tiny_overrides(output_dir, data_root, *extra, epochs=epochs, steps=steps)
    )


def write_config(cfg: ExperimentConfig, path: Path) -> Path:
    """The resolved configuration as a YAML file for ``--config``."""
    return dump_config(cfg, path)


def subprocess_env() -> dict[str, str]:
    """Environment of a child Python: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """``run()`` reconfigures the root logger (``basicConfig(force=True)``, a FileHandler on
    ``train.log``), the torch thread count and deterministic mode; put them back afterwards.
    Within the block torch uses one thread (two on two busy cores are slower than one)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@contextlib.contextmanager
def capture_trainers() -> Iterator[list[Trainer]]:
    """Within the block, every trainer ``reid_core.train.run`` builds is appended to the list."""
    built: list[Trainer] = []
    original = train_module.build_trainer

    def build_and_keep(*args: Any, **kwargs: Any) -> Trainer:
        trainer = original(*args, **kwargs)
        built.append(trainer)
        return trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "build_trainer", build_and_keep)
        yield built


@pytest.fixture(autouse=True)
def _isolated_process_state() -> Iterator[None]:
    with preserved_process_state():
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache root of the tiny synthetic data set, generated once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    build_dataset(
        "synthetic", root, num_identities=IDENTITIES, images_per_identity=IMAGES_PER_IDENTITY
    )
    return root


@dataclass
class TrainedRun:
    cfg: ExperimentConfig
    code: ExitCode
    trainer: Trainer

    @property
    def output_dir(self) -> Path:
        return self.cfg.runtime.output_dir

    @property
    def model_final(self) -> Path:
        return self.output_dir / "model_final.pt"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> TrainedRun:
    """One tiny run through ``reid_core.train.run`` (2 epochs x 2 steps), with its trainer."""
    cfg = tiny_config(tmp_path_factory.mktemp("trained") / "run", synthetic_root)
    with preserved_process_state(), capture_trainers() as built:
        code = train_module.run(cfg)
    assert len(built) == 1
    return TrainedRun(cfg=cfg, code=code, trainer=built[0])
