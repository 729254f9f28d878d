"""The import path that models registered before :mod:`reid_core.inference` was created unpickle.

``mlflow.pytorch.log_model`` pickles the :class:`~reid_core.inference.embedder.Embedder` by its
module path, and versions registered before the move name ``reid_core.embedder.Embedder``; this
module keeps ``mlflow.pytorch.load_model`` working for them. New code imports
:mod:`reid_core.inference.embedder`.
"""

from reid_core.inference.embedder import Embedder

__all__ = ["Embedder"]
