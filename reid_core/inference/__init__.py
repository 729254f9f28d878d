"""A trained model in use: images to features, a gallery to search, an ONNX file to ship.

* :mod:`~reid_core.inference.embedder`: :class:`Embedder`, the model as one image-to-feature
  function (what MLflow stores and the service serves);
* :mod:`~reid_core.inference.search`: :class:`GalleryIndex`, a gallery's features in a faiss index;
* :mod:`~reid_core.inference.export`: the embedder as ONNX, with the check that it computes the same
  (needs the ``onnx`` extra, imported only when used).
"""

from reid_core.inference.embedder import Embedder
from reid_core.inference.search import GalleryIndex

__all__ = ["Embedder", "GalleryIndex"]
