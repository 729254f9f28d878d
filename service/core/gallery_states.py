"""The gallery state machine: :func:`change_gallery_state` is the one place a gallery's state changes.

A **gallery** is a faiss index of a dataset's gallery images, embedded by one registered model
version (:class:`service.core.models.Gallery`). A worker builds it (:mod:`worker.gallery_task`
supervises ``python -m worker.build_gallery``). States::

    QUEUED -> BUILDING -> READY
       \\         \\-> FAILED (a reason: the model, the data, the builder's last error line)
        \\-> FAILED (the broker did not take it)
    BUILDING -> BUILDING    (a worker takes over a build whose worker stopped heartbeating)
    FAILED -> QUEUED        (retried by its owner)

:func:`change_gallery_state` keeps ``reason``, ``started_at``, ``finished_at`` and ``updated_at``
with the state, and writes the :class:`~service.core.models.GalleryEvent` row with the reason in
the caller's transaction (``GET /v1/galleries/{id}/events`` reads them), as a job's change
does (:class:`service.core.state_machine.StateMachine`). A build whose worker
stopped heartbeating is turned FAILED by the reaper (``python -m worker
dispatcher``, :func:`fail_if_stale`), never by a read.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from service.core import heartbeat
from service.core.models import Gallery, GalleryEvent, GalleryState
from service.core.state_machine import StateMachine

G = GalleryState

#: Allowed changes: from-state (None: a gallery being created) -> the states it may go to.
GALLERY_TRANSITIONS: Mapping[GalleryState | None, frozenset[GalleryState]] = {
    None: frozenset({G.QUEUED}),
    G.QUEUED: frozenset({G.BUILDING, G.FAILED}),
    G.BUILDING: frozenset({G.BUILDING, G.READY, G.FAILED}),
    G.READY: frozenset(),
    G.FAILED: frozenset({G.QUEUED}),  # retried
}


#: The gallery machine: its transitions, and the table that records each change.
GALLERIES: StateMachine[Gallery, GalleryState, GalleryEvent] = StateMachine(
    "gallery", Gallery, GalleryState, GALLERY_TRANSITIONS, GalleryEvent, "gallery_id"
)


def change_gallery_state(
    session: Session, gallery: Gallery, to_state: GalleryState, reason: str
) -> GalleryEvent:
    """Move ``gallery`` to ``to_state`` for ``reason`` and record it; the caller commits.

    Also sets ``started_at`` (each BUILDING), ``finished_at`` (READY, FAILED) and ``updated_at``.
    Raises :class:`InvalidTransitionError` for a change :data:`GALLERY_TRANSITIONS` does not
    allow, before touching anything.
    """

    def follow(from_state: GalleryState | None, to_state: GalleryState, now: datetime) -> None:
        if to_state is G.BUILDING:
            gallery.started_at = now
            gallery.finished_at = None
        elif to_state.is_final:
            gallery.finished_at = now

    return GALLERIES.change(session, gallery, to_state, reason, follow)


#: Load a gallery for a change, its row locked (``FOR UPDATE``) where the database can;
#: ``owner`` restricts the lookup to that owner's galleries (the API).
lock_gallery = GALLERIES.lock


def fail_if_stale(session: Session, gallery: Gallery, timeout_s: float, now: datetime) -> bool:
    """FAILED (True) when ``gallery`` is BUILDING and nobody heartbeated it for ``timeout_s``:
    its worker and builder died (the rule: :mod:`service.core.heartbeat`); the caller commits."""
    if gallery.state is not G.BUILDING or not heartbeat.is_stale(
        gallery, timedelta(seconds=timeout_s), now
    ):
        return False
    last = heartbeat.last_sign_of_life(gallery)
    change_gallery_state(
        session,
        gallery,
        G.FAILED,
        f"the build stopped: worker {gallery.worker_id or '?'} sent no heartbeat since "
        f"{last:%Y-%m-%d %H:%M:%S} UTC (more than {timeout_s:.0f} s); retry it (POST "
        f"/v1/galleries/{gallery.id}/retry)",
    )
    return True
