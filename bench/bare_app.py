"""The bare framework route of ``bench/api_load.py``: what FastAPI under uvicorn does per request
with no application work, the reference each API route is measured against in the same run.

One route, ``GET /bare``: a plain ``def`` (run in the threadpool, as the service's routes are)
that answers a fixed JSON body of :data:`BODY_BYTES` bytes, serialized once at import: about the
size of ``GET /v1/jobs/{id}``'s body. No database, no authentication, no serialization per
request. Served as the API is: ``uvicorn --factory bench.bare_app:create_app``.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Response

__all__ = ["BODY", "BODY_BYTES", "create_app"]

#: The size of a job's JSON (3.3 KB in bench/results/api_load.md).
BODY_BYTES = 3300


def _body(size: int) -> bytes:
    """A job-shaped JSON object padded to exactly ``size`` bytes."""
    job = {
        "id": "00000000-0000-4000-8000-000000000000",
        "state": "RUNNING",
        "progress": 0.5,
        "epoch": 30,
        "metrics": {"losses": {"total": 7.5}, "eval": {"mAP": 41.2, "r1": 70.1}},
        "padding": "",
    }
    bare = len(json.dumps(job, separators=(",", ":")).encode())
    job["padding"] = "x" * (size - bare)
    return json.dumps(job, separators=(",", ":")).encode()


BODY = _body(BODY_BYTES)


def create_app() -> FastAPI:
    app = FastAPI(title="bare", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/bare")
    def bare() -> Response:
        return Response(content=BODY, media_type="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(content=b'{"status":"ok"}', media_type="application/json")

    return app
