"""The arithmetic of the service benchmarks (bench/api_load.py, bench/poll_scale.py): ratios to
the bare route, what counts as an index scan, and how stale a polling tab's view is."""

from __future__ import annotations

import math

import pytest

from bench.api_load import LoadResult, plan_nodes, reads_by_index, x_bare
from bench.poll_scale import Poll, Write, staleness

INDEX_PAGE = """\
Limit  (cost=0.29..16.91 rows=50 width=1777) (actual time=0.027..0.060 rows=50 loops=1)
  Buffers: shared hit=45
  ->  Index Scan Backward using ix_jobs_owner_created_at on jobs  (cost=0.29..3391.87 rows=10201 width=1777) (actual time=0.026..0.055 rows=50 loops=1)
        Index Cond: ((owner)::text = 'alice'::text)
Planning Time: 0.587 ms
Execution Time: 0.087 ms"""

SORTED_PAGE = """\
Limit  (cost=1745.11..1745.24 rows=50 width=2039) (actual time=18.490..18.497 rows=50 loops=1)
  ->  Sort  (cost=1745.11..1770.66 rows=10217 width=2039) (actual time=18.488..18.491 rows=50 loops=1)
        Sort Key: created_at DESC, id
        ->  Index Scan using ix_jobs_owner_state on jobs  (cost=0.00..1405.71 rows=10217 width=2039)
              Index Cond: ((owner)::text = 'alice'::text)
Execution Time: 18.529 ms"""


def test_an_index_scan_is_told_from_a_sort_of_the_rows() -> None:
    assert plan_nodes(INDEX_PAGE) == [
        "Limit",
        "Index Scan Backward using ix_jobs_owner_created_at on jobs",
    ]
    assert reads_by_index(INDEX_PAGE)
    assert not reads_by_index(SORTED_PAGE)  # an index, but every row of the owner is sorted
    assert not reads_by_index("Limit  (cost=1)\n  ->  Seq Scan on jobs  (cost=0.00..1405.71)")


def _run(name: str, processes: int, requests: int, p99_ms: float) -> LoadResult:
    return LoadResult(
        name, requests, 10.0, 1.0, 1.0, p99_ms, 1.0, p99_ms, {}, {}, 100.0, 1.0, 8, processes
    )


def test_a_route_is_compared_with_the_bare_route_of_as_many_processes() -> None:
    runs = [_run("bare", 1, 10_000, 5.0), _run("bare", 2, 16_000, 4.0)]
    runs += [_run("get_job", 1, 4_000, 10.0), _run("get_job", 2, 8_000, 6.0)]
    assert x_bare(runs, runs[2]) == pytest.approx((0.4, 2.0))
    assert x_bare(runs, runs[3]) == pytest.approx((0.5, 1.5))
    assert all(math.isnan(r) for r in x_bare(runs[2:], runs[2]))  # no bare run to compare


def test_staleness_runs_from_the_commit_to_the_first_answer_showing_it() -> None:
    def polls(tab: int, job: str, answers: list[tuple[float, int]]) -> list[Poll]:
        return [Poll(tab, job, t - 0.01, t, 304, v) for t, v in answers]

    seen = polls(0, "a", [(0.0, 1), (2.0, 1), (4.0, 2), (6.0, 2), (8.0, 3)])
    seen += polls(1, "a", [(1.0, 1), (3.0, 2), (5.0, 2), (7.0, 2)])
    seen += polls(2, "b", [(0.5, 7), (2.5, 7)])
    writes = [
        Write("a", 2, 2.5, 0.01),  # tab 0 sees it at 4.0, tab 1 at 3.0
        Write("a", 3, 7.5, 0.01),  # tab 0 at 8.0; after tab 1's last poll: not counted
        Write("a", 4, 9.0, 0.01),  # after every poll: not counted
        Write("b", 8, 3.0, 0.01),  # after tab 2's last poll
    ]
    lags, early = staleness(writes, seen)
    assert sorted(lags) == pytest.approx([0.5, 0.5, 1.5])
    assert early == 0
    # an answer showing the write before the writer noted its commit counts as 0 s
    lags, early = staleness([Write("a", 2, 3.005, 0.01)], seen)
    assert sorted(lags) == pytest.approx([0.0, 0.995]) and early == 1
