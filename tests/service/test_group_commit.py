"""service.core.group_commit: requests answered in groups by one thread, each with its own
outcome."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

import pytest

from service.core.group_commit import GroupCommitter


class Recorder:
    """A ``handle`` that records its groups, doubles numbers and refuses negative ones; the first
    group waits for :attr:`release` (so that the next requests gather behind it)."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, group: Sequence[int]) -> list[int | BaseException]:
        self.groups.append(list(group))
        self.entered.set()
        assert self.release.wait(10)
        return [ValueError(f"{n} < 0") if n < 0 else 2 * n for n in group]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def committer(recorder: Recorder) -> Iterator[GroupCommitter[int, int]]:
    grouped = GroupCommitter(recorder, max_group=4)
    yield grouped
    recorder.release.set()
    grouped.close(timeout=10)


def _outcome(future: Future[int]) -> int | str:
    error = future.exception(timeout=10)
    return future.result() if error is None else f"{type(error).__name__}: {error}"


def test_requests_that_wait_together_are_one_group_each_with_its_own_outcome(
    committer: GroupCommitter[int, int], recorder: Recorder
) -> None:
    first = committer.submit(1)
    assert recorder.entered.wait(10)
    waiting = [committer.submit(n) for n in (2, -3, 4, 5, 6)]  # gather behind the first
    recorder.release.set()
    assert [_outcome(f) for f in [first, *waiting]] == [2, 4, "ValueError: -3 < 0", 8, 10, 12]
    # the first alone, then at most max_group (4) of those that waited, in their order
    assert recorder.groups == [[1], [2, -3, 4, 5], [6]]


def test_a_failed_group_answers_each_of_its_requests_and_the_next_group_is_served(
    committer: GroupCommitter[int, int], recorder: Recorder
) -> None:
    recorder.release.set()
    broken = GroupCommitter(lambda group: 1 / 0, name="broken")  # type: ignore[arg-type,return-value]
    failed = [broken.submit(n) for n in (1, 2)]
    assert [type(f.exception(timeout=10)) for f in failed] == [ZeroDivisionError] * 2
    assert _outcome(broken.submit(3)) == "ZeroDivisionError: division by zero"
    broken.close(timeout=10)

    miscounted = GroupCommitter(lambda group: [], name="miscounted")
    error = miscounted.submit(1).exception(timeout=10)
    assert isinstance(error, RuntimeError) and "0 outcomes for a group of 1" in str(error)
    miscounted.close(timeout=10)
    assert _outcome(committer.submit(5)) == 10


def test_a_request_cancelled_before_its_group_is_not_handed_over(
    committer: GroupCommitter[int, int], recorder: Recorder
) -> None:
    first = committer.submit(1)
    assert recorder.entered.wait(10)
    gone, kept = committer.submit(7), committer.submit(8)
    assert gone.cancel()
    recorder.release.set()
    assert (_outcome(first), _outcome(kept)) == (2, 16)
    assert recorder.groups == [[1], [8]]
    # one under way is no longer cancelled: its outcome arrives
    assert not first.cancel()


def test_close_answers_what_was_submitted_then_refuses(
    committer: GroupCommitter[int, int], recorder: Recorder
) -> None:
    first = committer.submit(1)
    assert recorder.entered.wait(10)
    queued = committer.submit(2)
    closing = threading.Thread(target=committer.close, kwargs={"timeout": 10})
    closing.start()
    recorder.release.set()
    closing.join(10)
    assert not closing.is_alive()
    assert (_outcome(first), _outcome(queued)) == (2, 4)
    with pytest.raises(RuntimeError, match="is closed"):
        committer.submit(3)
    with pytest.raises(RuntimeError, match="is closed"):
        committer.start()
    committer.close()  # a second close does nothing


def test_max_group_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_group=0"):
        GroupCommitter(lambda group: list(group), max_group=0)


def test_the_second_stage_sees_each_group_before_its_requests_are_answered() -> None:
    seen: list[list[int | str]] = []
    sending = threading.Event()
    proceed = threading.Event()

    def then(outcomes: Sequence[int | BaseException]) -> None:
        seen.append([o if isinstance(o, int) else type(o).__name__ for o in outcomes])
        sending.set()
        assert proceed.wait(10)
        if -1 in outcomes:
            raise OSError("the broker went away")

    staged = GroupCommitter(lambda group: [ValueError() if n < -1 else n for n in group], then=then)
    first = staged.submit(1)
    assert sending.wait(10)
    # the first group waits in the second stage, unanswered, while the next one is handled
    second = staged.submit(-5)
    assert not first.done()
    proceed.set()
    assert first.result(timeout=10) == 1
    assert isinstance(second.exception(timeout=10), ValueError)
    # a second stage that raises is logged; its requests still get their outcomes
    assert staged.submit(-1).result(timeout=10) == -1
    late = staged.submit(2)
    staged.close(timeout=10)  # waits for the second stage
    assert late.done() and late.result() == 2
    assert seen == [[1], ["ValueError"], [-1], [2]]
