"""An :class:`~reid_core.inference.embedder.Embedder` as an ONNX model, and the check that it computes the same.

The ONNX graph is the embedder's whole ``forward``: input normalisation, the network, the test
feature and the final L2 normalisation. So a runtime feeds it plain images and gets unit-length
features, with nothing to reimplement::

    images   float32 (N, 3, H, W), RGB in [0, 1], H x W = the model's input size; N is dynamic
    features float32 (N, D), every row of L2 norm 1

The export goes through ``torch.export`` (PyTorch's ONNX exporter, which needs ``onnxscript``);
the ONNX Runtime check needs ``onnxruntime``. All three come with the ``onnx`` extra
(``pip install 'reid-service[onnx]'``) and are imported here only when used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_core.atomic_write import atomic_path
from reid_core.inference.embedder import Embedder

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxMismatchError",
    "check_onnx",
    "export_onnx",
]

INPUT_NAME = "images"
OUTPUT_NAME = "features"
#: ONNX opset of the export: 18 runs on ONNX Runtime >= 1.14 (and ``affine_grid``, which got its
#: own operator only in opset 20, is decomposed into primitive operators).
DEFAULT_OPSET = 18
#: Batch size of the example input the graph is traced with (not 1: the exporter would
#: specialise a batch of one and the batch axis would not stay dynamic).
_EXAMPLE_BATCH = 2

_INSTALL_HINT = "install the `onnx` extra: pip install 'reid-service[onnx]'"


class OnnxMismatchError(RuntimeError):
    """The ONNX model does not compute what the PyTorch embedder computes."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(
            f"ONNX export and checks need {module}, which is not installed: {_INSTALL_HINT}"
        ) from exc


def export_onnx(embedder: Embedder, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``embedder`` as a self-contained ONNX file at ``path`` (parents created); returns it.

    The graph has one input ``images`` (N, 3, H, W) with a dynamic batch axis and one output
    ``features`` (N, D), as described in the module docstring. The embedder's input size,
    feature kind, flip setting and feature dimension are written into the model's metadata
    (``reid_core.*`` keys), so a consumer can read them with ``onnx`` or ONNX Runtime. A model
    trained with ``model.camera_norm`` is exported with the pooled statistics of its training
    cameras (what it uses for an image whose camera is not given).

    Raises:
        ImportError: ``onnx`` or ``onnxscript`` is missing (the ``onnx`` extra).
        RuntimeError: the installed PyTorch is older than 2.6 (its exporter cannot do this).
    """
    if torch.__version__ < (2, 6):  # type: ignore[operator]  # TorchVersion compares with tuples
        raise RuntimeError(f"ONNX export needs torch >= 2.6, this is torch {torch.__version__}")
    onnx = _require("onnx")
    _require("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = embedder.input_size
    example = torch.rand(_EXAMPLE_BATCH, 3, height, width, device=embedder.device)
    program = torch.onnx.export(
        embedder.eval(),
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    if program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    program.model.metadata_props.update(
        {
            "reid_core.input": f"{INPUT_NAME}: float32 (N, 3, {height}, {width}), RGB in [0, 1]",
            "reid_core.feature": embedder.feature,
            "reid_core.flip": str(embedder.flip).lower(),
            "reid_core.feature_dim": str(embedder.feature_dim),
        }
    )
    with atomic_path(path) as tmp:  # a model that fails the check never replaces the file
        program.save(tmp, external_data=False)
        onnx.checker.check_model(str(tmp))
    return path


def check_onnx(
    embedder: Embedder,
    path: str | Path,
    batch_size: int = 3,
    tolerance: float = 1e-4,
    seed: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> float:
    """Run the ONNX model at ``path`` with ONNX Runtime and ``embedder`` on the same random
    images; return ``max |features_onnx - features_torch|`` over every element.

    ``batch_size`` differs from the export's example batch by default, so the check also shows
    that the batch axis is dynamic. ``seed`` fixes the images.

    Raises:
        OnnxMismatchError: the input or output is not the one :func:`export_onnx` writes, or the
            largest difference is above ``tolerance`` (or not finite).
        ImportError: ``onnxruntime`` is missing (the ``onnx`` extra).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    session = ort.InferenceSession(str(path), providers=list(providers))
    height, width = embedder.input_size
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME] or list(inputs[0].shape[1:]) != [3, height, width]:
        found = [(i.name, i.shape) for i in inputs]
        raise OnnxMismatchError(
            f"{path} takes inputs {found}; the embedder takes {INPUT_NAME!r} of shape "
            f"(N, 3, {height}, {width}): was it exported from another model?"
        )

    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, height, width, generator=generator)
    with torch.inference_mode():
        expected = embedder(images.to(embedder.device)).float().cpu().numpy()
    (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    if actual.shape != expected.shape:
        raise OnnxMismatchError(
            f"{path} returns features of shape {actual.shape}, the embedder {expected.shape}"
        )
    diff = float(np.abs(actual.astype(np.float32) - expected).max())
    if not math.isfinite(diff) or diff > tolerance:
        raise OnnxMismatchError(
            f"ONNX Runtime and PyTorch features differ by up to {diff:.3g} (tolerance "
            f"{tolerance:g}) on {batch_size} random images; the export is not faithful: check "
            "the opset (--opset) and the onnxruntime version"
        )
    return diff
