"""Backbone registry: convolutional trunks that map an image batch to a feature map.

Every backbone returns ``(B, C, H/s, W/s)`` and exposes ``out_channels``. The paper's default is
ResNet-50 with the last stride set to 1 (a 256x128 input gives a 16x8 map).

ImageNet weights are never downloaded: they come from ``model.weights_path`` or from torchvision's
cache (``$TORCH_HOME/hub/checkpoints``), and when neither has them the build fails with
:class:`PretrainedWeightsNotFoundError` saying where it looked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

__all__ = [
    "BACKBONES",
    "Backbone",
    "PretrainedWeightsNotFoundError",
    "backbone_channels",
    "build_backbone",
    "register_backbone",
]


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """ImageNet weights were asked for but are not on this machine."""


class Backbone(nn.Module):
    """A trunk and the number of channels of the map it returns."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


BackboneFactory = Callable[[int], tuple[nn.Module, int, Any]]
BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register ``factory(last_stride) -> (torchvision model, out_channels, weights enum)``."""

    def deco(factory: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = factory
        return factory

    return deco


def _resnet_body(net: torchvision.models.ResNet, last_stride: int) -> nn.Module:
    if last_stride == 1:
        block = net.layer4[0]
        # Bottleneck (v1.5) strides in conv2, BasicBlock in conv1.
        strided = (
            block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
        )
        strided.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


def _resnet(arch: str, weights: Any, channels: int) -> BackboneFactory:
    def factory(last_stride: int) -> tuple[nn.Module, int, Any]:
        net = getattr(torchvision.models, arch)(weights=None)
        return _resnet_body(net, last_stride), channels, weights

    return factory


register_backbone("resnet50")(
    _resnet("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048)
)
register_backbone("resnet34")(
    _resnet("resnet34", torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 512)
)
register_backbone("resnet18")(
    _resnet("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512)
)


@register_backbone("mobilenet_v3_small")
def _mobilenet_v3_small(last_stride: int) -> tuple[nn.Module, int, Any]:
    net = torchvision.models.mobilenet_v3_small(weights=None)
    if last_stride == 1:
        strided = [
            m for m in net.features.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)
        ]
        strided[-1].stride = (1, 1)
    return net.features, 576, torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1


def _cached_weights_file(weights: Any) -> Path:
    filename = Path(weights.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_imagenet(body: nn.Module, name: str, weights: Any, weights_path: Path | None) -> None:
    candidates = [weights_path] if weights_path is not None else [_cached_weights_file(weights)]
    path = candidates[0]
    if path is None or not path.is_file():
        raise PretrainedWeightsNotFoundError(
            f"ImageNet weights for backbone {name!r} not found at {path}. Nothing is downloaded at "
            f"run time: copy {Path(weights.url).name} there, set model.weights_path to a local "
            "file, or set model.pretrained=none to train from scratch."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise PretrainedWeightsNotFoundError(
            f"cannot read ImageNet weights {path} for backbone {name!r}: {exc}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = body.state_dict()
    # torchvision's ResNet keys are 'conv1.weight', 'layer1.0...'; our Sequential numbers them.
    remapped = _remap_to_sequential(state, own)
    missing = [k for k in own if k not in remapped]
    if missing:
        raise PretrainedWeightsNotFoundError(
            f"weights file {path} does not fit backbone {name!r}: {len(missing)} tensors missing "
            f"(first: {missing[:3]})"
        )
    body.load_state_dict(remapped)


def _remap_to_sequential(state: dict[str, torch.Tensor], own: dict[str, Any]) -> dict[str, Any]:
    if all(k in state for k in own):
        return {k: state[k] for k in own}
    prefixes = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    out: dict[str, Any] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in prefixes:
            out[f"{prefixes.index(head)}.{rest}"] = value
        elif head == "features":  # mobilenet
            out[rest] = value
    return {k: v for k, v in out.items() if k in own}


@functools.cache
def backbone_channels(name: str, last_stride: int = 1) -> int:
    """Channels of a registered backbone's feature map (built once, without weights, to ask)."""
    if name not in BACKBONES:
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r} (model.backbone); known: {known}")
    _body, channels, _weights = BACKBONES[name](last_stride)
    return int(channels)


def build_backbone(
    name: str, last_stride: int = 1, pretrained: bool = False, weights_path: Path | None = None
) -> Backbone:
    """Build a registered backbone, optionally with local ImageNet weights."""
    if name not in BACKBONES:
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r} (model.backbone); known: {known}")
    body, channels, weights = BACKBONES[name](last_stride)
    if pretrained:
        _load_imagenet(body, name, weights, weights_path)
    return Backbone(body, channels)
