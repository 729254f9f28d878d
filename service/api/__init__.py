"""The HTTP edge: FastAPI routers that parse a request, call ``service.core`` and shape the answer.

The only package (with the app factory, :mod:`service.app`) that imports FastAPI or Starlette.
"""
