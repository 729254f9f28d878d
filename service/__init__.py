"""The training service: its rules (``service.core``) and its HTTP API (``service.api``, wired by
``service.app.create_app``).

Start it with ``python -m service serve`` (embedded defaults: SQLite under ``var/``, migrations
applied first); ``python -m service --help`` lists the other commands. It imports ``reid_core`` for
the configuration models and dataset scanning; ``reid_core`` knows nothing of it.
"""

__version__ = "0.1.0"
