"""Trained models on disk: the weights plus the configuration that rebuilds the network.

``model_final.pt`` holds plain data only (tensors, the resolved config as a dict, metrics), so it
loads with ``torch.load(weights_only=True)``: no pickled classes, no code runs on load.
A training checkpoint (``checkpoints/*.pt``) works too, with the ``config.yaml`` of its run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from reid_core.atomic_write import atomic_path
from reid_core.config import ExperimentConfig, config_to_dict, validate_config
from reid_core.models import ReIDModel
from reid_core.run_dir import RunDir

__all__ = ["MODEL_FORMAT", "load_model", "save_model"]

MODEL_FORMAT = "reid_core.model/1"


def save_model(
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    path: Path,
    metrics: dict[str, float] | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": MODEL_FORMAT,
        "config": config_to_dict(cfg),
        "with_patch_branch": bool(getattr(model, "with_patch_branch", True)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": dict(metrics or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _build(
    cfg: ExperimentConfig, with_patch_branch: bool, state: dict[str, torch.Tensor]
) -> ReIDModel:
    """The network that ``state`` (its state dict) fits, weights not loaded yet."""
    # The weights come from the file: never look for ImageNet weights when rebuilding.
    model_cfg = cfg.model.model_copy(update={"pretrained": "none"})
    model = ReIDModel(model_cfg, with_patch_branch=with_patch_branch)
    if "camera_ids" in state:  # trained with model.camera_norm: its cameras are in the file
        model.use_camera_norm(state["camera_ids"].tolist(), in_training=cfg.model.camera_norm_train)
    return model


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ReIDModel, ExperimentConfig]:
    """Rebuild a trained model (in eval mode) and its config from ``model_final.pt`` or a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    payload: dict[str, Any]
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        # training checkpoints also hold RNG states (numpy objects): our own files only
        payload = torch.load(path, map_location=map_location, weights_only=False)
    if payload.get("format") == MODEL_FORMAT:
        cfg = validate_config(payload["config"], str(path))
        model = _build(cfg, payload["with_patch_branch"], payload["state_dict"])
        model.load_state_dict(payload["state_dict"])
    elif "model" in payload:
        config_file = RunDir(path.parent.parent).config_file  # <run>/checkpoints/<name>.pt
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path} is a training checkpoint; its run's config {config_file} is missing"
            )
        cfg = validate_config(yaml.safe_load(config_file.read_text()), str(config_file))
        model = _build(cfg, cfg.loss.patch_branch, payload["model"])
        model.load_state_dict(payload["model"])
    else:
        raise ValueError(f"{path} is neither a reid_core model nor a training checkpoint")
    return model.eval(), cfg
