"""The training objective: what the loss is and the state it keeps between steps.

* :mod:`~reid_core.objective.dual_branch`: :class:`DualBranchObjective`, the method's two branches
  combined into one loss (the paper's memory classifier + GSL, or cluster contrast, for the global
  branch; PEDAL + IPFL for the patch branch);
* :mod:`~reid_core.objective.cluster_branch`: the global branch of ``loss.objective=cluster_contrast``
  (pseudo labels, cluster memory, camera proxies);
* :mod:`~reid_core.objective.memory`: the per-image feature banks;
* :mod:`~reid_core.objective.losses`: one module per loss term, its formula in the docstring.

The trainer (:mod:`reid_core.engine`) builds a :class:`DualBranchObjective` and calls it once per
step; nothing here knows about loaders, checkpoints or processes beyond the all-gather of a step.
"""

from reid_core.objective.dual_branch import DualBranchObjective

__all__ = ["DualBranchObjective"]
