"""/v1/presets: the training recipes a job may start from (the rules: :mod:`service.core.presets`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.auth import CurrentOwner
from service.api.schemas import COMMON_ERRORS, PresetOut, error_responses
from service.core import presets

router = APIRouter(prefix="/v1/presets", tags=["jobs"], responses=COMMON_ERRORS)


@router.get("", summary="The presets: what each is for, what it gave, what it sets")
def list_presets(_owner: CurrentOwner) -> list[PresetOut]:
    """Every preset, by name. A job names one with ``"preset": "<name>"``; its ``config`` applies
    on top."""
    return [PresetOut.model_validate(p) for p in presets.list_presets()]


@router.get(
    "/{name}",
    summary="One preset",
    responses=error_responses(e404="Unknown preset (the message lists the presets)"),
)
def get_preset(
    name: Annotated[str, Path(max_length=128, description="Its name, e.g. cuhk03_cpu")],
    _owner: CurrentOwner,
) -> PresetOut:
    return PresetOut.model_validate(presets.preset_info(name))
