"""Celery workers of the training service: one supervisor task per job, a dispatcher, a reaper.

The database is the source of truth (job states, retries, heartbeats); Celery only carries job
ids. Nothing here imports torch: the training itself runs in a child process
(``python -m reid_core.train``). See ``worker/README.md``.
"""
