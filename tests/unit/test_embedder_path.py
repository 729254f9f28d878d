"""Models registered in MLflow before ``reid_core.inference`` existed still unpickle.

``mlflow.pytorch.log_model(..., serialization_format="pickle")`` stores the Embedder by its module
path; versions logged before the move name ``reid_core.embedder.Embedder``.
"""

from __future__ import annotations

import pickle

import torch

from reid_core.config import load_config
from reid_core.inference.embedder import Embedder
from reid_core.models import ReIDModel
from reid_core.presets import preset_path


def test_an_embedder_pickled_under_the_old_module_path_loads_and_computes_the_same() -> None:
    cfg = load_config(preset_path("smoke"))
    torch.manual_seed(0)
    embedder = Embedder.from_config(ReIDModel(cfg.model), cfg)
    # Protocol 2 names a class as "c<module>\n<name>\n", so the path can be rewritten in place.
    current = pickle.dumps(embedder, protocol=2)
    old = current.replace(b"creid_core.inference.embedder\n", b"creid_core.embedder\n")
    assert old != current

    loaded = pickle.loads(old)

    assert type(loaded) is Embedder
    images = torch.rand(2, 3, cfg.data.height, cfg.data.width)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), embedder(images))
