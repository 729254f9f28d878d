"""The Celery task that builds a gallery: :func:`build_gallery_task`, :class:`GallerySupervisor`.

The job supervisor's pattern (:mod:`worker.supervisor`, :mod:`worker.child`) for
``python -m worker.build_gallery <id>``, which embeds, saves the index and records its own
outcome: claim (QUEUED -> BUILDING), heartbeat, stop the builder when the gallery is deleted, and
record FAILED for a builder that ended without an outcome (killed, crashed). The API sends the
message at the highest priority (:func:`service.core.broker.send_gallery`): a build should not
wait behind queued training jobs. worker/README.md, "Galleries", says the rest.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import shared_task

from service.core.broker import BUILD_GALLERY_TASK
from service.core.db import session_scope
from service.core.folders import BUILD_LOG, gallery_dir
from service.core.gallery_states import change_gallery_state, lock_gallery
from service.core.models import GalleryState
from worker.child import ChildSupervisor, spawn, stop_now, watch
from worker.outcome import how_it_ended, last_error_line

log = logging.getLogger("worker.gallery_task")

#: Start of the line the supervisor writes in the build log before each attempt.
_HEADER = "--- "

#: ``gallery_id -> argv`` of the builder.
CommandFn = Callable[[uuid.UUID], list[str]]


def builder_command(gallery_id: uuid.UUID) -> list[str]:
    """``python -m worker.build_gallery <id>``."""
    return [sys.executable, "-m", "worker.build_gallery", str(gallery_id)]


@dataclass(frozen=True)
class _Claim:
    gallery_id: uuid.UUID
    folder: Path


@dataclass(kw_only=True)
class GallerySupervisor(ChildSupervisor):
    """Builds one gallery through a child process (see the module). ``command`` and ``clock``
    are for tests."""

    command: CommandFn = builder_command

    def _claim(self, gallery_id: uuid.UUID) -> _Claim | str:
        with session_scope(self.factory) as session:
            now = self.clock()
            building = {GalleryState.BUILDING}
            gallery = self.claimable(
                lock_gallery(session, gallery_id), "no such gallery (deleted?)", building, now
            )
            if isinstance(gallery, str):
                return gallery
            if gallery.state is GalleryState.BUILDING:
                reason = (
                    f"built again by {self.worker_id}: {gallery.worker_id} stopped heartbeating"
                )
            else:
                reason = f"building on {self.worker_id}"
            change_gallery_state(session, gallery, GalleryState.BUILDING, reason)
            gallery.worker_id = self.worker_id
            gallery.heartbeat_at = now
            gallery.progress = 0.0
            gallery.images_done = 0
            return _Claim(gallery.id, gallery_dir(self.settings, gallery.id))

    def _tick(self, claim: _Claim, heartbeat: bool) -> bool:
        """Heartbeat (if due); False when the gallery is no longer ours to build."""
        with session_scope(self.factory) as session:
            gallery = lock_gallery(session, claim.gallery_id)
            if gallery is None or gallery.worker_id != self.worker_id:
                return False
            if gallery.state is not GalleryState.BUILDING:
                return True  # the builder recorded the outcome; it is about to exit
            if heartbeat:
                gallery.heartbeat_at = self.clock()
            return True

    def _watch(self, claim: _Claim, proc: subprocess.Popen[bytes]) -> None:
        def tick(heartbeat: bool) -> str | None:
            return None if self._tick(claim, heartbeat) else "deleted or taken over"

        watch(proc, self.settings.worker, tick, f"gallery {claim.gallery_id}")

    def _finish(self, claim: _Claim, failure: str) -> str:
        """The gallery's final word: as the builder recorded it, else FAILED for ``failure``."""
        with session_scope(self.factory) as session:
            gallery = lock_gallery(session, claim.gallery_id)
            if gallery is not None:
                if (
                    gallery.state is not GalleryState.BUILDING
                    or gallery.worker_id != self.worker_id
                ):
                    return str(gallery.state)
                change_gallery_state(session, gallery, GalleryState.FAILED, failure)
                return str(GalleryState.FAILED)
        # deleted during the build: its folder goes once the lock is given back
        shutil.rmtree(claim.folder, ignore_errors=True)
        return "deleted during the build"

    def _exit_failure(self, claim: _Claim, returncode: int) -> str:
        error = last_error_line(claim.folder / BUILD_LOG)
        if error is not None and error.startswith(_HEADER):  # the builder printed nothing
            error = None
        how = how_it_ended(returncode)
        return f"the gallery builder {how} before finishing" + (f": {error}" if error else "")

    def run(self, gallery_id: uuid.UUID) -> str:
        """Build the gallery to its end; returns its final state, or why nothing was built."""
        claim = self._claim(gallery_id)
        if isinstance(claim, str):
            log.info("gallery %s: %s", gallery_id, claim)
            return claim
        claim.folder.mkdir(parents=True, exist_ok=True)
        header = f"{_HEADER}{self.clock():%Y-%m-%dT%H:%M:%S}Z on {self.worker_id}: "
        with (claim.folder / BUILD_LOG).open("ab") as log_file:
            try:
                proc = spawn(self.command(gallery_id), log_file, self.settings, header)
            except OSError as exc:
                return self._finish(claim, f"cannot start the gallery builder: {exc}")
            try:
                self._watch(claim, proc)
            except BaseException:
                stop_now(proc, self.settings.worker.kill_grace_s)
                raise
        outcome = self._finish(claim, self._exit_failure(claim, proc.returncode))
        log.info("gallery %s: %s", gallery_id, outcome)
        return outcome


@shared_task(name=BUILD_GALLERY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def build_gallery_task(self: Any, gallery_id: str) -> str:
    """Build gallery ``gallery_id``, from claim to READY or FAILED (:class:`GallerySupervisor`)."""
    return GallerySupervisor.for_task(self).run(uuid.UUID(gallery_id))
