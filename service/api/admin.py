"""/v1/admin/keys: API key management over HTTP, for deployments where running
``python -m service create-key`` is awkward. Off unless REID_ADMIN_TOKEN is set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.api.auth import AdminDep
from service.api.deps import SessionDep
from service.api.errors import APIError
from service.api.schemas import (
    COMMON_ERRORS,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    error_responses,
)
from service.core.api_keys import KeyCache, create_api_key, list_api_keys, revoke_api_key

router = APIRouter(
    prefix="/v1/admin/keys",
    tags=["admin"],
    dependencies=[AdminDep],
    responses={**COMMON_ERRORS, **error_responses(e404="Admin routes off, or unknown key")},
)


@router.post("", status_code=201, summary="Create an API key (the key is shown once)")
def create_key(body: ApiKeyCreate, session: SessionDep) -> ApiKeyCreated:
    key, token = create_api_key(session, body.owner, body.name)
    session.commit()
    # the key's fields as every answer shows them (ApiKeyOut), and the token, this once
    return ApiKeyCreated(**ApiKeyOut.model_validate(key).model_dump(), key=token)


@router.get("", summary="API keys (prefixes only)")
def list_keys(
    session: SessionDep, owner: Annotated[str | None, Query(max_length=128)] = None
) -> list[ApiKeyOut]:
    return [ApiKeyOut.model_validate(k) for k in list_api_keys(session, owner)]


@router.post("/{prefix}/revoke", summary="Revoke an API key")
def revoke_key(prefix: str, session: SessionDep, request: Request) -> ApiKeyOut:
    """Refused from the next request on in this API process; other API processes stop
    accepting it within ``REID_API_KEY_CACHE_SECONDS``."""
    key = revoke_api_key(session, prefix)
    if key is None:
        raise APIError(404, "api_key_not_found", f"no API key with prefix {prefix!r}")
    session.commit()
    cache: KeyCache = request.app.state.key_cache
    cache.forget(prefix)
    return ApiKeyOut.model_validate(key)
