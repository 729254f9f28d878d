"""Precision at rank 1 and at rank 5 from a person's answers on sampled pairs, with intervals.

A pair check (:mod:`service.core.pair_checks`) samples queries ``q`` uniformly from the images of
a gallery and shows, for each, two pairs: ``(q, c_1)``, its nearest image from another camera,
and ``(q, c_J)``, the image at a rank ``J`` drawn uniformly from ``1..K`` (``K = 5``, or fewer
when fewer images come from other cameras), the same pair when ``J = 1``. With ``y_r(q) = 1`` when
``c_r`` shows the person of ``q``:

* precision at rank 1, ``P@1 = E_q[y_1(q)]``: the answers on ``(q, c_1)`` are a uniform sample of
  it;
* precision at rank 5, ``P@5 = E_q[(1/K) sum_r y_r(q)]``: since ``E_J[y_J(q)] = (1/K) sum_r
  y_r(q)``, the answers on ``(q, c_J)`` are a uniform sample of it too.

Each estimate is the share ``p = s / n`` of "same" among the ``n`` pairs answered "same" or
"different"; "unsure" answers are left out of ``n`` and counted apart (the estimate is then
that of the pairs a person could tell). Its 95% interval is Wilson's score interval (Wilson
1927), which stays inside [0, 1] and is sensible for small ``n`` and ``p`` near 0 or 1::

    centre    = (p + z^2 / 2n) / (1 + z^2 / n)
    halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

with ``z = 1.959964`` (the normal's 97.5% quantile).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

#: The standard normal's 97.5% quantile: a two-sided 95% interval.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval ``(low, high)`` of a proportion seen ``successes`` times in
    ``trials`` (see the module); ``(0, 1)``, no information, when ``trials`` is 0."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in 0..trials={trials}, got {successes}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    scale = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / scale
    halfwidth = z / scale * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - halfwidth), min(1.0, centre + halfwidth)


@dataclass(frozen=True)
class Proportion:
    """A proportion estimated from answers: ``estimate = same / (same + different)``, None (and
    the interval ``[0, 1]``) before any such answer; ``unsure`` answers are counted apart."""

    same: int
    different: int
    unsure: int
    estimate: float | None
    low: float
    high: float

    @property
    def answers(self) -> int:
        """The answers the estimate is made of (same or different)."""
        return self.same + self.different


def proportion(answers: Iterable[str | None]) -> Proportion:
    """The proportion of ``"same"`` among ``answers`` (``"same"``, ``"different"``,
    ``"unsure"``, or None for a pair not answered yet, which counts nowhere)."""
    counts = {"same": 0, "different": 0, "unsure": 0}
    for answer in answers:
        if answer is not None:
            counts[answer] += 1
    same, different = counts["same"], counts["different"]
    low, high = wilson_interval(same, same + different)
    return Proportion(
        same=same,
        different=different,
        unsure=counts["unsure"],
        estimate=same / (same + different) if same + different else None,
        low=low,
        high=high,
    )
