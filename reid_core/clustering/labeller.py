"""Pseudo labels of the training images from a model (or, early on, from colour stripes)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from reid_core.clustering.pseudo_labels import Clustering, cluster_features, fuse_features
from reid_core.config import ExperimentConfig
from reid_core.data import ImageRecord, build_eval_loader
from reid_core.data.colour import stripe_colour_histograms
from reid_core.engine.trainer import Precision
from reid_core.evaluation import extract_features

__all__ = ["PseudoLabeller"]

log = logging.getLogger(__name__)


class PseudoLabeller:
    """``labeller(model, epoch, previous, step) -> (features, clustering)`` over ``records`` (the
    training images, in memory-slot order).

    ``features`` (N, d): the model's global features of every image (through the test
    transform, mirror-averaged with ``cluster.flip``, each camera's BatchNorm statistics with
    ``model.camera_norm``, made current first by ``calibrate()``); the memories are built from them.
    The clustering reads them too, except at epochs before ``cluster.colour_epochs``, where it
    reads the images' colour stripes (computed once), and with ``cluster.colour_weight`` > 0,
    where it reads both side by side (:func:`fuse_features`). ``previous`` labels (the ones trained on
    so far, or None) feed the adjusted Rand index of the stats.

    Given the trainer's global ``step``, :meth:`features` keeps what it extracted for that step
    until the clustering of that step read it: the label-free signals at the end of an epoch
    (:class:`reid_core.engine.hooks.LabelFreeHook`) and the clustering at the next one's start
    read the same weights, and one extraction serves both.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        records: Sequence[ImageRecord],
        device: torch.device,
        calibrate: Callable[[], object] | None = None,
    ) -> None:
        self.cfg = cfg
        self.records = list(records)
        self.device = device
        self.calibrate = calibrate
        self.cameras = np.array([r.camid for r in self.records], dtype=np.int64)
        self.loader = build_eval_loader(self.records, cfg.data, cfg.eval.batch_size)
        self._colour: torch.Tensor | None = None
        self._kept: tuple[int, torch.Tensor] | None = None  # (global step, its features)

    def colour(self) -> torch.Tensor:
        if self._colour is None:
            paths = [r.path for r in self.records]
            self._colour = stripe_colour_histograms(paths, self.cfg.model.num_patches)
        return self._colour

    def features(self, model: torch.nn.Module, step: int | None = None) -> torch.Tensor:
        """The model's features of every image (see the class); ``step``: the trainer's global
        step, whose features are extracted once (None: extract, keep nothing)."""
        if step is not None and self._kept is not None and self._kept[0] == step:
            return self._kept[1]
        if self.calibrate is not None:
            self.calibrate()
        # bfloat16 where the training steps use it: neighbours need no float32 precision
        dtype = Precision.for_device(self.cfg.runtime, self.device).autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            features = extract_features(
                model,
                self.loader,
                self.device,
                feature="global",
                flip=self.cfg.cluster.flip,
                cameras=self.cameras if self.cfg.model.camera_norm else None,
            )
        features = features.float().cpu()
        self._kept = None if step is None else (step, features)
        return features

    def __call__(
        self,
        model: torch.nn.Module,
        epoch: int,
        previous: np.ndarray | None = None,
        step: int | None = None,
    ) -> tuple[torch.Tensor, Clustering]:
        c = self.cfg.cluster
        features = self.features(model, step)
        self._kept = None  # the last reader of this step's features
        from_colour = epoch < c.colour_epochs
        if from_colour:
            basis, source = self.colour(), "colour stripes"
        elif c.colour_weight > 0:
            parts = [(features, 1.0), (self.colour(), c.colour_weight)]
            basis = fuse_features(parts, self.cameras, c.camera_centred)
            source = f"the model with colour stripes (weight {c.colour_weight:g})"
        else:
            basis, source = features, "the model"
        clustering = cluster_features(
            basis,
            self.cameras,
            k1=c.k1,
            k2=c.k2,
            eps=c.eps,
            eps_quantile=c.eps_quantile,
            min_samples=c.min_samples,
            camera_centred=c.camera_centred,
            outliers=c.outliers,
            scope=c.scope,
            knn=c.knn,
            max_cluster_fraction=c.max_cluster_fraction,
            previous=previous,
        )
        log.info("epoch %d: pseudo labels from %s", epoch, source)
        return features, clustering
