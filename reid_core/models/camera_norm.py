"""Camera-aware batch normalisation at test time (``model.camera_norm``).

Cameras differ in colour cast, exposure, resolution and background. A network trained from scratch
on unlabeled crops keeps much of that in its features, so it finds a person's other frames in the
same camera far more easily than in another one.

With camera normalisation every BatchNorm layer also holds statistics per training camera. Training
is unchanged: batches are normalised with their own statistics and update the layer's ordinary
running statistics. The per-camera statistics are estimated afterwards, with the weights fixed
(:meth:`reid_core.models.ReIDModel.calibrate_camera_norm`, which training calls before every
evaluation and before writing the final model): each camera's training images pass through the
network in training mode, and each layer averages the batch statistics it sees for that camera.
At test time an image from a training camera is normalised with that camera's statistics, so
every layer's output has the same distribution in every camera; an image whose camera is unknown
(-1, a camera the model was not trained on, or none given) with the ordinary running statistics.

:class:`CameraBatchNorm` is the layer; :func:`convert_to_camera_norm` swaps the layers of a module
in place, keeping their weights and statistics; :func:`camera_context` selects the camera that
every such layer of a module normalises with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CameraBatchNorm", "camera_context", "convert_to_camera_norm"]


class CameraBatchNorm(_BatchNorm):
    """A BatchNorm layer (for inputs of any rank, like ``BatchNorm1d/2d``) with statistics per
    camera besides its ordinary running ones.

    ``camera`` (set through :func:`camera_context`) is the slot, ``0 .. num_cameras - 1``, of the
    camera the next batch's images come from, or ``None``. With ``None`` the layer is an ordinary
    BatchNorm. With a slot it normalises with that camera's statistics in evaluation, and in
    training only while calibrating (:meth:`start_calibration`), when it uses the batch's
    statistics and adds them to the camera's running average (every batch of the camera weighs
    the same). Outside calibration, training ignores the camera.
    """

    camera_mean: torch.Tensor  # (K, C)
    camera_var: torch.Tensor  # (K, C)
    camera_batches: torch.Tensor  # (K,) batches averaged into each camera's statistics

    def __init__(
        self,
        num_features: int,
        num_cameras: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True)
        if num_cameras < 1:
            raise ValueError(f"num_cameras must be >= 1, got {num_cameras}")
        self.register_buffer("camera_mean", torch.zeros(num_cameras, num_features))
        self.register_buffer("camera_var", torch.ones(num_cameras, num_features))
        self.register_buffer("camera_batches", torch.zeros(num_cameras, dtype=torch.long))
        self.camera: int | None = None
        self.calibrating = False

    @classmethod
    def from_batch_norm(cls, norm: _BatchNorm, num_cameras: int) -> CameraBatchNorm:
        """A layer with ``norm``'s weights and running statistics (every camera starts with
        those)."""
        if not norm.affine or not norm.track_running_stats:
            raise ValueError(f"{norm} needs affine weights and running statistics to convert")
        layer = cls(norm.num_features, num_cameras, eps=norm.eps, momentum=norm.momentum)
        layer.load_state_dict(norm.state_dict(), strict=False)
        assert norm.running_mean is not None and norm.running_var is not None
        layer.camera_mean.copy_(norm.running_mean.expand_as(layer.camera_mean))
        layer.camera_var.copy_(norm.running_var.expand_as(layer.camera_var))
        return layer.to(norm.running_mean.device)

    @property
    def num_cameras(self) -> int:
        return int(self.camera_mean.shape[0])

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")

    @torch.no_grad()
    def start_calibration(self) -> None:
        """Forget every camera's statistics; training-mode batches with a camera set now build
        them up."""
        self.camera_mean.zero_()
        self.camera_var.fill_(1.0)
        self.camera_batches.zero_()
        self.calibrating = True

    @torch.no_grad()
    def end_calibration(self) -> None:
        """A camera that no batch came from takes the ordinary running statistics."""
        self.calibrating = False
        unseen = self.camera_batches == 0
        assert self.running_mean is not None and self.running_var is not None
        self.camera_mean[unseen] = self.running_mean
        self.camera_var[unseen] = self.running_var

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        k = self.camera
        if k is None or (self.training and not self.calibrating):
            return super().forward(input)
        if not 0 <= k < self.num_cameras:
            raise ValueError(f"camera slot {k} outside 0..{self.num_cameras - 1}")
        momentum = 0.0
        if self.training:  # calibrating: the cumulative average over the camera's batches
            momentum = 1.0 / (int(self.camera_batches[k]) + 1)
            self.camera_batches[k] += 1
        return F.batch_norm(
            input,
            self.camera_mean[k],
            self.camera_var[k],
            self.weight,
            self.bias,
            self.training,
            momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cameras={self.num_cameras}"


def convert_to_camera_norm(module: nn.Module, num_cameras: int) -> int:
    """Replace, in place, every BatchNorm layer of ``module`` (itself excluded) by a
    :class:`CameraBatchNorm` with the same weights and statistics; returns how many.

    The weights become new parameter objects: convert before building an optimiser.
    """
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm) and not isinstance(child, CameraBatchNorm):
            setattr(module, name, CameraBatchNorm.from_batch_norm(child, num_cameras))
            replaced += 1
        else:
            replaced += convert_to_camera_norm(child, num_cameras)
    return replaced


@contextmanager
def camera_context(module: nn.Module, camera: int | None) -> Iterator[None]:
    """Every :class:`CameraBatchNorm` of ``module`` normalises with camera slot ``camera``
    (``None``: the ordinary statistics) inside the block, and goes back to ``None`` after it."""
    norms = [m for m in module.modules() if isinstance(m, CameraBatchNorm)]
    for norm in norms:
        norm.camera = camera
    try:
        yield
    finally:
        for norm in norms:
            norm.camera = None
