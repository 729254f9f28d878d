"""Shared by the service and worker tests: the real servers they use, and a job that trains in
seconds."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_URL = os.environ.get(
    "REID_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

#: A job of seconds: MobileNetV3-small on 96x48 crops, small heads, one thread.
TINY_JOB_CONFIG = {
    "data.height": 96,
    "data.width": 48,
    "data.batch_size": 8,
    "data.num_workers": 0,
    "model.backbone": "mobilenet_v3_small",
    "model.pretrained": "none",
    "model.pgm_channels": 32,
    "model.pgm_hidden": 16,
    "model.patch_dim": 16,
    "model.ipfl_dim": 8,
    "loss.pedal.neighbours": 3,
    "loss.gsl.warmup_epochs": 1,
    "eval.batch_size": 32,
    "runtime.num_threads": 1,
    "runtime.log_every_n_steps": 1,
}


def require_postgres() -> str:
    """The PostgreSQL server URL (with password); skips the test when it does not answer."""
    url = make_url(PG_URL)
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.skip(
            f"PostgreSQL at {url.render_as_string(hide_password=True)} does not answer "
            f"({type(exc).__name__}); start it or set REID_TEST_DATABASE_URL"
        )
    finally:
        engine.dispose()
    return url.render_as_string(hide_password=False)
