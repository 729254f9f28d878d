"""The presets a job may start from: reid_core's shipped recipes (:mod:`reid_core.presets`), as
the service applies them (without the keys it sets itself, see
:func:`service.core.job_config.preset_overrides`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reid_core.config import ExperimentConfig, apply_overrides
from reid_core.presets import Preset, UnknownPresetError, load_preset, preset_names
from service.core.errors import NotFoundError
from service.core.job_config import preset_overrides


@dataclass(frozen=True)
class PresetInfo:
    """A preset as a job gets it: ``overrides`` (dotted keys) on the defaults give ``config``;
    the dataset, its folder and the output folder come with the job."""

    name: str
    purpose: str
    measured: str
    overrides: dict[str, Any]
    config: ExperimentConfig


def _preset(name: str) -> Preset:
    try:
        return load_preset(name)
    except UnknownPresetError as exc:
        raise NotFoundError(
            "preset_not_found",
            f"preset {name!r} not found; the presets are: {', '.join(exc.known)} "
            "(GET /v1/presets describes them)",
        ) from None


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` as its file has them; an unknown name is a
    :class:`NotFoundError` that lists the presets."""
    return _preset(name).settings


def preset_info(name: str) -> PresetInfo:
    preset = _preset(name)
    overrides = preset_overrides(preset.settings)
    config = ExperimentConfig.model_validate(apply_overrides({}, overrides))
    return PresetInfo(name, preset.about.purpose, preset.about.measured, overrides, config)


def list_presets() -> list[PresetInfo]:
    """Every preset, by name."""
    return [preset_info(name) for name in preset_names()]
