"""The pair check's statistics against cases worked out by hand: Wilson's 95% score interval of a
proportion, and precision counted from answers ("unsure" and unanswered pairs left out)."""

from __future__ import annotations

import pytest

from service.core.pair_estimate import Proportion, proportion, wilson_interval


def test_seven_of_ten() -> None:
    # p = 0.7, n = 10, z^2 = 3.8415: scale 1.38415, centre (0.7 + 0.19207) / 1.38415 = 0.64449,
    # halfwidth 1.95996 / 1.38415 * sqrt(0.021 + 0.0096037) = 0.24772
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.39677, abs=5e-5)
    assert high == pytest.approx(0.89221, abs=5e-5)


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        (10, 10, 10 / (10 + 3.841459), 1.0),  # p = 1: low = n / (n + z^2)
        (0, 5, 0.0, 3.841459 / (5 + 3.841459)),  # p = 0: high = z^2 / (n + z^2)
        (0, 0, 0.0, 1.0),  # nothing known
        (50, 100, 0.40383, 0.59617),  # centre 0.5, halfwidth 1.95996 / 1.038415 * 0.05049
    ],
)
def test_edges_and_a_large_sample(successes: int, trials: int, low: float, high: float) -> None:
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_impossible_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="successes must be in 0..trials=3, got 4"):
        wilson_interval(4, 3)


def test_a_proportion_leaves_out_unsure_and_unanswered_pairs() -> None:
    answers = ["same"] * 7 + ["different"] * 3 + ["unsure"] * 2 + [None] * 4
    got = proportion(answers)
    assert (got.same, got.different, got.unsure, got.answers) == (7, 3, 2, 10)
    assert got.estimate == pytest.approx(0.7)
    assert (got.low, got.high) == pytest.approx(wilson_interval(7, 10))


def test_no_answer_yet_has_no_estimate() -> None:
    assert proportion([None, "unsure"]) == Proportion(0, 0, 1, None, 0.0, 1.0)
