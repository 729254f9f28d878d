"""The label-free quality signals against hand-computed cases and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_core.evaluation import label_free as label_free_module
from reid_core.evaluation.label_free import (
    LabelFreeSignals,
    label_free_signals,
    neighbour_lists,
    neighbour_stability,
)


def on_circle(degrees: list[float]) -> torch.Tensor:
    """Unit 2-d features at these angles: the cosine of two is the cosine of their angle."""
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1).float()


def cos(degrees: float) -> float:
    return math.cos(degrees * math.pi / 180)


# Camera 0: A0 0, B0 90, C0 180 degrees; camera 1: A1 10, B1 100, C1 300 (-60).
SIX = on_circle([0, 90, 180, 10, 100, 300])
SIX_CAMERAS = np.array([0, 0, 0, 1, 1, 1])


def test_six_images_in_two_cameras() -> None:
    """Nearest other-camera image: A0->A1, B0->B1, C0->B1 (80), A1->A0, B1->B0, C1->A0 (60).
    A0/A1 and B0/B1 find each other; C0 and C1 do not: 4 of 6."""
    lists = neighbour_lists(SIX, SIX_CAMERAS, k=2)
    assert lists.other_camera[:, 0].tolist() == [3, 4, 4, 0, 1, 0]
    # second nearest other-camera image: A0->C1 (60), B0->A1 (80), C0->C1 (120),
    # A1->B0 (80), B1->C0 (80), C1->C0 (120)
    assert lists.other_camera[:, 1].tolist() == [5, 3, 5, 1, 2, 2]
    signals, _ = label_free_signals(SIX, SIX_CAMERAS, k=2)
    assert signals.mutual_nn_rate == pytest.approx(4 / 6)
    margins = [
        cos(10) - cos(60),  # A0
        cos(10) - cos(80),  # B0
        cos(80) - cos(120),  # C0
        cos(10) - cos(80),  # A1
        cos(10) - cos(80),  # B1
        cos(60) - cos(120),  # C1
    ]
    assert signals.similarity_margin == pytest.approx(sum(margins) / 6, abs=1e-6)
    assert signals.neighbour_stability is None  # the first evaluation


def test_the_margin_reaches_at_most_the_smallest_other_camera_count() -> None:
    """k = 10, but every image has 3 images in the other camera: the margin is to the third."""
    signals, nearest = label_free_signals(SIX, SIX_CAMERAS, k=10)
    third = [
        cos(10) - cos(100),  # A0: A1 10, C1 60, B1 100
        cos(10) - cos(150),  # B0: B1 10, A1 80, C1 150
        cos(80) - cos(170),  # C0: B1 80, C1 120, A1 170
        cos(10) - cos(170),  # A1: A0 10, B0 80, C0 170
        cos(10) - cos(100),  # B1: B0 10, C0 80, A0 100
        cos(60) - cos(150),  # C1: A0 60, C0 120, B0 150
    ]
    assert signals.similarity_margin == pytest.approx(sum(third) / 6, abs=1e-6)
    assert nearest.shape == (6, 5)  # any camera: k capped at N - 1


def test_one_camera_falls_back_to_every_other_image(caplog: pytest.LogCaptureFixture) -> None:
    """0, 5, 90 and 100 degrees. In two cameras (0, 5 | 90, 100) the nearest other-camera
    images are 0->90, 5->90, 90->5, 100->5: only 5 and 90 pair up. In one camera 0/5 and
    90/100 are each other's nearest."""
    x = on_circle([0, 5, 90, 100])
    two, _ = label_free_signals(x, np.array([0, 0, 1, 1]), k=2)
    assert two.mutual_nn_rate == pytest.approx(0.5)
    for unknown in (np.zeros(4, dtype=np.int64), np.full(4, -1)):
        assert label_free_module.cameras_fall_back(unknown)
        one, _ = label_free_signals(x, unknown, k=2)
        assert one.mutual_nn_rate == pytest.approx(1.0)
        # nearest and second nearest of any camera: 0 -> 5, 90; 5 -> 0, 90; 90 -> 100, 5; 100 -> 90, 5
        margins = [cos(5) - cos(90), cos(5) - cos(85), cos(10) - cos(85), cos(10) - cos(95)]
        assert one.similarity_margin == pytest.approx(sum(margins) / 4, abs=1e-6)
    assert not label_free_module.cameras_fall_back(np.array([0, 0, 1, 1]))


