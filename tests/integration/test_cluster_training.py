"""Training with ``loss.objective=cluster_contrast`` on the tiny synthetic data set: pseudo labels
every epoch, signals in metrics.jsonl, resume bit-identical, degenerate clusterings, cameras."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_core.clustering import Clustering
from reid_core.config import ConfigError, ExperimentConfig, load_config
from reid_core.data import ClusterSampler, DatasetError
from reid_core.engine.trainer import Trainer
from reid_core.train import build_trainer
from tests.integration.conftest import preserved_process_state, tiny_config, tiny_overrides
from tests.integration.test_training import (
    _train_stopping_at,
    assert_same,
    read_jsonl,
    without_timing,
)

STEPS = 3

#: Cluster contrast with camera proxies, the patch branch beside it, eps from the data.
CLUSTER = (
    "loss.objective=cluster_contrast",
    "loss.camera.enabled=true",
    "loss.camera.inter_from_epoch=1",
    "cluster.eps=auto",
    "cluster.min_samples=2",
    "cluster.k1=6",
    "cluster.k2=2",
    "cluster.instances_per_cluster=2",
)


def train(cfg: ExperimentConfig, stop_at: int | None = None) -> Trainer:
    with preserved_process_state():
        return _train_stopping_at(cfg, stop_at)


def test_cluster_run_labels_every_epoch_and_logs_the_signals(
    synthetic_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path / "a", synthetic_root, *CLUSTER, epochs=2, steps=STEPS)
    trainer = train(cfg)
    branch = trainer.objective.clusters
    assert branch is not None and trainer.objective.classifier is None
    assert isinstance(trainer.sampler, ClusterSampler)
    labels = branch.labels
    assert (labels >= 0).any()
    assert branch.memory.num_clusters == int(labels.max()) + 1
    assert branch.proxies is not None and branch.proxies.num_proxies >= branch.memory.num_clusters
    history = read_jsonl(cfg.runtime.output_dir / "metrics.jsonl")
    for record in history:
        for key in ("cluster/clusters", "cluster/outlier_fraction", "cluster/eps"):
            assert key in record, (key, record)
        assert record["loss/cluster"] > 0 and "loss/intra" in record and "eval/mAP" in record
    assert "cluster/adjusted_rand" not in history[0]  # nothing to compare the first with
    assert -1.0 <= history[1]["cluster/adjusted_rand"] <= 1.0
    assert history[0]["loss/inter"] == 0.0 and history[1]["loss/inter"] > 0.0
    progress = json.loads((cfg.runtime.output_dir / "progress.json").read_text())
    assert progress["clustering"]["cluster/clusters"] == history[1]["cluster/clusters"]


@pytest.mark.parametrize("stop_at", [2, STEPS])  # mid-epoch, and at the end of epoch 0
def test_cluster_run_resumes_bit_identical(
    synthetic_root: Path, tmp_path: Path, stop_at: int
) -> None:
    a = train(tiny_config(tmp_path / "a", synthetic_root, *CLUSTER, epochs=2, steps=STEPS))
    cfg_b = tiny_config(tmp_path / "b", synthetic_root, *CLUSTER, epochs=2, steps=STEPS)
    b = train(cfg_b, stop_at=stop_at)
    assert_same(b.model_without_ddp.state_dict(), a.model_without_ddp.state_dict(), "model")
    assert_same(b.objective.state_dict(), a.objective.state_dict(), "objective")
    assert records(cfg_b.runtime.output_dir) == records(a.cfg.runtime.output_dir)


def records(output_dir: Path) -> list[dict[str, object]]:
    """metrics.jsonl without what measures time."""
    timed = without_timing(read_jsonl(output_dir / "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k != "cluster/seconds"} for r in timed]


def test_a_clustering_with_no_cluster_falls_back_and_warns(
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """All outliers at the first clustering: every image its own cluster; at the second, the
    previous labels are kept. Both say so in a warning and in ``cluster/degenerate``."""
    import reid_core.clustering.labeller as labeller_module

    real = labeller_module.cluster_features
    calls = {"n": 0}

    def all_outliers(*args, **kwargs) -> Clustering:  # type: ignore[no-untyped-def]
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == 1:
            return result
        return Clustering(np.full_like(result.labels, -1), result.stats, "DBSCAN found no cluster")

    monkeypatch.setattr(labeller_module, "cluster_features", all_outliers)
    cfg = tiny_config(tmp_path / "a", synthetic_root, *CLUSTER, epochs=2, steps=STEPS)
    with caplog.at_level(logging.WARNING, logger="reid_core.engine.hooks"):
        trainer = train(cfg)
    history = read_jsonl(cfg.runtime.output_dir / "metrics.jsonl")
    assert "cluster/degenerate" not in history[0] and history[1]["cluster/degenerate"] == 1.0
    assert "training on the previous pseudo labels" in caplog.text
    assert (trainer.objective.clusters.labels >= 0).any()

    calls["n"] = 1  # from now on every clustering is degenerate, the first one included
    cfg = tiny_config(tmp_path / "b", synthetic_root, *CLUSTER, epochs=1, steps=STEPS)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reid_core.engine.hooks"):
        trainer = train(cfg)
    assert "every image is its own cluster" in caplog.text
    labels = trainer.objective.clusters.labels
    assert torch.equal(labels, torch.arange(len(labels)))


def test_camera_proxies_refuse_images_without_a_camera(tmp_path: Path) -> None:
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    from PIL import Image

    for i in range(12):
        Image.new("RGB", (48, 96), (20 * i, 40, 90)).save(folder / f"crop_{i}.jpg")
    overrides = tiny_overrides(tmp_path / "out", folder, *CLUSTER)
    overrides = [o for o in overrides if not o.startswith("data.dataset=")]
    cfg = load_config(None, [*overrides, "data.dataset=image_folder", "eval.enabled=false"])
    with pytest.raises(DatasetError, match=r"loss\.camera\.enabled=true needs the camera"):
        build_trainer(cfg)
    # without the camera terms the same data trains (one camera group, -1)
    cfg = load_config(
        None,
        [
            *overrides,
            "data.dataset=image_folder",
            "eval.enabled=false",
            "loss.camera.enabled=false",
        ],
    )
    assert build_trainer(cfg).objective.clusters is not None


def test_cluster_settings_are_checked(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"loss\.camera\.enabled=true needs pseudo labels"):
        tiny_config(tmp_path, synthetic_root, "loss.camera.enabled=true")
    with pytest.raises(ConfigError, match="not a multiple of cluster.instances_per_cluster=3"):
        tiny_config(
            tmp_path,
            synthetic_root,
            "loss.objective=cluster_contrast",
            "cluster.instances_per_cluster=3",
        )
    # the paper's objective stays the default
    assert tiny_config(tmp_path, synthetic_root).loss.objective == "instance_memory"
