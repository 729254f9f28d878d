"""Loss terms: memory classifier + GSL (global branch), PEDAL and IPFL (patch branch).

The caller combines them: ``L = w_E L_E + w_GSL L_GSL + 2 L_PEDAL + 1 L_IPFL`` (weights from
:class:`reid_core.config.LossConfig`); every loss here returns its unweighted value.
"""

from reid_core.objective.losses.ipfl import IPFLLoss
from reid_core.objective.losses.memory_classifier import (
    MemoryClassifierLoss,
    credible_neighbour_lists,
    credible_neighbours,
)
from reid_core.objective.losses.pedal import PEDALLoss, nearest_other_rows

__all__ = [
    "IPFLLoss",
    "MemoryClassifierLoss",
    "PEDALLoss",
    "credible_neighbour_lists",
    "credible_neighbours",
    "nearest_other_rows",
]
