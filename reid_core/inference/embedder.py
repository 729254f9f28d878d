"""A trained model as one image-to-feature function: the form that is shipped and served.

:class:`Embedder` wraps a :class:`~reid_core.models.ReIDModel` with its input normalisation and
the final L2 normalisation, so that its ``forward`` takes plain RGB images in ``[0, 1]`` at the
model's input size and returns unit-length features. It is what MLflow's ``pytorch`` flavor
stores, what the ONNX export traces, and what the service's embed and search endpoints call::

    embedder = Embedder.from_file("outputs/run/model_final.pt")
    features = embedder.embed_files(["a.jpg", "b.jpg"])  # (2, D) float32, rows of norm 1
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from reid_core.config import ExperimentConfig
from reid_core.models import ReIDModel
from reid_core.models.reid_model import FeatureKind

__all__ = ["Embedder"]


class Embedder(nn.Module):
    """``images (N, 3, H, W) in [0, 1], RGB -> features (N, D)``, each row of L2 norm 1.

    ``H, W`` must be the model's input size (:attr:`input_size`); :meth:`preprocess` resizes a
    PIL image to it. ``feature`` picks the test feature (``concat``: global plus patch features,
    the paper's; ``global``: the global branch only). With ``flip``, the feature of an image and
    of its mirror image are averaged before the normalisation.
    """

    mean: torch.Tensor  # (1, 3, 1, 1) buffers
    std: torch.Tensor

    def __init__(
        self,
        model: ReIDModel,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        feature: FeatureKind = "concat",
        flip: bool = False,
    ) -> None:
        super().__init__()
        if feature not in ("concat", "global"):
            raise ValueError(f"feature must be 'concat' or 'global', got {feature!r}")
        self.model = model.eval()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.feature: FeatureKind = feature
        self.flip = bool(flip)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.eval()

    @classmethod
    def from_config(
        cls,
        model: ReIDModel,
        cfg: ExperimentConfig,
        feature: FeatureKind | None = None,
        flip: bool | None = None,
    ) -> Embedder:
        """The embedder a run with ``cfg`` evaluates with (its feature kind and flip setting)."""
        return cls(
            model,
            (cfg.data.height, cfg.data.width),
            cfg.data.mean,
            cfg.data.std,
            feature=feature or cfg.eval.feature,
            flip=cfg.eval.flip if flip is None else flip,
        )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        feature: FeatureKind | None = None,
        flip: bool | None = None,
        map_location: str | torch.device = "cpu",
    ) -> Embedder:
        """Load ``model_final.pt`` (or a training checkpoint) as an embedder."""
        from reid_core.model_io import load_model

        model, cfg = load_model(path, map_location=map_location)
        return cls.from_config(model, cfg, feature=feature, flip=flip)

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim(self.feature)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def forward(
        self, images: torch.Tensor, cameras: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """``cameras``: each image's camera id, read by a model trained with camera
        normalisation (``model.camera_norm``); ``None`` or -1 for unknown cameras."""
        x = (images - self.mean) / self.std
        feats = self.model.extract(x, self.feature, cameras=cameras).float()
        if self.flip:
            mirrored = self.model.extract(x.flip(dims=[-1]), self.feature, cameras=cameras)
            feats = feats + mirrored.float()
        return F.normalize(feats, p=2.0, dim=1)

    def train(self, mode: bool = True) -> Embedder:
        """An embedder stays in eval mode (batch norm statistics are never updated)."""
        return super().train(False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image as a ``(3, H, W)`` float tensor in ``[0, 1]`` at the input size."""
        image = image.convert("RGB").resize(
            (self.input_size[1], self.input_size[0]), Image.Resampling.BILINEAR
        )
        return TF.pil_to_tensor(image).float().div_(255.0)

    @torch.inference_mode()
    def embed_images(
        self,
        images: Iterable[Image.Image],
        batch_size: int = 64,
        cameras: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Features of PIL images, ``(N, D)`` float32; ``cameras``: see :meth:`forward`, one
        per image."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[np.ndarray] = []
        batch: list[torch.Tensor] = []
        done = 0

        def flush() -> None:
            nonlocal done
            if batch:
                cams = None if cameras is None else list(cameras[done : done + len(batch)])
                if cameras is not None and cams is not None and len(cams) != len(batch):
                    raise ValueError(
                        f"{len(cameras)} cameras given for at least {done + len(batch)} images"
                    )
                x = torch.stack(batch).to(self.device)
                out.append(self(x, cams).cpu().numpy().astype(np.float32))
                done += len(batch)
                batch.clear()

        for image in images:
            batch.append(self.preprocess(image))
            if len(batch) == batch_size:
                flush()
        flush()
        if cameras is not None and len(cameras) != done:
            raise ValueError(f"{len(cameras)} cameras given for {done} images")
        if not out:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return np.concatenate(out)

    def embed_files(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 64,
        cameras: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Features of image files, ``(N, D)`` float32, in the order given; ``cameras``: see
        :meth:`forward`, one per file.

        Raises :class:`ValueError` naming the first file that cannot be read as an image.
        """

        def load(path: str | Path) -> Image.Image:
            try:
                with Image.open(path) as im:
                    im.load()
                    return im.copy()
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read image {path}: {exc}") from exc

        return self.embed_images((load(p) for p in paths), batch_size=batch_size, cameras=cameras)
