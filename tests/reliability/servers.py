"""Throwaway PostgreSQL and Redis servers that a test may stop, restart or break.

The shared servers other tests use are never touched: each :class:`PostgresServer` is a fresh
``initdb`` cluster in a temporary folder, each :class:`RedisServer` a ``redis-server`` without
persistence (a restart loses every message), both on a free loopback port.

PostgreSQL refuses to run as root: when the tests run as root the cluster belongs to the
``postgres`` user and its programs run as that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

__all__ = ["PostgresServer", "RedisServer", "free_port", "wait_until"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds (a guard
    against a hang, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _program(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed (PostgreSQL server programs are needed)")
    return found


class PostgresServer:
    """A private PostgreSQL cluster: ``start()``, ``stop()`` (fast shutdown: sessions are cut),
    ``create_database()``; ``close()`` stops it and deletes its files."""

    def __init__(self) -> None:
        self.port = free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            try:
                owner = pwd.getpwnam(self._user)
            except KeyError:
                pytest.skip("running as root and there is no `postgres` user to run PostgreSQL")
        # Not under pytest's tmp_path: as root, that folder is closed to the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="reid-test-pg-"))
        if self._user is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._run(
            _program("initdb"),
            "--pgdata", str(self.data),
            "--username", "postgres",
            "--auth", "trust",
            "--encoding", "UTF8",
            "--no-sync",
        )  # fmt: skip
        self.running = False

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            argv, user=self._user, capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed:\n{result.stdout}\n{result.stderr}\n{log}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(
            _program("pg_ctl"), "start", "--wait", "--pgdata", str(self.data),
            "--log", str(self.log), "--options", options,
        )  # fmt: skip
        self.running = True

    def stop(self) -> None:
        """Fast shutdown: open sessions are terminated, as when the server goes away."""
        self._run(
            _program("pg_ctl"), "stop", "--wait", "--mode", "fast", "--pgdata", str(self.data)
        )
        self.running = False

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(RuntimeError):
                self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            host="127.0.0.1",
            port=self.port,
            database=database,
        ).render_as_string(hide_password=False)

    def create_database(self, name: str = "reid") -> str:
        """A new, empty database; returns its URL."""
        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)


class RedisServer:
    """A private ``redis-server`` without persistence: ``restart()`` loses every message."""

    def __init__(self, folder: Path) -> None:
        program = shutil.which("redis-server")
        if program is None:
            pytest.skip("redis-server is not installed")
        self.program = program
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        with log:
            self._process = subprocess.Popen(
                [
                    self.program,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.folder),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(self._answers, f"redis-server on port {self.port}", timeout=30)

    def _answers(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {self._process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()
