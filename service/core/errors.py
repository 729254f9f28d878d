"""What the service refuses, in its own words: the API maps each kind to an HTTP status.

Every error has a stable ``code`` and a ``message`` that says what was wrong (with the offending
value) and what to do. ``details`` name the input fields at fault, relative to the request's input
(``gpus``, ``config.loss.gls``); the API says where that input was (``body.gpus``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ServiceError(Exception):
    """A request the service refuses; subclasses say which kind of refusal."""

    def __init__(
        self, code: str, message: str, *, details: Sequence[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details) if details else None


class NotFoundError(ServiceError):
    """The resource does not exist, or belongs to another owner (no difference is shown)."""


class ConflictError(ServiceError):
    """The resource's state does not allow this now (not ready, already finished, name taken)."""


class InvalidInputError(ServiceError):
    """An input value out of bounds or of the wrong kind; ``field`` names it."""

    def __init__(
        self,
        message: str,
        field: str | None = None,
        value: Any = None,
        *,
        details: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if details is None and field is not None:
            detail: dict[str, Any] = {"field": field, "message": message}
            if value is not None:
                detail["value"] = value
            details = [detail]
        super().__init__("validation_error", message, details=details)


class RejectedInputError(ServiceError):
    """Input that is well-formed but cannot be used: a dataset path, a folder, an archive."""


class TooLargeError(ServiceError):
    """Input above a size limit."""


class UnavailableError(ServiceError):
    """A service this one needs (MLflow, the broker) does not answer; retry later."""


def not_found(kind: str, ident: object) -> NotFoundError:
    return NotFoundError(f"{kind.replace(' ', '_')}_not_found", f"{kind} {ident} not found")
