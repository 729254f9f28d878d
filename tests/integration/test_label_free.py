"""The label-free signals during training (``eval.label_free``): on data without a query/gallery
split, at every evaluation including the one before training; with one camera, the fallback;
with cluster contrast, from the clustering's features without changing the training."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

import reid_core.clustering.labeller as labeller_module
from reid_core.engine.exit_codes import ExitCode
from reid_core.run_dir import RunDir
from tests.integration.conftest import preserved_process_state, tiny_config
from tests.integration.test_cluster_training import CLUSTER, STEPS, records
from tests.integration.test_training import _train_stopping_at, assert_same, build

SIGNALS = {"mutual_nn_rate", "similarity_margin", "neighbour_stability"}


def unlabelled_folder(synthetic_root: Path, destination: Path, cameras: bool) -> Path:
    """The synthetic training images as an ``image_folder``: no query/gallery, no identities;
    their cameras in the names (``PPPP_cC...``), or, without ``cameras``, none known."""
    (train,) = synthetic_root.glob("*/bounding_box_train")
    destination.mkdir()
    for i, image in enumerate(sorted(train.glob("*.jpg"))):
        shutil.copy(image, destination / (image.name if cameras else f"crop_{i:03d}.jpg"))
    return destination


@pytest.mark.parametrize("cameras", [True, False], ids=["cameras", "no camera"])
def test_unlabelled_data_gets_the_signals_at_every_evaluation(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, cameras: bool
) -> None:
    folder = unlabelled_folder(synthetic_root, tmp_path / "crops", cameras)
    cfg = tiny_config(
        tmp_path / "run",
        folder,
        "data.dataset=image_folder",
        "eval.at_start=true",
        "eval.label_free_k=4",
        epochs=2,
    )
    with caplog.at_level(logging.WARNING):
        assert build(cfg).train() == ExitCode.OK
    run = RunDir(cfg.runtime.output_dir)
    records = run.read_metrics()
    assert [r.epoch for r in records] == [0, 1, 2]  # every epoch evaluated (every_n_epochs=1)
    for record in records:
        assert record.evaluation() == {}  # nothing to evaluate with labels
        signals = record.family("label_free")
        # the first evaluation has no previous neighbours to be stable against
        assert set(signals) == SIGNALS - {"neighbour_stability"} if record.epoch == 0 else SIGNALS
        assert 0.0 <= signals["mutual_nn_rate"] <= 1.0
        assert signals["similarity_margin"] >= 0.0
        assert 0.0 <= signals.get("neighbour_stability", 0.0) <= 1.0
    assert records[1].family("loss")  # the training lines keep everything else
    progress = run.read_progress()
    assert progress is not None
    last = {f"label_free/{name}": value for name, value in records[-1].family("label_free").items()}
    assert progress.metrics == {"epoch": 2, **last}
    fell_back = "come from one camera (or none is known)" in caplog.text
    assert fell_back is not cameras


def test_cluster_contrast_signals_reuse_the_clustering_features_and_change_no_weight(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clustering at an epoch's start reads the features the signals extracted at the end
    of the previous epoch (or before training): one extraction more than without the signals,
    the last evaluation's. The training is the same with them or without."""
    extractions: list[int] = []
    real = labeller_module.extract_features

    def counted(*args: object, **kwargs: object) -> object:
        extractions.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(labeller_module, "extract_features", counted)
    runs = {}
    for switch in ("true", "false"):
        cfg = tiny_config(
            tmp_path / switch,
            synthetic_root,
            *CLUSTER,
            "eval.at_start=true",
            f"eval.label_free={switch}",
            epochs=2,
            steps=STEPS,
        )
        extractions.clear()
        with preserved_process_state():
            runs[switch] = (_train_stopping_at(cfg, None), len(extractions), cfg)
    (on, on_extractions, on_cfg), (off, off_extractions, off_cfg) = runs["true"], runs["false"]
    assert (on_extractions, off_extractions) == (3, 2)  # steps 0, 3, 6 against 0, 3
    assert_same(on.model_without_ddp.state_dict(), off.model_without_ddp.state_dict(), "model")
    assert_same(on.objective.state_dict(), off.objective.state_dict(), "objective")
    with_signals = records(on_cfg.runtime.output_dir)
    assert [{k for k in r if k.startswith("label_free/")} for r in with_signals] == [
        {f"label_free/{name}" for name in names}
        for names in (SIGNALS - {"neighbour_stability"}, SIGNALS, SIGNALS)
    ]
    left_out = [
        {k: v for k, v in r.items() if not k.startswith("label_free/")} for r in with_signals
    ]
    assert left_out == records(off_cfg.runtime.output_dir)  # everything else, to the last bit
