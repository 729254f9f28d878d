"""The service's rules, without HTTP: settings, database, state machines, one module per use case.

``service.api`` (FastAPI) and ``worker`` (Celery) both call into it; it imports ``reid_core`` and
nothing of either. Its errors (:mod:`service.core.errors`) say what was refused and why; the API
alone turns them into HTTP statuses.
"""
