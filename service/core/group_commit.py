"""Writes handled in groups: the requests that arrive together share one transaction.

A request committed on its own pays a transaction's round trips to the database and a thread of
the pool contending for the interpreter with the others; under a burst of submissions that is
most of a submission's cost. :class:`GroupCommitter` runs one thread that takes every request
waiting (at most ``max_group``) and hands them to ``handle`` together, which answers each request
on its own: its result, or the exception that refused it. While one group is being written the
next one gathers, so groups grow with the load and a lone request waits for nobody.

* A request is answered through a :class:`concurrent.futures.Future` (``asyncio.wrap_future`` in
  the API); one cancelled before its group began is left out of it, never written.
* ``handle`` raising (the database went away) answers every request of its group with that
  exception: none of them was committed.
* ``then`` (optional) is a second stage on a thread of its own: it gets each group's outcomes
  after ``handle`` and before the requests are answered, while the next group is handled (the
  jobs' submissions send a committed group to the broker there). It must not raise; if it does,
  the error is logged and the requests get their outcomes all the same.
* :meth:`GroupCommitter.close` answers what was submitted before it, then stops the threads; a
  request after it is refused with :class:`RuntimeError`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger("service.group_commit")

T = TypeVar("T")
R = TypeVar("R")


class _Stop:
    """Put in the queue by :meth:`GroupCommitter.close`: the thread stops on reaching it."""


class GroupCommitter(Generic[T, R]):
    """One thread answering submitted requests in groups (see the module)."""

    def __init__(
        self,
        handle: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        then: Callable[[Sequence[R | BaseException]], None] | None = None,
        max_group: int = 32,
        name: str = "group-commit",
    ) -> None:
        if max_group < 1:
            raise ValueError(f"max_group={max_group}: at least 1")
        self._handle = handle
        self._then = then
        self._stage = (
            None if then is None else ThreadPoolExecutor(1, thread_name_prefix=f"{name}-then")
        )
        self._max_group = max_group
        self._name = name
        self._queue: queue.SimpleQueue[tuple[T, Future[R]] | _Stop] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Start the thread now (else the first :meth:`submit` starts it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def submit(self, item: T) -> Future[R]:
        """Queue ``item`` for the next group; its outcome arrives in the returned future."""
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed: the service is stopping")
            self._queue.put((item, future))
        if self._thread is None:
            self.start()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Answer every request submitted before this call, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_Stop())
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if self._stage is not None:
            self._stage.shutdown(wait=True)

    def _next_group(self) -> tuple[list[tuple[T, Future[R]]], bool]:
        """The requests waiting now (blocking for the first), and whether a stop was reached."""
        first = self._queue.get()
        if isinstance(first, _Stop):
            return [], True
        group = [first]
        while len(group) < self._max_group:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(entry, _Stop):
                return group, True
            group.append(entry)
        return group, False

    def _run(self) -> None:
        stop = False
        while not stop:
            group, stop = self._next_group()
            # A request whose client gave up before its group began is not written.
            group = [(item, f) for item, f in group if f.set_running_or_notify_cancel()]
            if group:
                self._answer(group)

    def _answer(self, group: list[tuple[T, Future[R]]]) -> None:
        try:
            outcomes = self._handle([item for item, _ in group])
            if len(outcomes) != len(group):
                raise RuntimeError(
                    f"{self._name}: {len(outcomes)} outcomes for a group of {len(group)}"
                )
        except BaseException as exc:
            log.debug("%s: a group of %d failed", self._name, len(group), exc_info=True)
            for _, future in group:
                future.set_exception(exc)
            return
        if self._stage is None:
            self._resolve(group, outcomes)
        else:
            self._stage.submit(self._then_resolve, group, outcomes)

    def _then_resolve(
        self, group: list[tuple[T, Future[R]]], outcomes: Sequence[R | BaseException]
    ) -> None:
        assert self._then is not None
        try:
            self._then(outcomes)
        except Exception:
            log.exception("%s: the second stage failed for a group of %d", self._name, len(group))
        self._resolve(group, outcomes)

    @staticmethod
    def _resolve(group: list[tuple[T, Future[R]]], outcomes: Sequence[R | BaseException]) -> None:
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
