"""The gallery task's supervisor with stand-in builders (plain Python children, no torch, no
broker), on a migrated SQLite file: claims, a builder that dies, a gallery deleted mid-build."""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import session_scope
from service.core.folders import BUILD_LOG, gallery_dir
from service.core.gallery_states import change_gallery_state
from service.core.models import Gallery, GalleryState
from service.core.settings import Settings
from tests.helpers import make_gallery
from tests.worker.conftest import FakeClock
from worker.gallery_task import GallerySupervisor


def _load(factory: sessionmaker[Session], gallery_id: uuid.UUID) -> Gallery | None:
    with factory() as session:
        gallery = session.get(Gallery, gallery_id)
        if gallery is not None:
            session.expunge(gallery)
        return gallery


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_builder_that_dies_leaves_the_gallery_failed_with_its_last_error(
    settings: Settings, factory: sessionmaker[Session]
) -> None:
    gallery_id = make_gallery(factory)
    crash = "import sys; print('loading the model'); sys.exit('RuntimeError: out of memory')"
    supervisor = GallerySupervisor(settings, factory, "w1:1", command=lambda _id: _python(crash))
    assert supervisor.run(gallery_id) == "FAILED"
    gallery = _load(factory, gallery_id)
    assert gallery is not None
    assert gallery.state is GalleryState.FAILED
    assert gallery.reason == (
        "the gallery builder exited with code 1 before finishing: RuntimeError: out of memory"
    )
    assert gallery.worker_id == "w1:1" and gallery.finished_at is not None
    log = (gallery_dir(settings, gallery_id) / BUILD_LOG).read_text()
    assert "on w1:1:" in log and "loading the model" in log


def test_a_builder_killed_by_a_signal_is_named(
    settings: Settings, factory: sessionmaker[Session]
) -> None:
    gallery_id = make_gallery(factory)
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    supervisor = GallerySupervisor(settings, factory, "w1:1", command=lambda _id: _python(killed))
    assert supervisor.run(gallery_id) == "FAILED"
    gallery = _load(factory, gallery_id)
    assert gallery is not None
    assert gallery.reason is not None
    assert gallery.reason.startswith("the gallery builder was killed by SIGKILL before finishing")


def test_deleting_the_gallery_stops_its_builder_and_removes_its_folder(
    settings: Settings, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    gallery_id = make_gallery(factory)
    started = tmp_path / "started"
    # writes into the gallery's folder, then would build for a minute
    folder = gallery_dir(settings, gallery_id)
    code = (
        "import pathlib, time; "
        f"pathlib.Path({str(folder / 'index.faiss')!r}).write_bytes(b'partial'); "
        f"pathlib.Path({str(started)!r}).touch(); time.sleep(60)"
    )
    supervisor = GallerySupervisor(settings, factory, "w1:1", command=lambda _id: _python(code))
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(supervisor.run(gallery_id)))
    runner.start()
    try:
        for _ in range(600):
            if started.exists():
                break
            threading.Event().wait(0.05)
        assert started.exists(), "the stand-in builder never started"
        with session_scope(factory) as session:  # what DELETE /v1/galleries/{id} does
            gallery = session.get(Gallery, gallery_id)
            assert gallery is not None and gallery.state is GalleryState.BUILDING
            session.delete(gallery)
    finally:
        runner.join(timeout=60)
    assert not runner.is_alive(), "the supervisor did not stop the builder"
    assert outcome == ["deleted during the build"]
    assert not folder.exists()


def test_a_fresh_build_of_another_worker_is_left_alone_and_a_stale_one_taken_over(
    settings: Settings, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    gallery_id = make_gallery(
        factory, state=GalleryState.BUILDING, worker_id="w0:9", heartbeat_at=clock()
    )
    ran: list[uuid.UUID] = []

    def command(gid: uuid.UUID) -> list[str]:
        ran.append(gid)
        return _python("pass")  # ends without recording an outcome

    supervisor = GallerySupervisor(settings, factory, "w1:1", command=command, clock=clock)
    assert supervisor.run(gallery_id) == "BUILDING on w0:9 (fresh heartbeat): left alone"
    assert ran == []
    gallery = _load(factory, gallery_id)
    assert gallery is not None and gallery.worker_id == "w0:9"

    clock.advance(settings.worker.heartbeat_timeout_s + 1)
    assert supervisor.run(gallery_id) == "FAILED"
    assert ran == [gallery_id]
    gallery = _load(factory, gallery_id)
    assert gallery is not None
    assert gallery.worker_id == "w1:1"
    assert gallery.reason == "the gallery builder exited with code 0 before finishing"


@pytest.mark.parametrize("state", [GalleryState.READY, GalleryState.FAILED])
def test_a_finished_gallery_is_not_built_again(
    settings: Settings, factory: sessionmaker[Session], state: GalleryState
) -> None:
    gallery_id = make_gallery(factory, state=GalleryState.BUILDING)
    with session_scope(factory) as session:
        gallery = session.get(Gallery, gallery_id)
        assert gallery is not None
        change_gallery_state(session, gallery, state, "test")
    supervisor = GallerySupervisor(
        settings, factory, "w1:1", command=lambda _id: pytest.fail("no builder should start")
    )
    assert supervisor.run(gallery_id) == f"already {state}"
    assert supervisor.run(uuid.uuid4()) == "no such gallery (deleted?)"
