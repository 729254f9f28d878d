"""Camera colour style (``data.camera_style_probability``): each camera's colour statistics, the
recolouring of an augmented view to another camera's, and its place in the training loader."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from reid_core.config import DataConfig
from reid_core.data import TrainSet, build_train_loader
from reid_core.data.camera_style import CameraColourStats, CameraStyle, camera_colour_stats
from reid_core.data.records import ImageRecord
from reid_core.data.transforms import build_test_transform, build_train_transform

#: Two cameras that see the same scene in other colours: camera 0 warm and dim, camera 1 cold.
TINTS = {0: (150, 70, 40), 1: (40, 90, 160)}


def _records(root: Path, per_camera: int = 4, unknown: int = 0) -> list[ImageRecord]:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for camid, tint in TINTS.items():
        for i in range(per_camera):
            path = root / f"c{camid}_{i}.png"
            # a vertical gradient around the camera's tint: a spread to measure in each channel
            image = Image.new("RGB", (8, 16))
            for y in range(16):
                shade = tuple(max(0, min(255, c + 6 * (y - 8) + 3 * i)) for c in tint)
                for x in range(8):
                    image.putpixel((x, y), shade)
            image.save(path)
            records.append(ImageRecord(path, pid=i, camid=camid))
    for i in range(unknown):
        path = root / f"unknown_{i}.png"
        Image.new("RGB", (8, 16), (128, 128, 128)).save(path)
        records.append(ImageRecord(path))
    return records


def _cfg(**kw: object) -> DataConfig:
    return DataConfig(height=32, width=16, batch_size=4, num_workers=0, **kw)


def test_each_camera_has_its_own_colour_statistics(tmp_path: Path) -> None:
    records = _records(tmp_path, unknown=2)
    transform = build_test_transform(_cfg())
    stats = camera_colour_stats(records, transform)
    assert stats is not None and stats.cameras == (0, 1)
    for row, camid in enumerate(stats.cameras):
        pixels = torch.cat(
            [
                transform(Image.open(r.path).convert("RGB")).flatten(1)
                for r in records
                if r.camid == camid
            ],
            dim=1,
        )
        torch.testing.assert_close(stats.mean[row], pixels.mean(dim=1))
        torch.testing.assert_close(stats.std[row], pixels.std(dim=1))
    # red is camera 0's strongest channel, blue camera 1's
    assert stats.mean[0, 0] > stats.mean[1, 0] and stats.mean[1, 2] > stats.mean[0, 2]


def test_one_camera_has_no_style_to_transfer(tmp_path: Path) -> None:
    records = [r for r in _records(tmp_path, unknown=3) if r.camid != 1]
    assert camera_colour_stats(records, build_test_transform(_cfg())) is None


def test_a_recoloured_view_has_the_other_cameras_statistics(tmp_path: Path) -> None:
    records = _records(tmp_path)
    transform = build_test_transform(_cfg())
    stats = camera_colour_stats(records, transform)
    assert stats is not None
    style = CameraStyle(stats, probability=1.0)
    camera0 = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in records[:4]])
    moved = torch.stack([style(view, 0) for view in camera0])
    # all of camera 0's images moved together: they now have camera 1's mean and spread
    flat = moved.permute(1, 0, 2, 3).flatten(1)
    torch.testing.assert_close(flat.mean(dim=1), stats.mean[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat.std(dim=1), stats.std[1], atol=1e-4, rtol=1e-4)
    # an unknown camera, or probability 0, leaves the view alone
    view = camera0[0]
    assert torch.equal(style(view, -1), view)
    assert torch.equal(CameraStyle(stats, probability=0.0)(view, 0), view)


def test_the_target_is_never_the_images_own_camera() -> None:
    stats = CameraColourStats(
        cameras=(0, 3, 5),
        mean=torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]),
        std=torch.ones(3, 3),
    )
    style = CameraStyle(stats, probability=1.0)
    torch.manual_seed(0)
    targets = {float(style(torch.zeros(3, 2, 2), 3)[0, 0, 0]) + 1.0 for _ in range(200)}
    assert targets == {0.0, 2.0}  # from camera 3 (mean 1) to camera 0 or 5, never 3
    with pytest.raises(ValueError, match="probability"):
        CameraStyle(stats, probability=1.5)


def test_the_loader_recolours_reproducibly(tmp_path: Path) -> None:
    records = _records(tmp_path)
    cfg = _cfg(camera_style_probability=1.0, color_jitter=(0.0, 0.0, 0.0, 0.0))
    loader = build_train_loader(records, cfg, seed=0)
    dataset = loader.dataset
    assert isinstance(dataset, TrainSet) and dataset.style is not None
    first = dataset[(0, 123)]
    again = dataset[(0, 123)]
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    plain = TrainSet(records, build_train_transform(cfg))[(0, 123)]
    assert torch.equal(first[0], plain[0])  # the plain view keeps its colours
    assert not torch.allclose(first[1], plain[1])  # the augmented one was recoloured
    # camera 0's red view was moved towards camera 1's blue
    assert first[1][2].mean() - first[1][0].mean() > plain[1][2].mean() - plain[1][0].mean()


def test_data_without_two_cameras_trains_without_style_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [r for r in _records(tmp_path) if r.camid == 0]
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(records, _cfg(camera_style_probability=0.5), seed=0)
    assert isinstance(loader.dataset, TrainSet) and loader.dataset.style is None
    assert "data.camera_style_probability=0.5" in caplog.text
    assert build_train_loader(records, _cfg(), seed=0).dataset.style is None  # type: ignore[attr-defined]