def test_stability_is_the_mean_jaccard_overlap_of_two_evaluations_lists() -> None:
    current = np.array([[1, 2], [0, 2], [0, 1]])
    previous = np.array([[1, 2], [2, 0], [0, 3]])  # same set, same set in another order, 1 of 3
    assert neighbour_stability(current, previous) == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert neighbour_stability(current, current) == 1.0
    assert neighbour_stability(current, current + 10) == 0.0
    with pytest.raises(ValueError, match=r"shape \(3, 2\) and \(3, 1\)"):
        neighbour_stability(current, previous[:, :1])


def test_stability_between_two_evaluations() -> None:
    """The second evaluation compares with the first's lists; lists of another length (a run
    resumed with another k) give none."""
    first, kept = label_free_signals(SIX, SIX_CAMERAS, k=2)
    moved = on_circle([0, 90, 180, 10, 100, 200])  # C1 moves from 300 to 200 degrees
    second, _ = label_free_signals(moved, SIX_CAMERAS, k=2, previous=kept)
    # any camera's 2 nearest before: A0 {A1, C1}, B0 {B1, A1}, C0 {B1, B0}, A1 {A0, C1 (70)},
    # B1 {B0, C0}, C1 {A0, A1}; after: A0 {A1, B0}, B0 {B1, A1}, C0 {C1, B1}, A1 {A0, B0},
    # B1 {B0, C0}, C1 {C0, B1}
    assert first.neighbour_stability is None
    assert second.neighbour_stability == pytest.approx((1 / 3 + 1 + 1 / 3 + 1 / 3 + 1 + 0) / 6)
    other_k, _ = label_free_signals(moved, SIX_CAMERAS, k=3, previous=kept)
    assert other_k.neighbour_stability is None


def test_signals_are_named_label_free_metrics() -> None:
    assert LabelFreeSignals(0.5, 0.25).as_metrics() == {
        "label_free/mutual_nn_rate": 0.5,
        "label_free/similarity_margin": 0.25,
    }
    assert LabelFreeSignals(0.5, 0.25, 0.75).as_metrics()["label_free/neighbour_stability"] == 0.75


def test_row_blocks_find_the_neighbours_a_dense_matrix_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three cameras of unequal size, blocks of 7 rows: the same lists as sorting the dense
    similarities (no ties in random data)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((50, 8))).float()
    cams = rng.choice([0, 1, 2], size=50, p=[0.5, 0.3, 0.2])
    monkeypatch.setattr(label_free_module, "BLOCK_ELEMENTS", 7 * 50)
    lists = neighbour_lists(x, cams, k=6)
    unit = torch.nn.functional.normalize(x, dim=1).numpy()
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    assert np.array_equal(lists.nearest, np.argsort(-sim, axis=1, kind="stable")[:, :6])
    sim[cams[:, None] == cams[None, :]] = -np.inf
    other = np.argsort(-sim, axis=1, kind="stable")[:, :6]
    assert np.array_equal(lists.other_camera, other)
    assert np.allclose(lists.other_camera_similarity, np.take_along_axis(sim, other, 1), atol=1e-6)


def test_too_few_images_or_cameras_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        neighbour_lists(SIX[:1], SIX_CAMERAS[:1], k=2)
    with pytest.raises(ValueError, match="5 camera ids given for 6 feature rows"):
        neighbour_lists(SIX, SIX_CAMERAS[:5], k=2)
