"""The dashboard: one static page at ``/`` and its files under ``/static/`` (plain HTML, CSS and
ES modules in ``service/static``, no build step). Neither needs an API key: the page asks for one
and sends it on every ``/v1`` call it makes."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Scripts, styles and API calls from this origin only; no inline script, no framing.
_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)

# A route that delegates to StaticFiles (rather than app.mount) keeps the dashboard one router,
# with StaticFiles' path checks and conditional requests (ETag / Last-Modified -> 304).
_files = StaticFiles(directory=STATIC_DIR)


async def _static(path: str, request: Request) -> Response:
    response = await _files.get_response(path, request.scope)
    # Revalidate every time (a 304 when unchanged): after an upgrade nobody runs stale modules.
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@router.get("/")
async def dashboard(request: Request) -> Response:
    response = await _static("index.html", request)
    response.headers["Content-Security-Policy"] = _CONTENT_SECURITY_POLICY
    return response


@router.get("/static/{path:path}")
async def static_file(path: str, request: Request) -> Response:
    return await _static(path, request)
