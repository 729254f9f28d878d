"""Every variant of bench/train_real.py is a config that validates and a network that runs on
the preset's images: a variant that cannot train is found here, not an hour into a benchmark."""

from __future__ import annotations

import pytest
import torch

from bench import train_real
from reid_core.config import load_config
from reid_core.train import build_model


@pytest.mark.parametrize("name", sorted(train_real.VARIANTS))
def test_the_variant_s_network_runs_on_the_preset_s_images(name: str) -> None:
    config = train_real.VARIANT_CONFIGS.get(name, train_real.preset_path("cuhk03_cpu"))
    # without the per-camera statistics, which need the training images' cameras
    cfg = load_config(config, [*train_real.VARIANTS[name], "model.camera_norm=false"])
    model = build_model(cfg).eval()
    images = torch.zeros(2, 3, cfg.data.height, cfg.data.width)
    features = model.extract(images, cfg.eval.feature)
    assert features.shape[0] == 2 and torch.isfinite(features).all()
